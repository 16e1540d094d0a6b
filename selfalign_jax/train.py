"""Sharded supervised fine-tuning (ISARA step 5): answer-token loss, AdamW, warm-up + cosine,
gradient accumulation, optional LoRA, Orbax checkpoints with exact resume, HF export.

Data: (question, answer) pairs rendered with the conversation template (`Template.train_pair`),
EOS appended, truncated to `max_length` model inputs; the loss weight is 1 on answer tokens (and
the EOS) and 0 on the prompt. Examples are grouped into length buckets (multiples of `bucket`
tokens), so at most max_length / bucket step shapes are compiled.

Loss: the token-weighted mean over the whole effective batch,
    loss = sum_{micro-batches, rows, positions} w * nll / sum w,
so `grad_accum` micro-batches of `batch_size` rows give the same gradient as one batch of
`batch_size * grad_accum` rows (up to float summation order); clipping and AdamW see that mean.
The LM head and cross-entropy are fused and chunked (`fused_xent`): no [B, T, V] logits are kept,
and positions with weight 0 (prompt, padding) get no LM-head matmul at all.

Sharding: a ('data', 'fsdp', 'tensor') mesh (`mesh.make_mesh`); parameters, adapters and optimizer
state are placed by the logical-axis rules of `model.ShardingRules` (optimizer moments inherit
their parameter's sharding), batches are split over data x fsdp. One jitted step with explicit
in/out shardings and the train state donated.

Checkpoints: an Orbax CheckpointManager under `checkpoint_dir` holds {params or adapters,
optimizer state, step} plus JSON metadata (data position, fingerprint of the data and
hyper-parameters). A run restarted with the same data and settings resumes from the latest
checkpoint and ends with the same parameters as an uninterrupted run. A non-finite loss or gradient
norm stops training with `TrainingDiverged`; states after it are never saved.

Public API:
    TrainConfig(...)                                     hyper-parameters (paper defaults)
    load_pairs_jsonl(path) -> list[(question, answer)]
    encode_pairs(pairs, tokenizer, template, max_length, eos_id, pad_id) -> Encoded
    plan_epoch(lengths, rows, seed, epoch) -> list[np.ndarray]       example indices per step
    make_batch(enc, idx, grad_accum, micro_rows, max_length, bucket) -> dict of [A, b, T] arrays
    lr_schedule(tcfg, total_steps), make_optimizer(tcfg, total_steps)
    Trainer(cfg, tcfg, total_steps, mesh)                .init_state / .step / .merged / .loss
    train(cfg, params, enc, tcfg, ...) -> (state, frozen, trainer, history)
    finetune(model, pairs, tokenizer, out_dir, tcfg, template, ...) -> (cfg, params)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfalign_jax import checkpoint as C
from selfalign_jax import lora as L
from selfalign_jax import mesh as MS
from selfalign_jax import model as M
from selfalign_jax.errors import UserError
from selfalign_jax.template import Template

Pair = tuple[str, str]


# ------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """SFT hyper-parameters. Defaults follow the ISARA reference (AdamW 0.9/0.95, no weight decay,
    cosine with 3% warm-up, effective batch 32, 1 epoch, lr 2e-5)."""

    lr: float = 2e-5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices only (not norms / biases)
    warmup_ratio: float = 0.03  # warm-up steps = ceil(ratio * total steps), as HF
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    clip_norm: float | None = 1.0  # global gradient-norm clip; None/0 = off
    batch_size: int = 8  # rows per micro-batch (global, over all devices)
    grad_accum: int = 4  # micro-batches per optimizer step: effective batch = batch_size * grad_accum
    epochs: int = 1
    max_length: int = 512  # model inputs per example (prompt + answer + EOS is cut to max_length + 1)
    bucket: int = 64  # sequence lengths are padded to a multiple of this (bounded compiles)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA scale = alpha / rank
    lora_targets: tuple[str, ...] = L.TARGETS
    remat: bool = False  # rematerialise each layer in the backward pass
    loss_chunk: int = 512  # tokens per chunk of the fused LM-head + cross-entropy (0: plain, full logits)
    streams: int = 0  # independent sub-batches per micro-batch through the model in one graph, so
    # XLA:CPU runs their ops side by side on the cores (0: auto = 4 on a single CPU device when the rows
    # divide, else 1); the fused loss then runs once over all rows
    dtype: str = "float32"  # compute dtype (float32 | bfloat16); masters and Adam moments stay fp32
    seed: int = 0  # data order and LoRA init
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    mesh: str | None = None  # 'data=N,fsdp=N,tensor=N'; None: every device on fsdp

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def validate(self) -> None:
        chk = [(self.lr > 0, "--lr must be > 0"), (self.batch_size >= 1, "--batch-size must be >= 1"),
               (self.grad_accum >= 1, "--grad-accum must be >= 1"), (self.epochs >= 1, "--epochs must be >= 1"),
               (self.max_length >= 2, "--max-length must be >= 2"), (self.bucket >= 1, "bucket must be >= 1"),
               (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
               (self.lora_rank >= 0, "--lora-rank must be >= 0"),
               (self.schedule in ("cosine", "linear", "constant"), "schedule must be cosine|linear|constant"),
               (self.dtype in ("float32", "bfloat16"), "--dtype must be float32 or bfloat16"),
               (0 <= self.b1 < 1 and 0 <= self.b2 < 1, "betas must be in [0, 1)"),
               (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
               (self.streams >= 0, "streams must be >= 0")]
        for ok, msg in chk:
            if not ok:
                raise UserError(msg)
        bad = [t for t in self.lora_targets if t not in L.TARGETS]
        if bad:
            raise UserError(f"LoRA target {bad[0]!r} unknown (choose from {', '.join(L.TARGETS)})")

    def fingerprint_fields(self) -> dict:
        """The settings that determine the trajectory (a resumed run must match them)."""
        skip = {"checkpoint_every", "keep_checkpoints", "mesh", "remat", "loss_chunk", "streams"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


class TrainingDiverged(UserError):
    """Loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


