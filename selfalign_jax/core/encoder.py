"""A pure-JAX BERT-family sentence encoder (all-MiniLM-L6-v2, bge-small, e5-small, ...).

Post-LN BERT: word + position + token-type embeddings, LayerNorm, then per layer self-attention and a
GELU MLP, each followed by residual + LayerNorm. Sentence vector: mean of the last hidden states over
the attention mask (or the [CLS] state when the directory's `1_Pooling/config.json` says so), then
L2-normalised, as sentence-transformers does. Weights come only from safetensors (pickled .bin files
are refused); the tokenizer is the directory's own, through transformers.

API:
    BertConfig (frozen, hashable; static under jit), read_config(model_dir) -> BertConfig
    load(model_dir) -> (cfg, params)
    hidden(params, cfg, ids_BxT, mask_BxT) -> h_BxTxD
    sentence(params, cfg, ids_BxT, mask_BxT) -> emb_BxD  (pooled, L2-normalised)
    EncoderEmbedder(cfg, params, tokenizer, batch_size=32, max_len=None); .from_dir(dir); .embed(texts)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from selfalign_jax.core.buckets import run_padded
from selfalign_jax.core.errors import UserError

_ACTS = {"gelu": False, "gelu_python": False, "gelu_new": True, "gelu_pytorch_tanh": True,
         "gelu_fast": True, "relu": None}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden: int  # D
    n_layers: int
    n_heads: int  # N
    intermediate: int  # F
    max_pos: int  # P
    type_vocab: int = 2
    eps: float = 1e-12
    act: str = "gelu"
    pad_id: int = 0
    pooling: str = "mean"  # mean | cls
    max_len: int = 512  # tokens kept per text (sentence_bert_config's max_seq_length when given)


def _json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: cannot read JSON ({e})") from None


def read_config(model_dir) -> BertConfig:
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise UserError(f"{d}: no config.json (want a local Hugging Face encoder directory)")
    c = _json(d / "config.json")
    if c.get("model_type") != "bert":
        raise UserError(f"{d}/config.json: model_type {c.get('model_type')!r} is not a BERT encoder "
                        f"(supported: bert, e.g. all-MiniLM-L6-v2, bge-small, e5-small)")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{d}/config.json: position_embedding_type {c['position_embedding_type']!r} "
                        f"is not supported (absolute only)")
    act = c.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise UserError(f"{d}/config.json: hidden_act {act!r} is not supported ({', '.join(_ACTS)})")
    pooling = "mean"
    pc = d / "1_Pooling" / "config.json"
    if pc.is_file():
        p = _json(pc)
        if p.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not p.get("pooling_mode_mean_tokens", True):
            raise UserError(f"{pc}: only mean or CLS pooling is supported")
    max_len = min(512, c["max_position_embeddings"])
    sb = d / "sentence_bert_config.json"
    if sb.is_file():
        max_len = min(max_len, int(_json(sb).get("max_seq_length") or max_len))
    try:
        return BertConfig(
            vocab_size=c["vocab_size"], hidden=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], intermediate=c["intermediate_size"],
            max_pos=c["max_position_embeddings"], type_vocab=c.get("type_vocab_size", 2),
            eps=c.get("layer_norm_eps", 1e-12), act=act, pad_id=c.get("pad_token_id") or 0,
            pooling=pooling, max_len=max_len)
    except KeyError as e:
        raise UserError(f"{d}/config.json: missing field {e.args[0]!r}") from None


def _tensors(d: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = sorted(d.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
        if pickled:
            raise UserError(f"{d}: only pickled weights ({pickled[0]}); refusing to unpickle, "
                            f"convert them to model.safetensors first")
        raise UserError(f"{d}: no *.safetensors weights")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in st.keys():
                    out[k] = np.asarray(st.get_tensor(k), np.float32)
        except TypeError:  # bfloat16 has no numpy dtype: read through jax
            with safe_open(str(f), framework="flax") as st:
                for k in st.keys():
                    out[k] = np.asarray(st.get_tensor(k).astype(jnp.float32))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"{f}: cannot read safetensors ({e})") from None
    return out


def load(model_dir) -> tuple[BertConfig, dict]:
    """(cfg, params) from a local HF BERT directory; keys may carry a `bert.` prefix or none."""
    d = Path(model_dir)
    cfg = read_config(d)
    raw = {}
    for k, v in _tensors(d).items():
        for pre in ("bert.", "model.", "0.auto_model."):
            k = k.removeprefix(pre)
        raw[k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")] = v

    def get(name, shape):
        if name not in raw:
            raise UserError(f"{d}: missing tensor {name!r} (or bert.{name})")
        if raw[name].shape != shape:
            raise UserError(f"{d}: tensor {name!r} has shape {raw[name].shape}, expected {shape}")
        return raw[name]

    D, F, L = cfg.hidden, cfg.intermediate, cfg.n_layers
    e = "embeddings."
    params = {"emb": {
        "word": get(e + "word_embeddings.weight", (cfg.vocab_size, D)),
        "pos": get(e + "position_embeddings.weight", (cfg.max_pos, D)),
        "type": get(e + "token_type_embeddings.weight", (cfg.type_vocab, D)),
        "ln_w": get(e + "LayerNorm.weight", (D,)), "ln_b": get(e + "LayerNorm.bias", (D,))}}
    names = {  # ours: (HF suffix, shape); linear weights are transposed to [in, out]
        "wq": ("attention.self.query.weight", (D, D)), "bq": ("attention.self.query.bias", (D,)),
        "wk": ("attention.self.key.weight", (D, D)), "bk": ("attention.self.key.bias", (D,)),
        "wv": ("attention.self.value.weight", (D, D)), "bv": ("attention.self.value.bias", (D,)),
        "wo": ("attention.output.dense.weight", (D, D)), "bo": ("attention.output.dense.bias", (D,)),
        "ln1_w": ("attention.output.LayerNorm.weight", (D,)), "ln1_b": ("attention.output.LayerNorm.bias", (D,)),
        "w1": ("intermediate.dense.weight", (F, D)), "b1": ("intermediate.dense.bias", (F,)),
        "w2": ("output.dense.weight", (D, F)), "b2": ("output.dense.bias", (D,)),
        "ln2_w": ("output.LayerNorm.weight", (D,)), "ln2_b": ("output.LayerNorm.bias", (D,)),
    }
    layers = {}
    for ours, (hf, shape) in names.items():
        ts = [get(f"encoder.layer.{i}.{hf}", shape) for i in range(L)]
        layers[ours] = np.stack([t.T if ours[0] == "w" else t for t in ts])
    params["layers"] = layers
    return cfg, jax.tree.map(jnp.asarray, params)


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * w + b


def _act(cfg: BertConfig, x):
    approx = _ACTS[cfg.act]
    return jax.nn.relu(x) if approx is None else jax.nn.gelu(x, approximate=approx)


def hidden(params, cfg: BertConfig, ids_BxT, mask_BxT):
    """Last hidden states h_BxTxD; padded keys (mask 0) are never attended to."""
    B, T = ids_BxT.shape
    N, D = cfg.n_heads, cfg.hidden
    H = D // N
    emb = params["emb"]
    x_BxTxD = emb["word"][ids_BxT] + emb["pos"][jnp.arange(T)][None] + emb["type"][0]
    x_BxTxD = _ln(x_BxTxD, emb["ln_w"], emb["ln_b"], cfg.eps)
    keep_Bx1x1xT = (mask_BxT > 0)[:, None, None, :]

    def layer(x, p):
        q = (x @ p["wq"] + p["bq"]).reshape(B, T, N, H)
        k = (x @ p["wk"] + p["bk"]).reshape(B, T, N, H)
        v = (x @ p["wv"] + p["bv"]).reshape(B, T, N, H)
        s_BxNxTxT = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H).astype(np.float32)
        s_BxNxTxT = jnp.where(keep_Bx1x1xT, s_BxNxTxT, -1e30)
        a = jax.nn.softmax(s_BxNxTxT, axis=-1)
        ctx = jnp.einsum("bnts,bsnh->btnh", a, v).reshape(B, T, D)
        x = _ln(x + ctx @ p["wo"] + p["bo"], p["ln1_w"], p["ln1_b"], cfg.eps)
        f = _act(cfg, x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return _ln(x + f, p["ln2_w"], p["ln2_b"], cfg.eps), None

    x_BxTxD, _ = jax.lax.scan(layer, x_BxTxD, params["layers"])
    return x_BxTxD


def sentence(params, cfg: BertConfig, ids_BxT, mask_BxT):
    """Pooled (mean over the mask, or [CLS]) and L2-normalised sentence vectors emb_BxD."""
    h = hidden(params, cfg, ids_BxT, mask_BxT)
    if cfg.pooling == "cls":
        e_BxD = h[:, 0]
    else:
        m = mask_BxT.astype(h.dtype)[..., None]
        e_BxD = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return e_BxD / jnp.maximum(jnp.linalg.norm(e_BxD, axis=-1, keepdims=True), 1e-12)


_sentence_jit = jax.jit(sentence, static_argnums=1)


class EncoderEmbedder:
    """`Embedder` over a local BERT-family sentence encoder."""

    name = "encoder"

    def __init__(self, cfg: BertConfig, params, tokenizer, batch_size: int = 32, max_len: int | None = None):
        self.cfg, self.params, self.tok = cfg, params, tokenizer
        self.batch_size = batch_size
        self.max_len = min(max_len or cfg.max_len, cfg.max_pos)
        self.dim = cfg.hidden

    @classmethod
    def from_dir(cls, model_dir, **kw) -> "EncoderEmbedder":
        from transformers import AutoTokenizer

        cfg, params = load(model_dir)
        try:
            tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UserError(f"{model_dir}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
        return cls(cfg, params, tok, **kw)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = self.tok(list(texts), add_special_tokens=True, truncation=True,
                       max_length=self.max_len)["input_ids"]
        return run_padded(ids, lambda i, v: _sentence_jit(self.params, self.cfg, i, v.astype(np.int32)),
                          self.batch_size, self.cfg.pad_id, max_len=self.max_len,
                          desc="embed (encoder)").astype(np.float32)
