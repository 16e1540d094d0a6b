"""GGUF files (llama.cpp) -> Hugging Face checkpoint directories.

`read(path)` gives (HF config dict, our Config, lazy tensors by HF name) from a GGUF file's metadata,
without dequantizing anything; `convert(path, out_dir)` writes config.json, model.safetensors,
generation_config.json and the tokenizer (transformers' own GGUF tokenizer conversion, chat template
included), dequantizing one tensor at a time with the `gguf` package (ggml-org's reader) as it is
written: peak memory is about one dequantized tensor over the memory-mapped file.

What llama.cpp's converter changed is undone: the Q/K row permutation of llama-architecture attention
(for rotary embeddings in the interleaved layout), and the +1 on Gemma norm weights. Settings a GGUF
file does not carry are those llama.cpp itself assumes: Gemma 3's sliding-window pattern (every 6th
layer global) and local RoPE base (10000), Gemma 2/3's attention scale (1/sqrt(head_dim), or
1/sqrt(hidden/heads) for the 27B models).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from selfalign_jax.core import checkpoint, model as M
from selfalign_jax.core.errors import UserError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text"}
READABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GEMMA27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's test for the 27B attention scale


@dataclasses.dataclass
class LazyTensor:
    """One GGUF tensor, dequantized (and un-permuted / un-shifted) only when asked for."""

    tensor: object  # gguf ReaderTensor
    shape: tuple
    fix: object = None  # fn(np.ndarray) -> np.ndarray
    note: str | None = None  # printed to stderr (progress) when dequantized

    def __array__(self, dtype=None, copy=None):
        import sys

        import gguf

        if self.note:
            print(f"\r{self.note}", end="", file=sys.stderr, flush=True)
        w = gguf.quants.dequantize(self.tensor.data, self.tensor.tensor_type)
        w = np.asarray(w, np.float32).reshape(self.shape)
        if self.fix is not None:
            w = self.fix(w)
        return w if dtype is None else w.astype(dtype)


def type_name(t) -> str:
    """A GGUF tensor's quantization type name ('Q4_K', ...; '#n' for a type this gguf does not know)."""
    import gguf

    try:
        return gguf.GGMLQuantizationType(t.tensor_type).name
    except ValueError:
        return f"#{int(t.tensor_type)}"


class _Truncated(Exception):
    """A tensor's data runs past the end of the file: (tensor name, its bytes, its offset, the file size,
    the size the file needs for all its tensors)."""


def _check_extent(reader, start: int, fields) -> None:
    """_Truncated for the first tensor (in file order) whose bytes, from its tensor-info field, end past
    the file (the reader's own error there is a reshape failure that names nothing)."""
    import gguf

    size, spans = len(reader.data), []
    for f in fields:
        _, name, _, dims, raw_type, off = f.parts
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
        n_bytes = int(np.prod(dims)) * type_size // block
        spans.append((int(start + off[0]), n_bytes, bytes(name).decode(errors="replace")))
    need = max((o + n for o, n, _ in spans), default=0)
    for o, n, name in sorted(spans):
        if o + n > size:
            raise _Truncated(name, n, o, size, need)


