"""Sharded supervised fine-tuning (ISARA step 5): answer-token loss, AdamW, warm-up + cosine,
gradient accumulation, optional LoRA, Orbax checkpoints with exact resume, HF export.

Data (`batching`): (question, answer) pairs rendered with the conversation template, EOS appended,
truncated to `max_length` model inputs; the loss weight is 1 on answer tokens (and the EOS) and 0 on the
prompt; batches in length buckets.

Loss (`loss`), `loss_norm="token"` (default): the token-weighted mean over the whole effective batch,
    loss = sum_{micro-batches, rows, positions} w * nll / sum w,
so `grad_accum` micro-batches of `batch_size` rows give the same gradient as one batch of
`batch_size * grad_accum` rows (up to float summation order); clipping and AdamW see that mean.
`loss_norm="sequence"` (the authors'): each row's answer-token nll sum / its micro-batch's padded length
(longest row), mean over the micro-batch's rows, mean over the step's micro-batches (`sequence_weights`:
folded into the loss weights on the host, so the fused loss, the streams and the accumulation are unchanged).
It depends on the micro-batch split: the authors' 4 x 8 is `batch_size=4, grad_accum=8`.

Sharding: a ('data', 'fsdp', 'tensor') mesh (`mesh.make_mesh`); parameters, adapters and optimizer
state are placed by the logical-axis rules of `model.ShardingRules` (optimizer moments inherit
their parameter's sharding), micro-batches are split over data x fsdp. A step is jitted functions
with explicit in/out shardings: `accum` per micro-batch [b, T] (into a zeroed running sum, donated;
`grads` alone when grad_accum is 1) and `update` (the train state donated), dispatched without waiting,
so a step's memory is one micro-batch's activations and one compile serves every A (micro-batches a
step) of a length bucket. `train` compiles the micro-batch shapes of the first epoch's steps
(`Trainer.compile`, from abstract inputs) before the state exists.

Compiles: the step is built by `_make_step(StepSpec)`, cached on everything static (model config,
optimizer constants, LoRA, mesh); the learning-rate schedule's peak, warm-up and length enter the step
as traced scalars. So every Trainer of a process that agrees on the StepSpec (every ISARA iteration and
every baseline of a run) shares one compile per micro-batch shape.

Checkpoints: an Orbax CheckpointManager under `checkpoint_dir` holds {params or adapters,
optimizer state, step} plus JSON metadata (data position, fingerprint of the data and
hyper-parameters). A run restarted with the same data and settings resumes from the latest
checkpoint and ends with the same parameters as an uninterrupted run. A non-finite loss or gradient
norm stops training with `TrainingDiverged`; states after it are never saved.

Public API:
    TrainConfig (selfalign_jax.core.settings)                 hyper-parameters (paper defaults)
    lr_schedule(tcfg, total_steps), make_optimizer(tcfg)
    Trainer(cfg, tcfg, total_steps, mesh)                .compile / .init_state / .step / .merged / .loss
    fit_memory(cfg, tcfg, mesh) -> (tcfg, line)              auto_fit: the micro-batch / remat a step runs with
    train(cfg, params, enc, tcfg, ...) -> (state, frozen, trainer, history)
    finetune(model, pairs, tokenizer, out_dir, tcfg, template, ...) -> LoadedModel
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from selfalign_jax.core import checkpoint, fileio, hostmem, lora
from selfalign_jax.core import mesh as meshlib
from selfalign_jax.core import plan as planlib
from selfalign_jax.core import model as M
from selfalign_jax.core.batching import Encoded, Pair, encode_pairs, make_batch, plan_epoch
from selfalign_jax.core.settings import TrainConfig
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.loaded import LoadedModel
from selfalign_jax.core.loss import token_nll
from selfalign_jax.core.template import Template


BATCH_KEYS = ("tokens", "pos", "targets", "weights")


class TrainingDiverged(UserError):
    """Loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------- optimizer
def warmup_steps(tcfg: TrainConfig, total_steps: int) -> int:
    """floor(ratio * total), as the authors' safe-rlhf (`int(...)`): a short SFT (< 1 / ratio steps) has no
    warm-up, so its first update runs at the peak rate (HF Trainer's ceil would make it an lr-0 step)."""
    return int(math.floor(tcfg.warmup_ratio * total_steps + 1e-9))


def schedule_lr(kind: str, step, peak, warmup, total):
    """HF-style: linear warm-up from 0 over `warmup` steps, then cosine (or linear) to 0 at `total`;
    `constant` holds the peak after warm-up. Every argument but `kind` may be traced."""
    s = jnp.asarray(step, jnp.float32)
    w = jnp.asarray(warmup, jnp.float32)
    warm = s / jnp.maximum(1.0, w)
    prog = jnp.clip((s - w) / jnp.maximum(1.0, total - w), 0.0, 1.0)
    if kind == "cosine":
        decay = 0.5 * (1.0 + jnp.cos(jnp.pi * prog))
    elif kind == "linear":
        decay = 1.0 - prog
    else:
        decay = jnp.ones_like(prog)
    return peak * jnp.where(s < w, warm, decay)


