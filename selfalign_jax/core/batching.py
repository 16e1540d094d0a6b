"""SFT examples: encoding (question, answer) pairs with their loss mask, epoch planning (random rows
per step, or length-grouped windows; deterministic) and padded batches [grad_accum, rows, T] in length
buckets (multiples of `bucket` tokens, so at most max_length / bucket step shapes are compiled), one
example per row or several packed into a row."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from selfalign_jax.core import checkpoint
from selfalign_jax.core import model as M
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.template import Template

Pair = tuple[str, str]


@dataclasses.dataclass
class Encoded:
    """Tokenized examples: ids[i] = prompt + answer + EOS (cut to max_length + 1 tokens);
    loss_mask[i] marks answer/EOS tokens (the loss is on predicting them)."""

    ids: list[np.ndarray]
    loss_mask: list[np.ndarray]
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
        for ids, t in zip(self.ids, self.loss_mask):
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
                 eos_id: int | None = None, pad_id: int | None = None, cfg: M.Config | None = None,
                 where: Sequence[str] | None = None) -> Encoded:
    """Render each pair with `template.train_pair`, tokenize prompt + answer in one pass (character
    offsets tell answer tokens from prompt tokens, so merges across the boundary are handled),
    append EOS and truncate to max_length + 1 tokens. With `cfg`, a pair whose text encodes to an id past
    the model's embedding rows raises UserError naming where[i] ("pair i+1" by default)."""
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
        if cfg is not None:
            checkpoint.check_ids([ids], cfg.vocab_size, [where[i] if where else f"pair {i + 1}"], tokenizer)
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


def plan_epoch(lengths: np.ndarray, rows: int, seed: int, epoch: int, group_lengths: bool = False,
               window: int = 16) -> list[np.ndarray]:
    """Example indices of each step of one epoch, shuffled by (seed, epoch): uniformly random rows per
    step (as the authors' `DistributedSampler(shuffle=True)`). group_lengths: sort by length inside
    windows of `window` steps so each step holds similar lengths (less padding), then shuffle the steps.
    Deterministic; ceil(n / rows) steps, the last possibly short."""
    n = len(lengths)
    rng = np.random.default_rng([int(seed), int(epoch), 0x5F7])
    perm = rng.permutation(n)
    if not group_lengths:
        return [perm[j:j + rows] for j in range(0, n, rows)]
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


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: positions into `lengths` grouped into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def packed_layout(lengths: Sequence[int], grad_accum: int, micro_rows: int, max_length: int,
                  bucket: int) -> tuple[int, int, list[list[int]]]:
    """(A, T, rows) with the fewest padded tokens A * micro_rows * T over the length buckets T (ties: the
    shorter T): each row holds whole examples, A <= grad_accum micro-batches of micro_rows rows."""
    longest = bucket_len(max(lengths, default=1), bucket, max_length)
    best = None
    for T in range(longest, bucket_len(max_length, bucket, max_length) + 1, bucket):
        rows = pack_rows(lengths, T)
        A = max(1, -(-len(rows) // micro_rows))
        if A <= grad_accum and (best is None or A * T < best[0] * best[1]):
            best = (A, T, rows)
    return best


def make_batch(enc: Encoded, idx: Sequence[int], grad_accum: int, micro_rows: int, max_length: int,
               bucket: int = 64, pack: bool = False) -> dict[str, np.ndarray]:
    """Arrays [grad_accum, micro_rows, T] (T = the length bucket of the longest example):
    tokens (inputs, pad_id at padding), pos (0.. on tokens, -1 at padding), targets (next token) and
    weights (1.0 where the target is an answer token). Rows beyond len(idx) are empty.
    pack: several whole examples per row (positions restart at 0 at each, which the model reads as a
    new sequence: attention never crosses it), in the fewest micro-batches A <= grad_accum and length
    bucket T (`packed_layout`): arrays [A, micro_rows, T]. The token-normalised loss and its gradient
    are those of the unpacked batch (up to float summation order)."""
    idx = list(idx)
    A, b = grad_accum, micro_rows
    if len(idx) > A * b:
        raise ValueError(f"{len(idx)} examples do not fit {A} x {b} rows")
    if pack and idx:
        A, T, groups = packed_layout([len(enc.ids[i]) - 1 for i in idx], A, b, max_length, bucket)
        per = -(-len(groups) // A)  # spread the rows evenly over the micro-batches
        place = [((g // per) * b + g % per, [idx[j] for j in grp]) for g, grp in enumerate(groups)]
    else:
        T = bucket_len(max((len(enc.ids[i]) - 1 for i in idx), default=1), bucket, max_length)
        per = -(-len(idx) // A) if idx else 0  # spread a short step evenly over the micro-batches
        place = [((r // per) * b + (r % per) if per <= b else r, [i]) for r, i in enumerate(idx)]
    tokens = np.full((A * b, T), enc.pad_id, np.int32)
    pos = np.full((A * b, T), -1, np.int32)
    targets = np.zeros((A * b, T), np.int32)
    weights = np.zeros((A * b, T), np.float32)
    for row, members in place:
        o = 0
        for i in members:
            ids, t = enc.ids[i], enc.loss_mask[i]
            n = len(ids) - 1
            tokens[row, o:o + n] = ids[:-1]
            pos[row, o:o + n] = np.arange(n)
            targets[row, o:o + n] = ids[1:]
            weights[row, o:o + n] = t[1:]
            o += n
    shape = (A, b, T)
    return {"tokens": tokens.reshape(shape), "pos": pos.reshape(shape), "targets": targets.reshape(shape),
            "weights": weights.reshape(shape)}