# -------------------------------------------------------------------------------------------- data
def load_pairs_jsonl(path) -> list[Pair]:
    """(question, answer) pairs from a `{"question": str, "answer": str}` JSONL file; a malformed
    line, a missing field or an empty answer raises UserError naming the file and line."""
    from selfalign_jax import data as D

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    samples = D.read_jsonl(path, require_answer=True)
    # read_jsonl reports malformed lines; empty answers are legal there (eval rows), not here
    lines = _nonblank_line_numbers(path)
    for i, s in enumerate(samples):
        if not s.answer.strip():
            where = f"{path}:{lines[i]}" if i < len(lines) else str(path)
            raise UserError(f"{where}: field 'answer' is empty (SFT needs an answer)")
    if not samples:
        raise UserError(f"{path}: no examples")
    return [(s.question, s.answer) for s in samples]


def _nonblank_line_numbers(path: Path) -> list[int]:
    if path.name.lower().removesuffix(".gz").endswith(".json"):
        return []
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        return [i for i, line in enumerate(f, 1) if line.strip()]


@dataclasses.dataclass
class Encoded:
    """Tokenized examples: ids[i] = prompt + answer + EOS (cut to max_length + 1 tokens);
    target[i] marks answer/EOS tokens (the loss is on predicting them)."""

    ids: list[np.ndarray]
    target: list[np.ndarray]
    pad_id: int
    truncated: int = 0  # examples cut to max_length + 1 tokens
    dropped: int = 0  # examples left out: no answer token within the window

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """Model inputs per example (tokens - 1)."""
        return np.array([len(x) - 1 for x in self.ids], np.int64)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ids, t in zip(self.ids, self.target):
            h.update(np.int64(len(ids)).tobytes())
            h.update(ids.astype(np.int32).tobytes())
            h.update(np.packbits(t).tobytes())
        return h.hexdigest()[:16]


def _eos_pad(tokenizer, cfg: M.Config | None, eos_id, pad_id) -> tuple[int, int]:
    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None and cfg is not None and cfg.eos_ids:
        eos_id = cfg.eos_ids[0]
    if eos_id is None:
        raise UserError("the tokenizer and the model config name no EOS token (needed to end answers)")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None and cfg is not None:
        pad_id = cfg.pad_id
    return int(eos_id), int(0 if pad_id is None else pad_id)


def encode_pairs(pairs: Sequence[Pair], tokenizer, template: Template = Template(), max_length: int = 512,
                 eos_id: int | None = None, pad_id: int | None = None, cfg: M.Config | None = None) -> Encoded:
    """Render each pair with `template.train_pair`, tokenize prompt + answer in one pass (character
    offsets tell answer tokens from prompt tokens, so merges across the boundary are handled),
    append EOS and truncate to max_length + 1 tokens."""
    eos_id, pad_id = _eos_pad(tokenizer, cfg, eos_id, pad_id)
    special = template.kind == "plain"  # chat templates write their own BOS
    rendered = [template.train_pair(q, a) for q, a in pairs]
    ids_l, tgt_l, truncated, dropped = [], [], 0, 0
    texts = [p + t for p, t in rendered]
    fast = getattr(tokenizer, "is_fast", False)
    if fast:
        enc = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True)
    for i, (prompt, tgt_text) in enumerate(rendered):
        if fast:
            ids = list(enc["input_ids"][i])
            offs = enc["offset_mapping"][i]
            is_t = [e > len(prompt) and e > s for s, e in offs]
            # a special token the tokenizer appends after the text (EOS-like) is dropped: we add EOS
            while ids and offs[len(ids) - 1] == (0, 0) and len(ids) > 1 and ids[-1] == eos_id:
                ids.pop()
                is_t.pop()
        else:
            p_ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
            full = list(tokenizer(prompt + tgt_text, add_special_tokens=special)["input_ids"])
            if full[:len(p_ids)] == p_ids:
                ids = full
            else:
                ids = p_ids + list(tokenizer(tgt_text, add_special_tokens=False)["input_ids"])
            if len(ids) > len(p_ids) and ids[-1] == eos_id:
                ids.pop()
            is_t = [j >= len(p_ids) for j in range(len(ids))]
        ids.append(eos_id)
        is_t.append(True)
        if len(ids) > max_length + 1:
            ids, is_t = ids[:max_length + 1], is_t[:max_length + 1]
            truncated += 1
        t = np.asarray(is_t, bool)
        if not t[1:].any():
            dropped += 1
            continue
        ids_l.append(np.asarray(ids, np.int32))
        tgt_l.append(t)
    return Encoded(ids_l, tgt_l, pad_id, truncated, dropped)