def lr_schedule(tcfg: TrainConfig, total_steps: int) -> Callable:
    """step -> learning rate of a run of `total_steps` steps (warm-up floor(ratio * total) steps)."""
    return functools.partial(_schedule_at, tcfg.schedule, peak=tcfg.lr, warmup=warmup_steps(tcfg, total_steps),
                             total=total_steps)


def _schedule_at(kind, step, *, peak, warmup, total):
    return schedule_lr(kind, step, peak, warmup, total)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW without its learning rate (decay on matrices only): the step scales
    the update by -lr(step), so the schedule's numbers are traced, not compiled in."""
    mask = (lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)) if tcfg.weight_decay else None
    adamw = optax.chain(optax.scale_by_adam(b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps),
                        optax.add_decayed_weights(tcfg.weight_decay, mask))
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
    rep = meshlib.replicated(mesh)

    def pick(path, leaf):
        path = tuple(path)
        for k in range(len(path)):
            hit = by_path.get(path[k:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, state)


def sequence_weights(w_AxBxT: np.ndarray, pos_AxBxT: np.ndarray) -> np.ndarray:
    """Loss weights that make sum(w' * nll) the authors' loss (safe-rlhf `SupervisedFinetuneTrainer`:
    per row, the nll summed over answer tokens / (padded length - 1), mean over the rows, and DeepSpeed's
    mean over the accumulated micro-batches). Per micro-batch a: w / (L_a * rows_a * A') with L_a its
    longest row's inputs (the authors pad each micro-batch to its longest), rows_a its non-empty rows and
    A' the step's non-empty micro-batches (a short last step counts only the rows it has). Host arrays."""
    n_AxB = np.sum(pos_AxBxT >= 0, axis=-1)
    L_A = np.max(n_AxB, axis=-1).astype(np.float32)
    rows_A = np.sum(n_AxB > 0, axis=-1).astype(np.float32)
    live = max(float(np.sum(rows_A > 0)), 1.0)
    scale_A = 1.0 / (np.maximum(L_A, 1.0) * np.maximum(rows_A, 1.0) * live)
    return (w_AxBxT * scale_A[:, None, None]).astype(np.float32)


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


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ------------------------------------------------------------------------------------------- step
@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static the compiled train step depends on (besides batch shapes): the key of
    `_make_step`. Learning rate, run length, seed and data are not in it."""

    cfg: M.Config  # master parameters (float32)
    compute_dtype: str
    tcfg: TrainConfig  # with the traced / host-only fields reset (see `of`)
    streams: int
    mesh: Mesh
    rules: M.ShardingRules

    @classmethod
    def of(cls, cfg: M.Config, tcfg: TrainConfig, streams: int, mesh: Mesh, rules: M.ShardingRules) -> "StepSpec":
        static = dataclasses.replace(tcfg, lr=TrainConfig.lr, warmup_ratio=TrainConfig.warmup_ratio,
                                     auto_fit=TrainConfig.auto_fit, memory_gib=TrainConfig.memory_gib,
                                     seed=0, epochs=1, max_length=TrainConfig.max_length, bucket=TrainConfig.bucket,
                                     batch_size=TrainConfig.batch_size, grad_accum=TrainConfig.grad_accum,
                                     checkpoint_every=0, keep_checkpoints=2, mesh=None, dtype=tcfg.dtype,
                                     packing=TrainConfig.packing)
        return cls(dataclasses.replace(cfg, dtype="float32"), meshlib.compute_dtype(tcfg.dtype), static, streams,
                   mesh, rules)


class StepFns:
    """The shardings, optimizer and jitted functions of one StepSpec (built once by `_make_step`)."""

    def __init__(self, spec: StepSpec):
        self.spec = spec
        tcfg, mesh, rules = spec.tcfg, spec.mesh, spec.rules
        self.cfg = spec.cfg
        self.compute_cfg = dataclasses.replace(spec.cfg, dtype=spec.compute_dtype)
        self.lora = tcfg.lora_rank > 0
        self.scale = tcfg.lora_alpha / tcfg.lora_rank if self.lora else 1.0
        # a full fp32 fine-tune with remat and one stream adds the layers' gradient into the running sum inside the
        # backward scan (no second gradient-sized buffer)
        self.into = not self.lora and tcfg.remat and spec.streams == 1 and spec.compute_dtype == "float32"
        # XLA:CPU with several devices: collectives inside the layer loop's body can deadlock (its devices' threads
        # reach them in different orders), so the layer scan runs unrolled there
        self.unroll = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
        self.optimizer = make_optimizer(tcfg)
        self.param_sh = M.param_shardings(self.cfg, mesh, rules)
        if self.lora:
            self.train_sh = lora.lora_shardings(self.cfg, mesh, tcfg.lora_rank, tcfg.lora_targets, rules)
            specs = lora.lora_specs(self.cfg, tcfg.lora_rank, tcfg.lora_targets)
            self.frozen_sh = self.param_sh
        else:  # full fine-tune: the masters (and moments) hold the layers stacked, which the model scans over
            specs = M.stack_specs(M.param_specs(self.cfg))
            self.train_sh, self.frozen_sh = M.param_shardings(self.cfg, mesh, rules, stacked=True), None
        self.train_abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), specs,
                                           is_leaf=M.is_spec)
        self.opt_sh = _opt_shardings(self.optimizer, self.train_abstract, self.train_sh, mesh)
        self.rep = meshlib.replicated(mesh)
        self.state_sh = TrainState(self.train_sh, self.opt_sh, self.rep)
        self.batch_sh = {k: meshlib.batch_sharding(mesh) for k in BATCH_KEYS}  # one micro-batch [b, T]
        self.sched_sh = {k: self.rep for k in ("peak", "warmup", "total")}
        acc_sh = (self.rep, self.train_sh)
        self.grads = jax.jit(self._grads, in_shardings=(self.train_sh, self.frozen_sh, self.batch_sh),
                             out_shardings=acc_sh)
        self.accum = jax.jit(self._accum, in_shardings=(self.train_sh, self.frozen_sh, self.batch_sh, acc_sh),
                             out_shardings=acc_sh, donate_argnums=3)
        self.zeros = jax.jit(lambda: (jnp.zeros((), jnp.float32), jax.tree.map(
            lambda a: jnp.zeros(a.shape, a.dtype), self.train_abstract)), out_shardings=acc_sh)
        self.update = jax.jit(self._update, in_shardings=(self.state_sh, acc_sh, self.rep, self.sched_sh),
                              out_shardings=(self.state_sh, self.rep), donate_argnums=0)
        self.opt_init = jax.jit(self.optimizer.init, out_shardings=self.opt_sh)
        self.to_master = jax.jit(lambda p: M.stack_layers(_cast(p, jnp.float32)), out_shardings=self.train_sh)
        self.unstack = jax.jit(M.unstack_layers, out_shardings=self.param_sh)
        self.to_frozen = jax.jit(lambda p: _cast(p, self.compute_cfg.jdtype), out_shardings=self.frozen_sh)
        self.init_lora = jax.jit(lambda k: lora.init_lora(self.cfg, k, tcfg.lora_rank, tcfg.lora_targets),
                                 out_shardings=self.train_sh) if self.lora else None
        self.merge = jax.jit(lambda f, a: lora.merge(_cast(f, jnp.float32), a, self.scale, dtype=jnp.float32),
                             out_shardings=self.param_sh) if self.lora else None
        self.traced_shapes: list[tuple] = []  # (function, micro-batch shape) traced (tests count compiles)

    def model_params(self, trainable, frozen) -> M.Params:
        """The parameters the model runs with (compute dtype, layers stacked): merged under LoRA."""
        if self.lora:
            return M.stack_layers(lora.merge(frozen, trainable, self.scale, dtype=self.compute_cfg.jdtype))
        return _cast(trainable, self.compute_cfg.jdtype)

    def loss(self, trainable, frozen, mb, grad_into=None):
        """(nll sum, weight sum) of one micro-batch (the model in `streams` row slices)."""
        t = self.spec.tcfg
        return token_nll(self.model_params(trainable, frozen), self.compute_cfg, mb, t.remat,
                         fused=t.loss_chunk > 0, chunk_tokens=t.loss_chunk, streams=self.spec.streams,
                         grad_into=grad_into, unroll=self.unroll)

    def _grads(self, trainable, frozen, mb):
        """(nll sum, d nll sum / d trainable) of one micro-batch [b, T]."""
        self.traced_shapes.append(("grads", tuple(mb["tokens"].shape)))
        return self._value_grad(trainable, frozen, mb)

    def _value_grad(self, trainable, frozen, mb, *into):
        """(nll sum, gradient) of one micro-batch; `into`: the running layer gradients the backward adds into."""
        (l, _), g = jax.value_and_grad(self.loss, has_aux=True)(trainable, frozen, mb, *into)
        return l, g

    def _accum(self, trainable, frozen, mb, acc):
        """acc + this micro-batch's (nll sum, gradient); acc is donated, so the sum is written in place. With
        `into` the backward scan adds each layer's gradient into the sum itself (`model.apply` grad_into)."""
        self.traced_shapes.append(("accum", tuple(mb["tokens"].shape)))
        lacc, gacc = acc
        if not self.into:
            l, g = self._value_grad(trainable, frozen, mb)
            return lacc + l, jax.tree.map(jnp.add, gacc, g)
        l, g = self._value_grad(trainable, frozen, mb, gacc.layers)
        rest = jax.tree.map(jnp.add, dataclasses.replace(gacc, layers=None), dataclasses.replace(g, layers=None))
        return lacc + l, dataclasses.replace(rest, layers=g.layers)

    def _update(self, state: TrainState, acc, counts, sched):
        """The optimizer step from the summed (nll, gradient) of a step's micro-batches. counts: [weight sum
        (answer tokens), model inputs, loss denominator] of the whole step."""
        lsum, gsum = acc
        denom = counts[2]
        grads = jax.tree.map(lambda g: g / denom, gsum)
        gnorm = optax.tree.norm(grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        lr = schedule_lr(self.spec.tcfg.schedule, state.step, sched["peak"], sched["warmup"], sched["total"])
        updates = jax.tree.map(lambda u: (-lr).astype(u.dtype) * u, updates)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": lsum / denom, "grad_norm": gnorm, "lr": lr, "tokens": counts[0], "inputs": counts[1]}
        return TrainState(params, opt_state, state.step + 1), metrics


@functools.lru_cache(maxsize=8)
def _make_step(spec: StepSpec) -> StepFns:
    """The jitted step (and its init / merge functions) for `spec`; Trainers that agree share them."""
    return StepFns(spec)


class Trainer:
    """The sharded train step for one model config, hyper-parameters and run length.

    state = TrainState(trainable, opt_state, step); `frozen` = the base Params under LoRA (in the
    compute dtype), else None. `step(state, frozen, batch)` donates `state`."""

    def __init__(self, cfg: M.Config, tcfg: TrainConfig, total_steps: int, mesh=None,
                 rules: M.ShardingRules = M.ShardingRules()):
        self.tcfg, self.total_steps = tcfg, total_steps
        self.mesh = mesh if mesh is not None else meshlib.make_mesh(tcfg.mesh)
        mult = meshlib.batch_size_multiple(self.mesh)
        self.micro_rows = -(-tcfg.batch_size // mult) * mult
        self.streams = tcfg.streams
        if self.micro_rows % self.streams:
            raise UserError(f"streams {self.streams} must divide the micro-batch rows {self.micro_rows}")
        self.fns = _make_step(StepSpec.of(cfg, tcfg, self.streams, self.mesh, rules))
        f = self.fns
        self.cfg, self.compute_cfg, self.lora, self.scale = f.cfg, f.compute_cfg, f.lora, f.scale
        self.optimizer, self.param_sh, self.train_sh, self.frozen_sh = f.optimizer, f.param_sh, f.train_sh, f.frozen_sh
        self.opt_sh, self.rep, self.state_sh, self.batch_sh = f.opt_sh, f.rep, f.state_sh, f.batch_sh
        self.schedule = lr_schedule(tcfg, total_steps)
        self.sched = {k: jax.device_put(jnp.asarray(v, jnp.float32), self.rep) for k, v in
                      (("peak", tcfg.lr), ("warmup", warmup_steps(tcfg, total_steps)), ("total", total_steps))}

    # ---- state
    def init_state(self, params: M.Params, key=None, owned: bool = False) -> tuple[TrainState, M.Params | None]:
        """Train state from base params (placed on the mesh; fp32 masters, or the frozen base in the
        compute dtype under LoRA). owned: the caller gives `params` away, so fp32 arrays already stacked on
        the right shardings become the (donated) state without a copy."""
        if self.lora:
            frozen = self.freeze(params, owned)
            key = jax.random.PRNGKey(self.tcfg.seed) if key is None else key
            trainable = self.fns.init_lora(key)
        else:
            frozen = None
            placed = isinstance(params.layers, M.Layer) and all(
                isinstance(x, jax.Array) and x.dtype == jnp.float32 and x.sharding == sh
                for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(self.train_sh)))
            trainable = params if owned and placed else self.fns.to_master(params)
        opt_state = self.fns.opt_init(trainable)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.rep)
        return TrainState(trainable, opt_state, step), frozen

    def freeze(self, params: M.Params, owned: bool = False) -> M.Params:
        """The frozen LoRA base: params in the compute dtype, placed on the mesh (no copy when
        `owned` and already so)."""
        if owned and all(isinstance(x, jax.Array) and x.dtype == self.compute_cfg.jdtype and x.sharding == sh
                         for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(self.frozen_sh))):
            return params
        return self.fns.to_frozen(params)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings (the Orbax restore target)."""
        def sds(x, sh):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
        opt = jax.eval_shape(self.optimizer.init, self.fns.train_abstract)
        return TrainState(jax.tree.map(sds, self.fns.train_abstract, self.train_sh),
                          jax.tree.map(sds, opt, self.opt_sh),
                          jax.ShapeDtypeStruct((), jnp.int32, sharding=self.rep))

    # ---- compute
    def model_params(self, trainable, frozen) -> M.Params:
        return self.fns.model_params(trainable, frozen)

    def loss(self, trainable, frozen, mb):
        return self.fns.loss(trainable, frozen, mb)

    def _host_batch(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(the batch's arrays with the loss weights as the step uses them, counts [weight sum, inputs, loss
        denominator])."""
        batch = {k: np.asarray(batch[k]) for k in BATCH_KEYS}
        total = float(batch["weights"].sum())
        denom = max(total, 1.0)
        if self.tcfg.loss_norm == "sequence":
            batch["weights"], denom = sequence_weights(batch["weights"], batch["pos"]), 1.0
        return batch, np.array([total, (batch["pos"] >= 0).sum(), denom], np.float32)

    def compile(self, batches: Iterable[dict[str, np.ndarray]]) -> None:
        """Compile the step for the micro-batch shapes of `batches` (from make_batch, read one at a time) from
        abstract inputs, before any train state exists: the compiler's heap can go back to the kernel
        (hostmem.release) before the state and the step's temporaries take their memory, and `step` then finds
        the executables compiled. The update, whose inputs do not depend on the micro-batch shape, compiles once."""
        def sds(x, sh):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
        mbs: dict[tuple, dict[str, jax.ShapeDtypeStruct]] = {}  # one abstract micro-batch per distinct shape
        for batch in batches:
            if batch["tokens"].shape[1:] not in mbs:
                host = self._host_batch(batch)[0]
                mbs[batch["tokens"].shape[1:]] = {k: sds(host[k][0], self.batch_sh[k]) for k in BATCH_KEYS}
        if not mbs:
            return
        state = self.abstract_state()
        frozen = None
        if self.lora:
            frozen = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, self.compute_cfg.jdtype, sharding=sh),
                                  M.param_specs(self.cfg), self.frozen_sh, is_leaf=M.is_spec)
        acc = (jax.ShapeDtypeStruct((), jnp.float32, sharding=self.rep),
               jax.tree.map(sds, self.fns.train_abstract, self.train_sh))
        for mb in mbs.values():
            if self.tcfg.grad_accum == 1:
                self.fns.grads.lower(state.params, frozen, mb).compile()
            else:
                self.fns.accum.lower(state.params, frozen, mb, acc).compile()
        if self.tcfg.grad_accum != 1:
            self.fns.zeros.lower().compile()
        sched = {k: sds(v, self.rep) for k, v in self.sched.items()}
        counts = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=self.rep)
        self.fns.update.lower(state, acc, counts, sched).compile()

    def step(self, state: TrainState, frozen, batch: dict[str, np.ndarray]) -> tuple[TrainState, dict]:
        """One optimizer step on a batch [A, b, T] from make_batch (host arrays): the micro-batches are
        dispatched one by one (one compile per micro-batch shape, whatever A is), their nll and gradient
        summed on the device, then one update. Nothing here blocks on the device. Donates `state`."""
        batch, counts = self._host_batch(batch)
        counts = meshlib.put(counts, self.rep)
        # grad_accum 1: the gradient alone (no second gradient-sized buffer); else every micro-batch adds into a
        # zeroed sum, so one function compiles per length bucket (a step of one micro-batch included)
        acc = None if self.tcfg.grad_accum == 1 else self.fns.zeros()
        for a in range(batch["weights"].shape[0]):
            mb = {k: meshlib.put(batch[k][a], self.batch_sh[k]) for k in BATCH_KEYS}
            acc = self.fns.grads(state.params, frozen, mb) if acc is None else \
                self.fns.accum(state.params, frozen, mb, acc)
        return self.fns.update(state, acc, counts, self.sched)

    def merged(self, state: TrainState, frozen) -> M.Params:
        """Full per-layer parameters for export: the fp32 masters (a copy, unstacked), or base + scale * B @ A
        (fp32) under LoRA."""
        return self.fns.merge(frozen, state.params) if self.lora else self.fns.unstack(state.params)