def _reader(path: Path):
    import gguf

    class Reader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            _check_extent(self, start_offs, fields)
            super()._build_tensors(start_offs, fields)

    if path.is_dir():
        raise UserError(f"{path}: is a directory; a GGUF file is wanted")
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        return Reader(str(path), "r")
    except _Truncated as t:
        name, n, off, size, need = t.args
        raise UserError(f"{path}: truncated: tensor {name} needs {n} bytes at offset {off}, the file has "
                        f"{max(0, size - off)} there ({size} bytes in all; its tensors need {need})") from None
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError / struct errors / ...
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _metadata(reader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name not in (
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.model"):
            if name == "tokenizer.ggml.tokens":
                out[name] = len(f.data)  # only the count is needed here
            continue
        try:
            out[name] = f.contents()
        except Exception:  # noqa: BLE001 - a field this gguf version cannot decode: not needed
            pass
    return out


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _unpermute(n_head: int):
    """Inverse of llama.cpp's `permute` of q/k rows (HF rotate-half -> interleaved pairs)."""
    def fix(w):
        rows = w.shape[0]
        return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return fix


def _minus_one(w):
    return w - 1.0


def _llama3_rope(factors: np.ndarray, raw: dict, path: Path) -> dict:
    """Llama 3.x RoPE parameters from llama.cpp's `rope_freqs` tensor (per-frequency divisors: 1 at high
    frequencies, `factor` at low ones, 1 / ((1 - s) / factor + s) between, s linear in 1 / wavelength).
    The divisors fix s = A / wavelength - B, i.e. original_max_pos / (high - low) and low / (high - low);
    high - low = 3 (every Llama 3.x: low 1, high 4) names them. Checked by recomputing every divisor."""
    rope = dict(raw["rope_parameters"])
    H = raw["head_dim"]
    f = (1.0 / (rope["rope_theta"] ** (np.arange(0, H, 2, dtype=np.float64) / H)))
    factors = factors.astype(np.float64).reshape(-1)
    if factors.shape != f.shape:
        raise UserError(f"{path}: rope_freqs.weight has {factors.size} values, expected {f.size}")
    factor = float(factors.max())
    inv_wl = f / (2 * np.pi)
    mid = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    A, B = 8192 / 3, 1 / 3  # no divisor between 1 and factor: any split fits; Llama 3's own
    if factor > 1 and mid.any():
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        if mid.sum() >= 2:
            A, nB = np.linalg.lstsq(np.stack([inv_wl[mid], np.ones(mid.sum())], 1), s, rcond=None)[0]
            B = -nB
        else:  # one divisor between: low = 1, high = 4 as in every Llama 3.x
            A = (s[0] + B) / inv_wl[mid][0]
    rope.update(rope_type="llama3", factor=factor, low_freq_factor=float(np.round(3 * B, 6)),
                high_freq_factor=float(np.round(3 * B + 3, 6)), original_max_position_embeddings=int(round(3 * A)))
    cfg = checkpoint.config_from_hf({**raw, "rope_parameters": rope})
    got = f / M.inv_freq(cfg).astype(np.float64)
    if not np.allclose(got, factors, rtol=1e-3):
        raise UserError(f"{path}: rope_freqs.weight does not follow Llama 3's RoPE scaling (not supported)")
    return rope


def hf_config(meta: dict, tensor_names: set[str], path: Path) -> dict:
    """An HF config.json dict for the file's architecture, from its metadata."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")

    def key(name, default=None, required=False):
        v = meta.get(f"{arch}.{name}", default)
        if v is None and required:
            raise UserError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return v

    layers, hidden, heads = key("block_count", required=True), key("embedding_length", required=True), \
        key("attention.head_count", required=True)
    kv = key("attention.head_count_kv", heads)
    if isinstance(kv, list):
        if len(set(kv)) != 1:
            raise UserError(f"{path}: per-layer kv head counts {sorted(set(kv))} are not supported")
        kv = kv[0]
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // heads
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    if not vocab:
        raise UserError(f"{path}: GGUF metadata gives no vocabulary size")
    fam = ARCHITECTURES[arch]
    rope = {"rope_type": "default", "rope_theta": _f32(key("rope.freq_base", 10000.0))}
    stype = key("rope.scaling.type")
    if stype not in (None, "none", "linear"):
        raise UserError(f"{path}: RoPE scaling {stype!r} is not supported (none, linear)")
    if stype == "linear":
        rope.update(rope_type="linear", factor=_f32(key("rope.scaling.factor", 1.0)))
    c = dict(model_type=fam, architectures=[checkpoint.ARCHITECTURES[fam]], vocab_size=int(vocab),
             hidden_size=hidden, intermediate_size=key("feed_forward_length", required=True),
             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
             max_position_embeddings=key("context_length", 2048),
             rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
             tie_word_embeddings="output.weight" not in tensor_names,
             bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
             pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), rope_parameters=rope)
    if fam in ("llama", "qwen2", "qwen3"):
        c["hidden_act"] = "silu"
    if fam == "llama":
        c["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    if fam in ("gemma2", "gemma3_text"):
        window = key("attention.sliding_window", 4096)
        big = layers == GEMMA27B_LAYERS[arch]
        c.update(hidden_activation="gelu_pytorch_tanh", sliding_window=window,
                 query_pre_attn_scalar=hidden // heads if big else head_dim,
                 final_logit_softcapping=key("final_logit_softcapping"))
        if fam == "gemma2":
            c["attn_logit_softcapping"] = key("attn_logit_softcapping")
            c["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        else:
            c["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
            c["rope_parameters"] = {"full_attention": rope,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    return c


def read(path, dtype: str = "float32"):
    """(HF config dict, Config, {hf tensor name: LazyTensor}) of a GGUF file; checks every tensor's
    name, quantization type and shape before anything is dequantized."""
    import gguf

    path = Path(path)
    reader = _reader(path)
    tensors = {t.name: t for t in reader.tensors}
    meta = _metadata(reader)
    raw = hf_config(meta, set(tensors), path)
    if "rope_freqs.weight" in tensors:
        raw["rope_parameters"] = _llama3_rope(np.asarray(LazyTensor(tensors["rope_freqs.weight"], (-1,))),
                                              raw, path)
    cfg = checkpoint.config_from_hf(raw, dtype)
    arch = meta["general.architecture"]
    for t in reader.tensors:
        qt = type_name(t)
        if qt not in READABLE:
            raise UserError(f"{path}: tensor {t.name} has quantization type {qt}, which selfalign cannot read "
                            f"(readable: {', '.join(READABLE)})")
    names = jax_leaves(checkpoint.hf_names(cfg))
    shapes = [s.shape for s in jax_leaves(M.param_specs(cfg), spec=True)]
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    nmap = gguf.get_tensor_name_map(arch_id, cfg.n_layers)
    out, used = {}, set()
    for hf, shape in zip(names, shapes):
        base, suffix = hf.rsplit(".", 1)
        g = nmap.get_name(base)
        gname = f"{g}.{suffix}" if g else None
        if gname not in tensors:
            raise UserError(f"{path}: missing tensor {gname or hf} (for {hf})")
        t = tensors[gname]
        fix = None
        if arch == "llama" and suffix == "weight" and g.endswith(("attn_q", "attn_k")):
            fix = _unpermute(cfg.n_heads if g.endswith("attn_q") else cfg.n_kv_heads)
        elif arch.startswith("gemma") and gname.endswith("norm.weight"):
            fix = _minus_one
        got = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dimensions fastest first
        if got != tuple(shape):
            raise UserError(f"{path}: tensor {gname} has shape {got}, expected {tuple(shape)}")
        out[hf] = LazyTensor(t, tuple(shape), fix)
        used.add(gname)
    extra = [n for n in tensors if n not in used and n != "rope_freqs.weight"]
    if extra:
        raise UserError(f"{path}: unexpected tensor{'s' if len(extra) > 1 else ''}: {', '.join(extra[:3])}")
    return raw, cfg, out


def jax_leaves(tree, spec: bool = False):
    import jax

    return jax.tree.leaves(tree, is_leaf=M.is_spec if spec else None)


def load_tokenizer(path):
    """transformers' tokenizer rebuilt from the GGUF metadata (chat template included)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise UserError(f"{path}: cannot build a tokenizer from the GGUF metadata ({type(e).__name__}: {e})") from None
    for k in ("gguf_file", "is_local", "local_files_only"):  # loading arguments, not tokenizer settings
        tok.init_kwargs.pop(k, None)
    return tok


def convert(path, out_dir, dtype: str = "float32", overwrite: bool = False, progress: bool = True) -> M.Config:
    """Write an HF checkpoint directory for a GGUF file (tensors streamed one at a time)."""
    import jax

    path = Path(path)
    raw, cfg, lazy = read(path)
    tok = load_tokenizer(path)
    names = checkpoint.hf_names(cfg)
    leaves, treedef = jax.tree.flatten(names)
    items = [lazy[n] for n in leaves]
    if progress:
        for i, x in enumerate(items):
            x.note = f"{path.name}: tensor {i + 1}/{len(items)}"
    params = jax.tree.unflatten(treedef, items)
    checkpoint.save(out_dir, cfg, params, tokenizer_from=tok, dtype=dtype, base_config=raw, overwrite=overwrite)
    return cfg