def plan_epoch(lengths: np.ndarray, rows: int, seed: int, epoch: int, window: int = 16) -> list[np.ndarray]:
    """Example indices of each step of one epoch: shuffled by (seed, epoch), then sorted by length
    inside windows of `window` steps so each step holds similar lengths, then the steps shuffled.
    Deterministic; ceil(n / rows) steps, the last possibly short."""
    n = len(lengths)
    rng = np.random.default_rng([int(seed), int(epoch), 0x5F7])
    perm = rng.permutation(n)
    batches = []
    span = rows * window
    for s in range(0, n, span):
        chunk = perm[s:s + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[j:j + rows] for j in range(0, len(chunk), rows)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def bucket_len(n: int, bucket: int, max_length: int) -> int:
    return int(min(max_length, max(bucket, -(-n // bucket) * bucket)))


def make_batch(enc: Encoded, idx: Sequence[int], grad_accum: int, micro_rows: int, max_length: int,
               bucket: int = 64) -> dict[str, np.ndarray]:
    """Arrays [grad_accum, micro_rows, T] (T = the length bucket of the longest example):
    tokens (inputs, pad_id at padding), pos (0.. on tokens, -1 at padding), targets (next token) and
    weights (1.0 where the target is an answer token). Rows beyond len(idx) are empty."""
    idx = list(idx)
    A, b = grad_accum, micro_rows
    if len(idx) > A * b:
        raise ValueError(f"{len(idx)} examples do not fit {A} x {b} rows")
    T = bucket_len(max((len(enc.ids[i]) - 1 for i in idx), default=1), bucket, max_length)
    tokens = np.full((A * b, T), enc.pad_id, np.int32)
    pos = np.full((A * b, T), -1, np.int32)
    targets = np.zeros((A * b, T), np.int32)
    weights = np.zeros((A * b, T), np.float32)
    per = -(-len(idx) // A) if idx else 0  # spread a short step evenly over the micro-batches
    for r, i in enumerate(idx):
        row = (r // per) * b + (r % per) if per <= b else r
        ids, t = enc.ids[i], enc.target[i]
        n = len(ids) - 1
        tokens[row, :n] = ids[:-1]
        pos[row, :n] = np.arange(n)
        targets[row, :n] = ids[1:]
        weights[row, :n] = t[1:]
    shape = (A, b, T)
    return {"tokens": tokens.reshape(shape), "pos": pos.reshape(shape), "targets": targets.reshape(shape),
            "weights": weights.reshape(shape)}


# ------------------------------------------------------------------------------------- optimizer
def warmup_steps(tcfg: TrainConfig, total_steps: int) -> int:
    return int(math.ceil(tcfg.warmup_ratio * total_steps))


def lr_schedule(tcfg: TrainConfig, total_steps: int) -> Callable:
    """HF-style: linear warm-up from 0 over ceil(ratio * total) steps, then cosine (or linear) to 0
    at `total_steps`; `constant` holds the peak after warm-up."""
    w = warmup_steps(tcfg, total_steps)
    peak = tcfg.lr

    def f(step):
        s = jnp.asarray(step, jnp.float32)
        warm = s / max(1, w)
        prog = jnp.clip((s - w) / max(1, total_steps - w), 0.0, 1.0)
        if tcfg.schedule == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * prog))
        elif tcfg.schedule == "linear":
            decay = 1.0 - prog
        else:
            decay = jnp.ones_like(prog)
        return peak * jnp.where(s < w, warm, decay)

    return f


def make_optimizer(tcfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule) (decay on matrices only)."""
    mask = (lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)) if tcfg.weight_decay else None
    adamw = optax.adamw(lr_schedule(tcfg, total_steps), b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                        weight_decay=tcfg.weight_decay, mask=mask)
    if tcfg.clip_norm:
        return optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), adamw)
    return adamw


def _opt_shardings(optimizer, params_abstract, param_sh, mesh):
    """Shardings of the optimizer state: a leaf whose key path ends with a parameter's key path
    and has that parameter's shape takes the parameter's sharding; the rest is replicated."""
    state = jax.eval_shape(optimizer.init, params_abstract)
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params_abstract), jax.tree.leaves(param_sh)):
        by_path[tuple(path)] = (leaf.shape, sh)
    rep = MS.replicated(mesh)

    def pick(path, leaf):
        path = tuple(path)
        for k in range(len(path)):
            hit = by_path.get(path[k:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, state)


# ------------------------------------------------------------------------------------------- state
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any  # trainable: full Params, or LoRA adapters
    opt_state: Any
    step: Any  # int32 scalar


def _as_dict(s: TrainState) -> dict:
    return {"params": s.params, "opt_state": s.opt_state, "step": s.step}


def _from_dict(d: dict) -> TrainState:
    return TrainState(d["params"], d["opt_state"], d["step"])


# ------------------------------------------------------------------------------------------ trainer
def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def token_nll(params: M.Params, cfg: M.Config, batch: dict, remat: bool = False, fused: bool = True,
              chunk_tokens: int = 512, streams: int = 1):
    """(sum over weighted positions of -log p(target), sum of weights) for one [b, T] batch.
    fused: the fused LM-head + cross-entropy (`fused_xent`, no [b, T, V] logits kept); else the
    plain `model.logits` + logsumexp (reference). streams: the model runs on that many independent
    row slices (the same sums; on CPU their ops overlap across cores, filling the idle time of one
    chain); the loss then runs once on all rows (its matmuls are large enough to use every core)."""
    b = batch["tokens"].shape[0]
    rows = [slice(i * b // streams, (i + 1) * b // streams) for i in range(streams)]
    hs = [M.apply(params, cfg, batch["tokens"][r], batch["pos"][r], remat=remat)[0] for r in rows]
    h = hs[0] if streams == 1 else jnp.concatenate(hs, axis=0)
    w = batch["weights"]
    if fused:
        w_VxE = params.embed if params.lm_head is None else params.lm_head
        nll = fused_xent(h, w_VxE.astype(h.dtype), batch["targets"], w, chunk_tokens, cfg.final_softcap)
        return nll, jnp.sum(w)
    lg = M.logits(params, cfg, h)  # fp32 [b, T, V]
    lse = jax.nn.logsumexp(lg, axis=-1)
    tgt = jnp.take_along_axis(lg, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tgt) * w), jnp.sum(w)


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most (>= 1)."""
    d = max(1, min(n, at_most))
    while n % d:
        d -= 1
    return d


def _xent_chunks(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_tokens: int, softcap: float | None = None):
    """sum(weights * nll) and its gradients w.r.t. h and w, a chunk of positions at a time: logits
    [b*c, V] (fp32) exist for one chunk only; the gradient of the logits, (softmax - onehot) * w,
    is formed right away and multiplied into dh and dW (the loss is the step's only output, so the
    backward pass needs no logits).

    Only positions that carry loss are computed: each row's weighted positions are moved to its
    front (a stable sort along the row), and the loop stops after the longest row's count, in
    chunks of c positions and then a tail of c/8-position chunks. Prompt and padding positions
    cost no LM-head matmul (dh there is 0, as is their true gradient). The sort and the chunks
    run along the sequence, so the batch sharding stays. softcap: logits cap * tanh(logits / cap) (gemma2)."""
    B, T, E = h_BxTxE.shape
    V = w_VxE.shape[0]
    c = _divisor(T, chunk_tokens // max(B, 1))
    ct = _divisor(c, c // 8)
    order_BxT = jnp.argsort(weights_BxT == 0, axis=1, stable=True)  # weighted positions first
    h_s = jnp.take_along_axis(h_BxTxE, order_BxT[..., None], axis=1)
    t_s = jnp.take_along_axis(targets_BxT, order_BxT, axis=1)
    w_s = jnp.take_along_axis(weights_BxT.astype(jnp.float32), order_BxT, axis=1)
    live = jnp.max(jnp.sum(weights_BxT != 0, axis=1)).astype(jnp.int32)
    n_full = live // c
    n_tail = (live - n_full * c + ct - 1) // ct
    w_ExV = w_VxE.T  # one transpose per step: the logits matmul reads [E, V] in place

    def chunk(start, n, carry):
        dWt, dh_s, loss = carry
        h = jax.lax.dynamic_slice_in_dim(h_s, start, n, axis=1).reshape(B * n, E)
        t = jax.lax.dynamic_slice_in_dim(t_s, start, n, axis=1).reshape(B * n)
        w = jax.lax.dynamic_slice_in_dim(w_s, start, n, axis=1).reshape(B * n)
        lg = jnp.einsum("ne,ev->nv", h, w_ExV, preferred_element_type=jnp.float32)
        if softcap is not None:
            th = jnp.tanh(lg / softcap)
            lg = softcap * th
        m = jax.lax.stop_gradient(lg.max(-1, keepdims=True))
        e = jnp.exp(lg - m)
        s = e.sum(-1, keepdims=True)
        lse = jnp.log(s[:, 0]) + m[:, 0]
        hit = jax.lax.broadcasted_iota(jnp.int32, lg.shape, 1) == t[:, None]
        tgt = jnp.sum(jnp.where(hit, lg, 0.0), -1)
        loss = loss + jnp.sum(w * (lse - tgt))
        dlg = (e / s - hit.astype(jnp.float32)) * w[:, None]
        if softcap is not None:
            dlg = dlg * (1.0 - th * th)
        dlg = dlg.astype(h.dtype)
        dh = jnp.einsum("nv,ev->ne", dlg, w_ExV, preferred_element_type=jnp.float32)
        dh_s = jax.lax.dynamic_update_slice_in_dim(dh_s, dh.reshape(B, n, E), start, axis=1)
        dWt = dWt + jnp.einsum("nv,ne->ev", dlg, h, preferred_element_type=jnp.float32)
        return dWt, dh_s, loss

    carry = (jnp.zeros((E, V), jnp.float32), jnp.zeros((B, T, E), jnp.float32), jnp.zeros((), jnp.float32))
    carry = jax.lax.fori_loop(0, n_full, lambda i, cr: chunk(i * c, c, cr), carry)
    carry = jax.lax.fori_loop(0, n_tail, lambda i, cr: chunk(n_full * c + i * ct, ct, cr), carry)
    dWt, dh_s, loss = carry
    dh = jnp.take_along_axis(dh_s, jnp.argsort(order_BxT, axis=1)[..., None], axis=1)
    return loss, dh, dWt.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_xent(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_tokens, softcap):
    return _xent_chunks(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_tokens, softcap)[0]


def _fused_fwd(h, w, t, wt, chunk_tokens, softcap):
    loss, dh, dW = _xent_chunks(h, w, t, wt, chunk_tokens, softcap)
    return loss, (dh.astype(h.dtype), dW.astype(w.dtype))


def _fused_bwd(chunk_tokens, softcap, res, g):
    dh, dW = res
    return g.astype(dh.dtype) * dh, g.astype(dW.dtype) * dW, None, None


_fused_xent.defvjp(_fused_fwd, _fused_bwd)


def fused_xent(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_tokens: int = 512, softcap: float | None = None):
    """sum over positions of weights * -log softmax(h @ w.T)[target] (logits soft-capped when
    softcap), differentiable in h and w, without materialising the [B, T, V] logits (LM head and
    cross-entropy fused, chunked)."""
    return _fused_xent(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_tokens, softcap)


_STEP_CACHE: dict = {}


class Trainer:
    """The sharded train step for one model config, hyper-parameters and run length.

    state = TrainState(trainable, opt_state, step); `frozen` = the base Params under LoRA (in the
    compute dtype), else None. `step(state, frozen, batch)` donates `state`."""

    def __init__(self, cfg: M.Config, tcfg: TrainConfig, total_steps: int, mesh=None,
                 rules: M.ShardingRules = M.ShardingRules()):
        tcfg.validate()
        self.cfg = dataclasses.replace(cfg, dtype="float32")  # master parameters
        self.ccfg = dataclasses.replace(cfg, dtype=tcfg.dtype)  # compute
        self.tcfg, self.total_steps = tcfg, total_steps
        self.mesh = mesh if mesh is not None else MS.make_mesh(tcfg.mesh)
        self.rules = rules
        self.lora = tcfg.lora_rank > 0
        self.scale = tcfg.lora_alpha / tcfg.lora_rank if self.lora else 1.0
        self.schedule = lr_schedule(tcfg, total_steps)
        self.optimizer = make_optimizer(tcfg, total_steps)
        self.param_sh = M.param_shardings(self.cfg, self.mesh, rules)
        if self.lora:
            self.train_sh = L.lora_shardings(self.cfg, self.mesh, tcfg.lora_rank, tcfg.lora_targets, rules)
            specs = L.lora_specs(self.cfg, tcfg.lora_rank, tcfg.lora_targets)
            self.train_abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), specs,
                                               is_leaf=M.is_spec)
            self.frozen_sh = self.param_sh
        else:
            self.train_abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                                               M.param_specs(self.cfg), is_leaf=M.is_spec)
            self.train_sh, self.frozen_sh = self.param_sh, None
        self.opt_sh = _opt_shardings(self.optimizer, self.train_abstract, self.train_sh, self.mesh)
        self.rep = MS.replicated(self.mesh)
        self.state_sh = TrainState(self.train_sh, self.opt_sh, self.rep)
        self.batch_sh = {k: MS.batch_sharding(self.mesh, leading=1) for k in ("tokens", "pos", "targets", "weights")}
        self.micro_rows = -(-tcfg.batch_size // MS.batch_size_multiple(self.mesh)) * MS.batch_size_multiple(self.mesh)
        self.streams = tcfg.streams or (4 if self.mesh.devices.size == 1 and self.mesh.devices.flat[0].platform == "cpu"
                                        and self.micro_rows % 4 == 0 else 1)
        if self.micro_rows % self.streams:
            raise UserError(f"streams {self.streams} must divide the micro-batch rows {self.micro_rows}")
        # one compiled step per (model, settings, run length, mesh): Trainers that agree share it
        key = (self.cfg, self.ccfg, dataclasses.replace(tcfg, checkpoint_every=0, keep_checkpoints=2),
               total_steps, self.mesh, rules)
        self._step = _STEP_CACHE.pop(key, None)
        if self._step is None:
            self._step = jax.jit(self._train_step, in_shardings=(self.state_sh, self.frozen_sh, self.batch_sh),
                                 out_shardings=(self.state_sh, self.rep), donate_argnums=0)
        _STEP_CACHE[key] = self._step
        while len(_STEP_CACHE) > 4:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))

    # ---- state
    def init_state(self, params: M.Params, key=None, owned: bool = False) -> tuple[TrainState, M.Params | None]:
        """Train state from base params (placed on the mesh; fp32 masters, or the frozen base in the
        compute dtype under LoRA). owned: the caller gives `params` away, so fp32 arrays already on
        the right shardings become the (donated) state without a copy."""
        if self.lora:
            frozen = self.freeze(params, owned)
            key = jax.random.PRNGKey(self.tcfg.seed) if key is None else key
            trainable = jax.jit(lambda k: L.init_lora(self.cfg, k, self.tcfg.lora_rank, self.tcfg.lora_targets),
                                out_shardings=self.train_sh)(key)
        else:
            frozen = None
            placed = all(isinstance(x, jax.Array) and x.dtype == jnp.float32 and x.sharding == sh
                         for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(self.train_sh)))
            if owned and placed:
                trainable = params
            else:
                trainable = jax.jit(lambda p: _cast(p, jnp.float32), out_shardings=self.train_sh)(params)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_sh)(trainable)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.rep)
        return TrainState(trainable, opt_state, step), frozen

    def freeze(self, params: M.Params, owned: bool = False) -> M.Params:
        """The frozen LoRA base: params in the compute dtype, placed on the mesh (no copy when
        `owned` and already so)."""
        if owned and all(isinstance(x, jax.Array) and x.dtype == self.ccfg.jdtype and x.sharding == sh
                         for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(self.frozen_sh))):
            return params
        return jax.jit(lambda p: _cast(p, self.ccfg.jdtype), out_shardings=self.frozen_sh)(params)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings (the Orbax restore target)."""
        def sds(x, sh):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
        opt = jax.eval_shape(self.optimizer.init, self.train_abstract)
        return TrainState(jax.tree.map(sds, self.train_abstract, self.train_sh),
                          jax.tree.map(sds, opt, self.opt_sh),
                          jax.ShapeDtypeStruct((), jnp.int32, sharding=self.rep))

    # ---- compute
    def model_params(self, trainable, frozen) -> M.Params:
        """The parameters the model runs with (compute dtype): merged under LoRA."""
        if self.lora:
            return L.merge(frozen, trainable, self.scale, dtype=self.ccfg.jdtype)
        return _cast(trainable, self.ccfg.jdtype)

    def loss(self, trainable, frozen, mb):
        """(nll sum, weight sum) of one micro-batch (the model in `streams` row slices)."""
        return token_nll(self.model_params(trainable, frozen), self.ccfg, mb, self.tcfg.remat,
                         fused=self.tcfg.loss_chunk > 0, chunk_tokens=self.tcfg.loss_chunk, streams=self.streams)

    def _grads(self, trainable, frozen, batch):
        """Sum over micro-batches of (nll sum, d nll sum / d trainable)."""
        vg = jax.value_and_grad(self.loss, has_aux=True)
        A = batch["tokens"].shape[0]
        if A == 1:
            (l, _), g = vg(trainable, frozen, jax.tree.map(lambda x: x[0], batch))
            return l, g

        def body(carry, mb):
            gacc, lacc = carry
            (l, _), g = vg(trainable, frozen, mb)
            gacc = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, gacc, g), self.train_sh)
            return (gacc, lacc + l), None

        g0 = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, trainable), self.train_sh)
        (g, l), _ = jax.lax.scan(body, (g0, jnp.zeros((), jnp.float32)), batch)
        return l, g

    def _train_step(self, state: TrainState, frozen, batch):
        total = batch["weights"].sum()
        denom = jnp.maximum(total, 1.0)
        lsum, gsum = self._grads(state.params, frozen, batch)
        grads = jax.tree.map(lambda g: g / denom, gsum)
        loss = lsum / denom
        gnorm = optax.tree.norm(grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": gnorm, "lr": self.schedule(state.step), "tokens": total,
                   "inputs": (batch["pos"] >= 0).sum()}
        return TrainState(params, opt_state, state.step + 1), metrics

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: MS.put(v, self.batch_sh[k]) for k, v in batch.items()}

    def step(self, state: TrainState, frozen, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step (batch: numpy arrays from make_batch, or already placed arrays)."""
        if isinstance(batch["tokens"], np.ndarray):
            batch = self.put_batch(batch)
        return self._step(state, frozen, batch)

    def merged(self, state: TrainState, frozen) -> M.Params:
        """Full parameters for export: fp32 masters, or base + scale * B @ A (fp32) under LoRA."""
        if not self.lora:
            return state.params
        return jax.jit(lambda f, a: L.merge(_cast(f, jnp.float32), a, self.scale, dtype=jnp.float32),
                       out_shardings=self.param_sh)(frozen, state.params)