# ------------------------------------------------------------------------------------- checkpoints
def _manager(directory, tcfg: TrainConfig):
    opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, tcfg.keep_checkpoints), create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=opts, item_names=("state", "meta"))


class _QuietAfterDiskError(logging.Filter):
    """Drops Orbax's (absl's, asyncio's) error records once one says the disk is full or read-only:
    the failure reaches the caller as one line, not as a wall of background-thread tracebacks."""

    tripped = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.tripped and record.levelno >= logging.ERROR:
            text = record.getMessage() + (f" {record.exc_info[1]}" if record.exc_info else "")
            self.tripped = fileio.disk_error_text(text, "") is not None
        return not (self.tripped and record.levelno >= logging.ERROR)


@contextlib.contextmanager
def orbax_disk_errors(directory):
    """A full / read-only filesystem under `directory` during Orbax saves: UserError
    "no space left on device writing DIR". Once a save fails, late reports are dropped: Orbax's error
    log records, and the "RuntimeError: Event loop is closed" that each of TensorStore's threads reports
    (through sys.unraisablehook) when it calls back into Orbax's closed event loop, often before the
    failure reaches this frame, so that hook is on for the whole block."""
    flt = _QuietAfterDiskError()
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio")]
    for lg in loggers:
        lg.addFilter(flt)
    prev_hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_drop_closed_loop_error, prev_hook)
    failed = False
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        err = fileio.disk_error_text(str(e), directory)
        if err is None:
            raise
        failed = True
        # Orbax's unfinished writes are garbage-collected at exit: "coroutine ... was never awaited"
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        raise err from None
    finally:
        if not (flt.tripped or failed):  # after a failure the late reports keep coming: keep both on
            for lg in loggers:
                lg.removeFilter(flt)
            sys.unraisablehook = prev_hook


