"""Prompts in, results out: tokenizing and truncating prompts, per-prompt settings, the EOS ids, and a row's
`Result` from its generated ids (the completion text cut at the first stop string).

Stop strings
    Token-level matching inside the loop cannot be exact for every tokenizer (a marker may span several tokens
    or be part of one), so stop strings are checked on the host, exactly, on decoded text (`Job.check_stops`)
    every `stop_check_every` decode steps; a row whose text holds one is marked done. A stopped row is trimmed to
    the shortest token prefix whose text holds a stop string, and the text is cut before the first one (a stop
    string at index 0 does not stop: the authors' post-processing rule). The completion text is decoded after
    the prompt's last PROMPT_TAIL tokens (so a first word gets its leading space as in context) and that
    prefix's text removed.

Prompts longer than the context: truncate="left" keeps the last cfg.max_pos - 1 tokens (and the tokenizer's BOS,
if the prompt started with it), so at least one token can be generated; truncate="error" raises.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from selfalign_jax.core import model as M
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.settings import GenConfig
from selfalign_jax.core.generate.cache import Placement, prompt_bucket, to_rows
from selfalign_jax.core.generate.steps import row_keys
from selfalign_jax.core.template import find_cut

PROMPT_TAIL = 8  # prompt tokens decoded with the completion so its first word decodes as in context


@dataclasses.dataclass
class Result:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # eos | stop | length | context
    prompt_tokens: int
    truncated: int = 0  # prompt tokens dropped from the left




def per_prompt(name, v, n, dtype):
    a = np.asarray(v, dtype)
    if a.ndim == 0:
        return np.full((n,), a, dtype)
    if a.shape != (n,):
        raise UserError(f"{name}: expected a scalar or {n} values (one per prompt), got shape {a.shape}")
    return a


def tokenize(tokenizer, prompts, chat_template: bool) -> list[list[int]]:
    if all(isinstance(p, str) for p in prompts):
        texts = list(prompts)
        if chat_template:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in texts]
            return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return [list(x) for x in tokenizer(texts)["input_ids"]] if texts else []
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            raise UserError("prompts: give all strings or all token-id lists, not a mix")
        out.append([int(t) for t in p])
    return out


def completion(tokenizer, tail: list[int], gen: list[int]) -> str:
    """Text of `gen` after the prompt (decoded after the prompt's last tokens), special tokens removed."""
    full = tokenizer.decode(tail + gen, skip_special_tokens=True)
    head = tokenizer.decode(tail, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(gen, skip_special_tokens=True)


def find_stop(text: str, stop: Sequence[str]) -> int:
    """The first stop point (`template.find_cut`: a stop string at index 0 does not stop, as the authors'
    post-processing does not cut there)."""
    return find_cut(text, stop)


def finish(tokenizer, tail, toks, logp, prompt_tokens, limit, eos, stop) -> Result:
    """A row's Result from its generated ids: cut at the first stop string (shortest token prefix whose text holds
    one), finish reason."""
    n_tok = len(toks)
    text = completion(tokenizer, tail, toks)
    if stop and find_stop(text, stop) >= 0:
        lo, hi = 1, n_tok  # shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if find_stop(completion(tokenizer, tail, toks[:mid]), stop) >= 0:
                hi = mid
            else:
                lo = mid + 1
        toks = toks[:lo]
        text = completion(tokenizer, tail, toks)
        return Result(text[:find_stop(text, stop)], toks, list(logp[:lo]), "stop", prompt_tokens)
    if toks and toks[-1] in eos:
        reason = "eos"
    elif n_tok >= limit:
        reason = "length"
    else:
        reason = "context"
    return Result(text, toks, list(logp), reason, prompt_tokens)


@dataclasses.dataclass
class Job:
    """What every batch of one generate call shares: the placed parameters, the prompts' ids, their per-prompt
    settings as arrays (`gen`'s values, or per_prompt's), and the GenConfig itself (beam settings)."""

    gen: GenConfig
    params: M.Params
    cfg: M.Config
    tokenizer: object
    ids: list  # token ids per prompt (after truncation)
    key: jax.Array
    temp: np.ndarray
    topk: np.ndarray
    topp: np.ndarray
    pen: np.ndarray
    limit: np.ndarray  # per prompt: max_new_tokens asked
    eos: tuple
    pad: int
    stop: tuple
    every: int
    place: Placement | None

    @property
    def rows_multiple(self) -> int:
        """Batch rows are a multiple of this: the mesh's data x fsdp shards (1 without a mesh)."""
        return 1 if self.place is None else self.place.rows

    def kw(self):
        return dict(cfg=self.cfg, ngram=self.gen.no_repeat_ngram, eos=self.eos, pad=self.pad, place=self.place)

    def rows(self, idx, R):
        """Per-row inputs of prompts idx padded to R rows: tokens [R, Tp+1] (left-padded), lens, limits, keys,
        sampling parameters (padding rows: limit 0)."""
        n = len(idx)
        lens = np.array([len(self.ids[i]) for i in idx] + [1] * (R - n), np.int32)
        Tp = prompt_bucket(int(lens.max()) - 1)  # the prefill takes all prompt tokens but the last
        tokens = np.full((R, Tp + 1), self.pad, np.int32)
        for r, i in enumerate(idx):
            tokens[r, Tp + 1 - lens[r]:] = self.ids[i]
        limit = np.zeros((R,), np.int32)
        limit[:n] = np.minimum(self.limit[idx], self.cfg.max_pos - lens[:n])

        def padded(a, fill):
            return np.concatenate([a[idx], np.full((R - n,), fill, a.dtype)])

        keys = row_keys(self.key, np.array(list(idx) + [0] * (R - n), np.uint32))
        pl = self.place
        return (to_rows(tokens, pl), to_rows(lens, pl), keys, to_rows(limit, pl), to_rows(padded(self.temp, 0), pl),
                to_rows(padded(self.topk, 0), pl), to_rows(padded(self.topp, 1), pl), to_rows(padded(self.pen, 1), pl))

    def result(self, i, toks, logp) -> Result:
        t = self.ids[i]
        return finish(self.tokenizer, t[-PROMPT_TAIL:], toks, logp, len(t), int(self.limit[i]), self.eos, self.stop)

    def check_stops(self, idx_of_row, out, length, stopped):
        """Mark rows whose completion so far holds a stop string (host side, exact)."""
        for r, i in idx_of_row.items():
            if not stopped[r] and length[r] > 0 and find_stop(completion(
                    self.tokenizer, self.ids[i][-PROMPT_TAIL:], out[r, :length[r]].tolist()), self.stop) >= 0:
                stopped[r] = True


def tokenize_prompts(tokenizer, prompts, cfg: M.Config, chat_template: bool = False, truncate: str = "left"):
    """(token ids per prompt, tokens dropped from the left per prompt): see the module docstring."""
    ids = tokenize(tokenizer, prompts, chat_template)
    bos = getattr(tokenizer, "bos_token_id", None)
    ctx = cfg.max_pos
    truncated = [0] * len(ids)
    for i, t in enumerate(ids):
        name = f"prompt {i + 1}"  # 1-based: `selfalign generate` names the file and line
        if not t:
            raise UserError(f"{name}: the prompt has no tokens (empty prompt and the tokenizer adds no BOS)")
        if len(t) > ctx - 1:
            if truncate == "error":
                raise UserError(f"{name}: the prompt has {len(t)} tokens; the context length is {ctx}")
            keep_bos = bos is not None and t[0] == bos
            cut = len(t) - (ctx - 1)
            ids[i] = ([bos] + t[1 + cut:]) if keep_bos else t[cut:]
            truncated[i] = cut
    return ids, truncated


def eos_ids(cfg: M.Config, tokenizer, ignore_eos: bool = False) -> tuple[int, ...]:
    """cfg.eos_ids plus the tokenizer's EOS id, sorted (() with ignore_eos)."""
    eos = set(cfg.eos_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    return () if ignore_eos else tuple(sorted(eos))