# ------------------------------------------------------------------------------------- checkpoints
def _manager(directory, tcfg: TrainConfig):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, tcfg.keep_checkpoints), create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=opts, item_names=("state", "meta"))


def _save(mngr, state: TrainState, meta: dict) -> None:
    import orbax.checkpoint as ocp

    mngr.save(int(meta["step"]), args=ocp.args.Composite(state=ocp.args.StandardSave(_as_dict(state)),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
    # asynchronous: arrays are copied to host before save() returns (the state may then be donated);
    # files are written in the background; `train` waits for them before it returns or raises


def _restore(mngr, trainer: Trainer, step: int) -> tuple[TrainState, dict]:
    import orbax.checkpoint as ocp

    target = _as_dict(trainer.abstract_state())
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     meta=ocp.args.JsonRestore()))
    return _from_dict(out["state"]), dict(out["meta"])


def _read_meta(mngr, step: int) -> dict:
    import orbax.checkpoint as ocp

    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


# ------------------------------------------------------------------------------------------ loop
def _is_main() -> bool:
    return jax.process_index() == 0


def _finite(x) -> bool:
    return bool(np.isfinite(x))


def train(cfg: M.Config, params: M.Params | None, enc: Encoded, tcfg: TrainConfig, *, mesh=None,
          checkpoint_dir=None, resume: bool = True, on_step: Callable[[int, dict], None] | None = None,
          progress: bool = True, stop_after: int | None = None, params_loader: Callable | None = None):
    """Run the SFT loop. Returns (state, frozen, trainer, history) where history is a list of
    per-step host metrics. `params` may be None when `params_loader(shardings, dtype)` is given (loaded only
    if needed: a full fine-tune resumed from a checkpoint does not need the base weights).
    stop_after: stop (without the final checkpoint) after this many steps in total (for tests)."""
    tcfg.validate()
    if len(enc) == 0:
        raise UserError("no training examples (every example lost its answer to truncation?)")
    spe = -(-len(enc) // tcfg.effective_batch)
    total = spe * tcfg.epochs
    trainer = Trainer(cfg, tcfg, total, mesh)
    fp = {"data": enc.fingerprint(), "n": len(enc), "config": tcfg.fingerprint_fields(), "family": cfg.family,
          "shape": [cfg.vocab_size, cfg.hidden, cfg.n_layers]}

    def get_params():
        if params is not None:
            return params
        return params_loader(trainer.param_sh, trainer.ccfg.dtype if trainer.lora else "float32")

    mngr = _manager(checkpoint_dir, tcfg) if checkpoint_dir is not None else None
    start, state, frozen = 0, None, None
    if mngr is not None and mngr.latest_step() is not None:
        latest = mngr.latest_step()
        meta = _read_meta(mngr, latest)
        if not resume:
            raise UserError(f"{checkpoint_dir}: holds checkpoints (step {latest}); remove it or resume")
        if meta.get("fingerprint") != json.loads(json.dumps(fp)):
            diff = [k for k in fp if meta.get("fingerprint", {}).get(k) != json.loads(json.dumps(fp[k]))]
            raise UserError(f"{checkpoint_dir}: its checkpoints are from a different run (differs in "
                            f"{', '.join(diff) or 'metadata'}); use another --checkpoint-dir or remove it")
        state, meta = _restore(mngr, trainer, latest)
        start = int(meta["step"])
        if trainer.lora:
            frozen = trainer.freeze(get_params(), owned=params is None)
        if _is_main():
            print(f"resumed from {checkpoint_dir} at step {start}/{total} "
                  f"(epoch {meta['epoch']}, batch {meta['batch_in_epoch']})", file=sys.stderr)
    else:
        state, frozen = trainer.init_state(get_params(), owned=params is None)

    def meta_for(step):
        return {"step": step, "epoch": step // spe, "batch_in_epoch": step % spe, "steps_per_epoch": spe,
                "total_steps": total, "fingerprint": fp}

    plans: dict[int, list] = {}

    def batch_for(step):
        e = step // spe
        if e not in plans:
            plans.clear()
            plans[e] = plan_epoch(enc.lengths, tcfg.effective_batch, tcfg.seed, e)
        return make_batch(enc, plans[e][step % spe], tcfg.grad_accum, trainer.micro_rows, tcfg.max_length,
                          tcfg.bucket)

    bar = None
    if progress and _is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    history: list[dict] = []
    pending: list = []
    t_last = [time.perf_counter()]
    last_saved = [start if mngr is not None and mngr.latest_step() is not None else None]

    def drain():
        """Read the metrics of dispatched steps (blocks on them); raise on a non-finite value."""
        while pending:
            s, m = pending.pop(0)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not (_finite(m["loss"]) and _finite(m["grad_norm"])):
                good = f"; last good checkpoint: {Path(checkpoint_dir) / str(last_saved[0])}" \
                    if last_saved[0] is not None and mngr is not None else " (no checkpoint was saved)"
                raise TrainingDiverged(f"loss {m['loss']} / grad norm {m['grad_norm']} at step {s + 1} of "
                                       f"{total} (epoch {s // spe}, batch {s % spe}){good}; "
                                       f"try a lower --lr or --dtype float32")
            now = time.perf_counter()
            m["step"] = s + 1
            m["seconds"] = now - t_last[0]
            t_last[0] = now
            history.append(m)
            if on_step is not None:
                on_step(s + 1, m)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                                tok_s=f"{m['inputs'] / max(m['seconds'], 1e-9):.0f}")

    try:
        end = total if stop_after is None else min(total, stop_after)
        for s in range(start, end):
            state, m = trainer.step(state, frozen, batch_for(s))
            # overlap: the next batch is built while this step runs; read the previous step's metrics
            drain()
            pending.append((s, m))
            if mngr is not None and tcfg.checkpoint_every and (s + 1) % tcfg.checkpoint_every == 0 and s + 1 < total:
                drain()  # never save past a non-finite step
                _save(mngr, state, meta_for(s + 1))
                last_saved[0] = s + 1
        drain()
        if mngr is not None and stop_after is None and last_saved[0] != total:
            _save(mngr, state, meta_for(total))
            last_saved[0] = total
    finally:
        if bar is not None:
            bar.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
    return state, frozen, trainer, history