def _drop_closed_loop_error(prev, unraisable) -> None:
    if not (type(unraisable.exc_value) is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
        prev(unraisable)


def _save(mngr, state: TrainState, meta: dict) -> None:
    mngr.save(int(meta["step"]), args=ocp.args.Composite(state=ocp.args.StandardSave(_as_dict(state)),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
    # asynchronous: arrays are copied to host before save() returns (the state may then be donated);
    # files are written in the background; `train` waits for them before it returns or raises


def _restore(mngr, trainer: Trainer, step: int) -> tuple[TrainState, dict]:
    target = _as_dict(trainer.abstract_state())
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     meta=ocp.args.JsonRestore()))
    return _from_dict(out["state"]), dict(out["meta"])


def _read_meta(mngr, step: int) -> dict:
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


# ------------------------------------------------------------------------------------ memory fit
CPU_MICRO_ROWS = 4  # on a CPU, micro-batches of more rows are no faster and take more memory (fit_memory)


def memory_at_hand(device) -> tuple[int, str] | None:
    """(bytes, what they are) a step may use on `device`: its memory limit on an accelerator; on a CPU the host
    RAM available plus what this process holds now (it holds the model the plan counts). None where unknown."""
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return (int(stats["bytes_limit"]), f"{device.device_kind} memory") if stats.get("bytes_limit") else None
    avail = hostmem.available_bytes()
    return (avail + hostmem.rss_bytes(), "host RAM available") if avail is not None else None


def _per_device(at_hand: tuple[int, str] | None, mesh: Mesh) -> tuple[int, str] | None:
    """A CPU's host RAM is shared by its devices (XLA's host platform with several devices): its share."""
    n = mesh.devices.size
    if at_hand is None or n == 1 or mesh.devices.flat[0].platform != "cpu":
        return at_hand
    return at_hand[0] // n, f"{at_hand[1]} / {n} devices"


def fit_memory(cfg: M.Config, tcfg: TrainConfig, mesh: Mesh) -> tuple[TrainConfig, str | None]:
    """auto_fit: the settings a step runs with and one line saying why (None when auto_fit is off). The planner
    (core/plan.py fit_train) takes the largest micro-batch, a divisor of batch_size, that fits HEADROOM of the
    budget (memory_gib, else the memory at hand) with grad_accum raised so the effective batch stays, and remat
    only where no micro-batch fits without it. On a CPU remat is always on and micro-batches hold at most
    CPU_MICRO_ROWS rows: the layers run as one scanned layer, so the backward recomputes one layer at a time, and
    on XLA:CPU that costs little time (SmolLM2-135M, the real demo's SFT, 4 x 256 micro-batches on 2 cores: 230 s
    and 4.15 GiB peak RSS with remat, 220 s and 6.0 GiB without; 16-row micro-batches with remat: 246 s, 4.46 GiB;
    docs/benchmarks.md). With loss_norm "sequence" the split is part of the loss: only remat may change."""
    if not tcfg.auto_fit:
        return tcfg, None
    dev = mesh.devices.flat[0]
    at_hand = (int(tcfg.memory_gib * planlib.GIB), "--memory-gib") if tcfg.memory_gib else \
        _per_device(memory_at_hand(dev), mesh)
    cpu = dev.platform == "cpu"
    ts = planlib.TrainSettings(batch_size=tcfg.batch_size, max_length=tcfg.max_length,
                               dtype=meshlib.compute_dtype(tcfg.dtype), lora_rank=tcfg.lora_rank,
                               lora_targets=tuple(tcfg.lora_targets), remat=tcfg.remat or cpu,
                               grad_accum=tcfg.grad_accum, loss_chunk=tcfg.loss_chunk)
    sizes = {k: int(v) for k, v in mesh.shape.items()}
    budget = int(planlib.HEADROOM * at_hand[0]) if at_hand else 1 << 62
    got = planlib.fit_train(cfg, ts, sizes, budget, split=tcfg.loss_norm == "token",
                            max_rows=CPU_MICRO_ROWS if cpu else None)
    out = dataclasses.replace(tcfg, batch_size=got.batch_size, grad_accum=got.grad_accum, remat=got.remat)
    need = planlib.train_bytes(cfg, got, sizes)["total"]
    why = [f"plan {need / planlib.GIB:.2f} GiB per device"
           + (f" of {budget / planlib.GIB:.2f} GiB usable ({planlib.HEADROOM:.0%} of {at_hand[1]})" if at_hand else "")]
    if need > budget:
        why.append("does not fit even so")
    if cpu and got.batch_size < tcfg.batch_size and got.batch_size == CPU_MICRO_ROWS:
        why.append(f"on a CPU at most {CPU_MICRO_ROWS} rows a micro-batch (no slower, less memory)")
    line = (f"micro-batch {got.batch_size} x {got.grad_accum} (of {tcfg.batch_size} x {tcfg.grad_accum}, effective "
            f"batch {tcfg.effective_batch}), remat {'on' if got.remat else 'off'}: {'; '.join(why)}")
    return out, line


# ------------------------------------------------------------------------------------------ loop
def _finite(x) -> bool:
    return bool(np.isfinite(x))


def train(cfg: M.Config, params: M.Params | None, enc: Encoded, tcfg: TrainConfig, *, mesh=None,
          checkpoint_dir=None, resume: bool = True, on_step: Callable[[int, dict], None] | None = None,
          progress: bool = True, stop_after: int | None = None, params_loader: Callable | None = None):
    """Run the SFT loop. Returns (state, frozen, trainer, history) where history is a list of
    per-step host metrics. `params` may be None when `params_loader(shardings, dtype)` is given (loaded only
    if needed: a full fine-tune resumed from a checkpoint does not need the base weights).
    stop_after: stop (without the final checkpoint) after this many steps in total (for tests)."""
    if len(enc) == 0:
        raise UserError("no training examples (every example lost its answer to truncation?)")
    spe = -(-len(enc) // tcfg.effective_batch)
    total = spe * tcfg.epochs
    # the fingerprint holds the settings as asked: a resume on a machine with other memory fits them anew
    fp = {"data": enc.fingerprint(), "n": len(enc), "config": tcfg.fingerprint_fields(), "family": cfg.family,
          "shape": [cfg.vocab_size, cfg.hidden, cfg.n_layers]}
    mesh = mesh if mesh is not None else meshlib.make_mesh(tcfg.mesh)
    tcfg, fitted = fit_memory(cfg, tcfg, mesh)
    if fitted and meshlib.is_writer():
        print(f"finetune: {fitted}", file=sys.stderr)
    trainer = Trainer(cfg, tcfg, total, mesh)

    def get_params():
        if params is not None:
            return params
        return params_loader(trainer.param_sh, trainer.compute_cfg.dtype if trainer.lora else "float32")

    def meta_for(step):
        return {"step": step, "epoch": step // spe, "batch_in_epoch": step % spe, "steps_per_epoch": spe,
                "total_steps": total, "fingerprint": fp}

    plans: dict[int, list] = {}

    def batch_for(step):
        e = step // spe
        if e not in plans:
            plans.clear()
            plans[e] = plan_epoch(enc.lengths, tcfg.effective_batch, tcfg.seed, e, tcfg.length_grouping)
        return make_batch(enc, plans[e][step % spe], tcfg.grad_accum, trainer.micro_rows, tcfg.max_length,
                          tcfg.bucket, pack=tcfg.packing and tcfg.loss_norm == "token")

    def compile_first(step):
        """The micro-batch shapes of the next epoch's steps compiled before the state exists, then the
        compiler's heap back to the kernel (a shape compiled mid-run adds its heap to the state's memory)."""
        trainer.compile(batch_for(s) for s in range(step, min(total, step + spe)))
        hostmem.release()

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
        start = int(meta["step"])
        compile_first(start)
        state, meta = _restore(mngr, trainer, latest)
        if trainer.lora:
            frozen = trainer.freeze(get_params(), owned=params is None)
        if meshlib.is_writer():
            print(f"resumed from {checkpoint_dir} at step {start}/{total} "
                  f"(epoch {meta['epoch']}, batch {meta['batch_in_epoch']})", file=sys.stderr)
    else:
        compile_first(0)
        state, frozen = trainer.init_state(get_params(), owned=params is None)

    bar = None
    if progress and meshlib.is_writer():
        bar = tqdm(total=total, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    history: list[dict] = []
    pending: list = []
    t_last = [time.perf_counter()]
    last_saved = [start if mngr is not None and mngr.latest_step() is not None else None]
    compiled = [len(trainer.fns.traced_shapes)]

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
            if len(trainer.fns.traced_shapes) != compiled[0]:  # a new batch shape compiled: its heap back to the
                compiled[0] = len(trainer.fns.traced_shapes)    # kernel (core/hostmem.py release)
                hostmem.release()
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
        a = np.asarray(multihost_utils.process_allgather(self.x, tiled=True))
        return a if dtype is None else a.astype(dtype)


def export(out_dir, cfg: M.Config, params: M.Params, tokenizer_from=None, dtype: str | None = None,
           base_config: dict | None = None, overwrite: bool = False) -> Path:
    """`checkpoint.save`, multi-host aware: every process joins the per-tensor gathers, process 0
    writes."""
    if jax.process_count() == 1:
        return checkpoint.save(out_dir, cfg, params, tokenizer_from=tokenizer_from, dtype=dtype,
                               base_config=base_config, overwrite=overwrite)
    wrapped = jax.tree.map(_Gathered, params)
    if meshlib.is_writer():
        checkpoint.save(out_dir, cfg, wrapped, tokenizer_from=tokenizer_from, dtype=dtype, base_config=base_config,
               overwrite=overwrite)
    else:
        for x in jax.tree.leaves(wrapped):
            np.asarray(x)
    meshlib.barrier("selfalign_export")
    return Path(out_dir)


def _export_dtype(raw: dict | None, fallback: str) -> str:
    d = (raw or {}).get("torch_dtype") or (raw or {}).get("dtype")
    return d if d in ("float32", "bfloat16", "float16") else fallback


def finetune(model, pairs: Sequence[Pair], tokenizer=None, out_dir=None, train_cfg: TrainConfig = TrainConfig(),
             template: Template = Template(), *, checkpoint_dir=None, resume: bool = True, mesh=None,
             export_dtype: str | None = None, base_config: dict | None = None, overwrite: bool = False,
             progress: bool = True, on_step: Callable | None = None, log: bool = True):
    """Fine-tune `model` (an HF directory, or a LoadedModel) on (question, answer) pairs and export
    an HF directory to `out_dir` (skipped when None). Returns the trained model: full parameters
    (fp32 masters; LoRA merged), sharded on the training mesh.

    tokenizer: defaults to the model's. checkpoint_dir: Orbax train checkpoints (default
    `<out_dir>.ckpt` when out_dir is given); an existing run there with the same data and settings is
    resumed. export_dtype: default the source config's dtype (else float32)."""
    model_dir = None
    if isinstance(model, (str, Path)):
        model_dir = Path(model)
        raw = checkpoint.read_config(model_dir)
        cfg = checkpoint.config_from_hf(raw, "float32", checkpoint._generation_eos(model_dir))
        base_config = base_config if base_config is not None else raw
        params = None
        if tokenizer is None:
            tokenizer = checkpoint.load_tokenizer(model_dir)
    else:
        cfg, params = model.cfg, model.params
        tokenizer = model.tokenizer if tokenizer is None else tokenizer
    if out_dir is not None:
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory exists and is not empty: {out}")
        if checkpoint_dir is None:
            checkpoint_dir = out.with_name(out.name + ".ckpt")
    if template.kind == "chat" and template.tokenizer is None:
        template = dataclasses.replace(template, tokenizer=tokenizer)
    enc = encode_pairs(pairs, tokenizer, template, train_cfg.max_length, cfg=cfg)
    if log and meshlib.is_writer():
        lens = enc.lengths
        msg = (f"{len(enc)} examples, {int(sum(t[1:].sum() for t in enc.loss_mask))} answer tokens, inputs "
               f"{int(lens.min()) if len(lens) else 0}-{int(lens.max()) if len(lens) else 0} tokens")
        if enc.truncated:
            msg += f"; {enc.truncated} truncated to {train_cfg.max_length}"
        if enc.dropped:
            msg += f"; {enc.dropped} dropped (prompt alone fills --max-length)"
        print(msg, file=sys.stderr)

    def loader(shardings, dtype):
        return checkpoint.load(model_dir, dtype=dtype, shardings=shardings)[1]

    with orbax_disk_errors(checkpoint_dir):
        state, frozen, trainer, history = train(cfg, params, enc, train_cfg, mesh=mesh,
                                                checkpoint_dir=checkpoint_dir, resume=resume, on_step=on_step,
                                                progress=progress, params_loader=loader if params is None else None)
    # the AdamW moments go before the export copy is made (merged needs the parameters only)
    state = dataclasses.replace(state, opt_state=None)
    final = trainer.merged(state, frozen)
    del state
    if out_dir is not None:
        dt = export_dtype or _export_dtype(base_config, "float32")
        export(out_dir, cfg, final, tokenizer_from=model_dir if model_dir is not None else tokenizer, dtype=dt,
               base_config=base_config, overwrite=overwrite)
        if meshlib.is_writer():
            ran = trainer.tcfg
            summary = {"train_config": dataclasses.asdict(train_cfg), "examples": len(enc),
                       "ran_with": {"batch_size": ran.batch_size, "grad_accum": ran.grad_accum, "remat": ran.remat},
                       "truncated": enc.truncated, "dropped": enc.dropped, "steps": trainer.total_steps,
                       "mesh": dict(trainer.mesh.shape), "history": history}
            fileio.write_json(Path(out_dir) / "selfalign_train.json", summary)
    return LoadedModel(cfg, final, tokenizer, Path(out_dir) if out_dir is not None else None)
