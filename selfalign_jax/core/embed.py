"""Text embedders behind one interface: texts -> L2-normalised float32 matrix [n, dim].

API:
    Embedder (protocol): .name, .dim, .embed(texts: list[str]) -> np.ndarray float32 [n, dim]
    get_embedder(name, model=None, batch_size=32, max_len=None, dim=1024) -> Embedder
        "hashing": HashingEmbedder(dim)  hashed bag of word 1-2-grams and char 3-grams, no model
        "encoder": encoder.EncoderEmbedder.from_dir(model)  a local BERT-family sentence encoder
        "lm":      LMEmbedder.from_dir(model)  mean of the aligned model's last hidden states
    LMEmbedder(model: LoadedModel, ...)  for a model already in memory (e.g. the current M_t)
    l2_normalize(x_NxD) -> x_NxD

Empty or whitespace-only texts embed to a fixed unit vector per embedder, never to zeros.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Protocol, Sequence

import numpy as np

from selfalign_jax.core.buckets import run_padded
from selfalign_jax.core.errors import UserError

EMBEDDERS = ("hashing", "encoder", "lm")


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def l2_normalize(x_NxD: np.ndarray) -> np.ndarray:
    x = np.asarray(x_NxD, np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


# ------------------------------------------------------------------------------------- hashing
_WORD = re.compile(r"\w+")


class HashingEmbedder:
    """Signed feature hashing of word unigrams, bigrams and character 3-grams (stable crc32 hashes)."""

    name = "hashing"

    def __init__(self, dim: int = 1024):
        if dim < 8:
            raise UserError(f"hashing embedder: dim must be >= 8, got {dim}")
        self.dim = dim

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        feats = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
        for w in words:
            s = f"<{w}>"
            feats += [f"c:{s[i:i + 3]}" for i in range(len(s) - 2)]
        return feats or ["<empty>"]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for r, t in enumerate(texts):
            for f in self._features(t):
                h = zlib.crc32(f.encode("utf-8"))
                out[r, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        # an all-cancelled row (rare) falls back to the empty-text vector
        dead = ~np.any(out, axis=1)
        if dead.any():
            h = zlib.crc32(b"<empty>")
            out[dead, h % self.dim] = 1.0
        return l2_normalize(out)


# ------------------------------------------------------------------------------------- lm
# jax, the model and the encoder are imported where used: `selfalign index --embedder hashing` and the
# CLI's start-up (it imports this module) need no jax
def _lm_pool(params, cfg, ids_BxT, mask_BxT):
    import jax.numpy as jnp

    from selfalign_jax.core import model as M

    h_BxTxE, _ = M.apply(params, cfg, ids_BxT, M.positions(mask_BxT))
    m = mask_BxT.astype(jnp.float32)[..., None]
    mean_BxE = (h_BxTxE.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return mean_BxE / jnp.maximum(jnp.linalg.norm(mean_BxE, axis=-1, keepdims=True), 1e-12)


def lm_depth(n_layers: int, frac: float) -> int:
    """The layers the lm embedder runs: round(frac * n_layers), at least 1."""
    return max(1, min(n_layers, round(frac * n_layers)))


class LMEmbedder:
    """Mean over valid tokens of the decoder's hidden states after its first `lm_depth(L, layers)` layers
    (with the final norm), L2-normalised. layers=1.0 is the last layer; middle layers retrieve better
    (SmolLM2-135M, docs/real-demo.md: the 4 seeds nearest to a benign prompt are helpful
    ones 32% of the time at 0.5, 17.5% at 1.0, base rate 20%) and cost less."""

    name = "lm"

    def __init__(self, model, batch_size: int = 32, max_len: int | None = None, mesh=None, layers: float = 1.0,
                 reload=None):
        """mesh: a jax Mesh to shard the parameters over (model.ShardingRules; texts replicated);
        layers: the fraction of the decoder's layers to run; reload: a function that returns the model again
        after `release()` (the parameters are dropped only where there is one)."""
        import jax

        depth = lm_depth(model.cfg.n_layers, layers)
        self.cfg, self.tok, self.mesh = dataclasses.replace(model.cfg, n_layers=depth), model.tokenizer, mesh
        self._reload = reload
        self._take(model)
        self.batch_size = batch_size
        self.max_len = min(max_len or 512, self.cfg.max_pos)
        self.dim = self.cfg.embed_dim or self.cfg.hidden
        self._fn = jax.jit(_lm_pool, static_argnums=1)

    def _take(self, model) -> None:
        import jax

        from selfalign_jax.core import model as M

        params = dataclasses.replace(model.params, layers=model.params.layers[:self.cfg.n_layers])
        self.params = params if self.mesh is None else jax.device_put(params, M.param_shardings(self.cfg, self.mesh))

    def release(self) -> bool:
        """Drop the parameters until the next `embed` (which takes them from `reload`); False without a reload."""
        if self._reload is None:
            return False
        self.params = None
        return True

    @classmethod
    def from_dir(cls, model_dir, **kw) -> "LMEmbedder":
        from selfalign_jax.core.loaded import LoadedModel

        return cls(LoadedModel.load(model_dir), **kw)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        texts = [t if t.strip() else "." for t in texts]
        ids = self.tok(list(texts), add_special_tokens=True, truncation=True,
                       max_length=self.max_len)["input_ids"]
        pad = self.cfg.pad_id if getattr(self.cfg, "pad_id", None) is not None else 0
        return run_padded(ids, self._pool, self.batch_size, pad, max_len=self.max_len,
                          desc="embed (lm)").astype(np.float32)

    def _pool(self, ids_BxT, mask_BxT):
        from selfalign_jax.core import mesh as MS
        from selfalign_jax.core.generate.cache import host

        mask_BxT = mask_BxT.astype(np.int32)
        if self.params is None:
            self._take(self._reload())
        if self.mesh is not None:  # every process passes the same texts: replicated inputs, gathered output
            ids_BxT, mask_BxT = (MS.put(x, MS.replicated(self.mesh)) for x in (ids_BxT, mask_BxT))
        return host(self._fn(self.params, self.cfg, ids_BxT, mask_BxT))


# ------------------------------------------------------------------------------------- factory
def get_embedder(name: str, model=None, batch_size: int = 32, max_len: int | None = None,
                 dim: int = 1024, lm_layers: float = 1.0) -> Embedder:
    """An embedder by name; "encoder" and "lm" need `model` (a local HF directory)."""
    if name == "hashing":
        return HashingEmbedder(dim)
    if name not in EMBEDDERS:
        raise UserError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")
    if model is None:
        raise UserError(f"embedder {name!r} needs --model DIR (a local Hugging Face directory)")
    if name == "encoder":
        from selfalign_jax.core.encoder import EncoderEmbedder

        return EncoderEmbedder.from_dir(model, batch_size=batch_size, max_len=max_len)
    return LMEmbedder.from_dir(model, batch_size=batch_size, max_len=max_len, layers=lm_layers)