# ------------------------------------------------------------------------------------------ export
class _Gathered:
    """A sharded array gathered to the host on first use (multi-host export)."""

    def __init__(self, x):
        self.x, self.shape, self.dtype = x, x.shape, x.dtype

    def __array__(self, dtype=None, copy=None):
        from jax.experimental import multihost_utils

        a = np.asarray(multihost_utils.process_allgather(self.x, tiled=True))
        return a if dtype is None else a.astype(dtype)


def export(out_dir, cfg: M.Config, params: M.Params, tokenizer_from=None, dtype: str | None = None,
           base_config: dict | None = None, overwrite: bool = False) -> Path:
    """`checkpoint.save`, multi-host aware: every process joins the per-tensor gathers, process 0
    writes."""
    if jax.process_count() == 1:
        return C.save(out_dir, cfg, params, tokenizer_from=tokenizer_from, dtype=dtype, base_config=base_config,
                      overwrite=overwrite)
    from jax.experimental import multihost_utils

    wrapped = jax.tree.map(_Gathered, params)
    if _is_main():
        C.save(out_dir, cfg, wrapped, tokenizer_from=tokenizer_from, dtype=dtype, base_config=base_config,
               overwrite=overwrite)
    else:
        for x in jax.tree.leaves(wrapped):
            np.asarray(x)
    multihost_utils.sync_global_devices("selfalign_export")
    return Path(out_dir)


def _export_dtype(raw: dict | None, fallback: str) -> str:
    d = (raw or {}).get("torch_dtype") or (raw or {}).get("dtype")
    return d if d in ("float32", "bfloat16", "float16") else fallback


def finetune(model, pairs: Sequence[Pair], tokenizer=None, out_dir=None, train_cfg: TrainConfig = TrainConfig(),
             template: Template = Template(), *, checkpoint_dir=None, resume: bool = True, mesh=None,
             export_dtype: str | None = None, base_config: dict | None = None, overwrite: bool = False,
             progress: bool = True, on_step: Callable | None = None, log: bool = True):
    """Fine-tune `model` (an HF directory, or (cfg, params)) on (question, answer) pairs and export
    an HF directory to `out_dir` (skipped when None). Returns (cfg, params): the trained full
    parameters (fp32 masters; LoRA merged), sharded on the training mesh.

    tokenizer: defaults to the model directory's. checkpoint_dir: Orbax train checkpoints (default
    `<out_dir>.ckpt` when out_dir is given); an existing run there with the same data and settings is
    resumed. export_dtype: default the source config's dtype (else float32)."""
    train_cfg.validate()
    model_dir = None
    if isinstance(model, (str, Path)):
        model_dir = Path(model)
        raw = C.read_config(model_dir)
        cfg = C.config_from_hf(raw, "float32", C._generation_eos(model_dir))
        base_config = base_config if base_config is not None else raw
        params = None
        if tokenizer is None:
            tokenizer = C.load_tokenizer(model_dir)
    else:
        cfg, params = model
        if tokenizer is None:
            raise UserError("finetune: pass a tokenizer with (cfg, params)")
    if out_dir is not None:
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory exists and is not empty: {out}")
        if checkpoint_dir is None:
            checkpoint_dir = out.with_name(out.name + ".ckpt")
    if template.kind == "chat" and template.tokenizer is None:
        template = dataclasses.replace(template, tokenizer=tokenizer)
    enc = encode_pairs(pairs, tokenizer, template, train_cfg.max_length, cfg=cfg)
    if log and _is_main():
        lens = enc.lengths
        msg = (f"{len(enc)} examples, {int(sum(t[1:].sum() for t in enc.target))} answer tokens, inputs "
               f"{int(lens.min()) if len(lens) else 0}-{int(lens.max()) if len(lens) else 0} tokens")
        if enc.truncated:
            msg += f"; {enc.truncated} truncated to {train_cfg.max_length}"
        if enc.dropped:
            msg += f"; {enc.dropped} dropped (prompt alone fills --max-length)"
        print(msg, file=sys.stderr)

    def loader(shardings, dtype):
        return C.load(model_dir, dtype=dtype, shardings=shardings)[1]

    state, frozen, trainer, history = train(cfg, params, enc, train_cfg, mesh=mesh, checkpoint_dir=checkpoint_dir,
                                            resume=resume, on_step=on_step, progress=progress,
                                            params_loader=loader if params is None else None)
    final = trainer.merged(state, frozen)
    if out_dir is not None:
        dt = export_dtype or _export_dtype(base_config, "float32")
        export(out_dir, cfg, final, tokenizer_from=model_dir if model_dir is not None else tokenizer, dtype=dt,
               base_config=base_config, overwrite=overwrite)
        if _is_main():
            summary = {"train_config": dataclasses.asdict(train_cfg), "examples": len(enc),
                       "truncated": enc.truncated, "dropped": enc.dropped, "steps": trainer.total_steps,
                       "mesh": dict(trainer.mesh.shape), "history": history}
            (Path(out_dir) / "selfalign_train.json").write_text(json.dumps(summary, indent=1) + "\n")
    return cfg, final
