"""Hugging Face checkpoint directories in and out: config.json + safetensors (single or sharded).

Loading reads each tensor with plain file reads (no mmap, so the file is never resident twice) and
puts it on the device at once; exporting streams tensors one at a time into safetensors files that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Pickle checkpoints are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import ml_dtypes
import numpy as np

from selfalign_jax.core import fileio
from selfalign_jax.core.mesh import compute_dtype
from selfalign_jax.core import model as M
from selfalign_jax.core.errors import UserError

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
             "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "tf_model.h5",
           "flax_model.msgpack", "model.pt", "model.pth", "consolidated.00.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
DEFAULT_TIED = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gemma": True, "gemma2": True,
                "gemma3_text": True, "opt": True}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "opt": "OPTForCausalLM"}
GEMMAS = ("gemma", "gemma2", "gemma3_text")
# config entries that make transformers import code from the checkpoint: never exported
REMOTE_CODE = ("auto_map", "trust_remote_code", "custom_pipelines")


# ------------------------------------------------------------------------------------------ config
def read_config(model_dir) -> dict:
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"model directory not found: {d}")
    p = d / "config.json"
    if not p.is_file():
        raise UserError(f"{d}: no config.json (not a Hugging Face model directory)")
    raw = _json_object(p)
    mt = raw.get("model_type")
    if mt not in M.FAMILIES:
        raise UserError(f"{p}: unsupported model_type {mt!r} (supported: {', '.join(M.FAMILIES)})")
    return raw


def _json_object(p: Path) -> dict:
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: not a JSON object (got {type(raw).__name__})")
    return raw


def _generation_eos(model_dir) -> list[int]:
    p = Path(model_dir) / "generation_config.json"
    if not p.is_file():
        return []
    e = _json_object(p).get("eos_token_id")
    if not (e is None or isinstance(e, int) or (isinstance(e, list) and all(isinstance(i, int) for i in e))):
        raise UserError(f"{p}: field 'eos_token_id' must be an integer or a list of integers, got {e!r}")
    return [] if e is None else ([e] if isinstance(e, int) else list(e))


def config_from_hf(raw: dict, dtype: str = "float32", extra_eos=()) -> M.Config:
    """Our Config from an HF config.json dict (defaults resolved by transformers' config class)."""
    import transformers

    fam = raw["model_type"]
    c = transformers.CONFIG_MAPPING[fam].from_dict(dict(raw))
    g = lambda k, d=None: getattr(c, k, d) if getattr(c, k, None) is not None else d  # noqa: E731
    eos = g("eos_token_id")
    eos_ids = tuple(dict.fromkeys(([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
                                  + list(extra_eos)))
    common = dict(family=fam, vocab_size=c.vocab_size, hidden=c.hidden_size,
                  n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                  max_pos=c.max_position_embeddings, tied=bool(g("tie_word_embeddings", DEFAULT_TIED[fam])),
                  bos_id=g("bos_token_id"), eos_ids=eos_ids, pad_id=g("pad_token_id"), dtype=dtype)
    if fam == "opt":
        if not g("layer_norm_elementwise_affine", True):
            raise UserError("config.json: opt with layer_norm_elementwise_affine=false is not supported")
        act = c.activation_function
        E = g("word_embed_proj_dim", c.hidden_size)
        return M.Config(**common, n_kv_heads=c.num_attention_heads,
                        head_dim=c.hidden_size // c.num_attention_heads, intermediate=c.ffn_dim,
                        norm="layernorm", norm_eps=1e-5, act=_act_name(act), glu=False, rope_theta=None,
                        qkv_bias=g("enable_bias", True), o_bias=g("enable_bias", True),
                        mlp_bias=g("enable_bias", True), pre_norm=bool(c.do_layer_norm_before),
                        final_norm=bool(c.do_layer_norm_before) and not g("_remove_final_layer_norm", False),
                        embed_dim=E if E != c.hidden_size else None, pos_offset=2)
    rp = dict(g("rope_parameters", None) or {})
    local = {}
    if "full_attention" in rp:  # gemma3: RoPE per layer type
        local = dict(rp.get("sliding_attention") or {})
        rp = dict(rp["full_attention"] or {})
    rs = raw.get("rope_scaling") or {}
    theta = rp.get("rope_theta", raw.get("rope_theta", 10000.0))
    rtype = rp.get("rope_type", rp.get("type", rs.get("rope_type", rs.get("type", "default"))))
    if rtype not in ("default", "linear", "llama3"):
        raise UserError(f"config.json: unsupported rope type {rtype!r} (supported: default, linear, llama3)")
    rp = {**rs, **rp}
    local_type = local.get("rope_type", "default")
    if local_type not in ("default", "linear"):
        raise UserError(f"config.json: unsupported sliding-layer rope type {local_type!r} (supported: default, linear)")
    if g("use_bidirectional_attention", False):
        raise UserError("config.json: use_bidirectional_attention=true (an encoder) is not supported")
    heads = c.num_attention_heads
    hd = g("head_dim", c.hidden_size // heads)
    win = g("sliding_window") if fam in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text") else None
    lt = g("layer_types")
    if win is not None and lt:
        windows = tuple(win if t == "sliding_attention" else None for t in lt)
    elif win is not None and fam == "mistral":
        windows = (win,) * c.num_hidden_layers
    else:
        windows = ()
    attn_bias = bool(g("attention_bias", False))
    gemma23 = fam in ("gemma2", "gemma3_text")
    act = (g("hidden_activation") or g("hidden_act", "gelu_pytorch_tanh")) if gemma23 else g("hidden_act", "silu")
    return M.Config(**common, n_kv_heads=g("num_key_value_heads", heads), head_dim=hd,
                    intermediate=c.intermediate_size, norm="rms1p" if fam in GEMMAS else "rms",
                    norm_eps=g("rms_norm_eps", 1e-6), act=_act_name(act),
                    rope_theta=float(theta), rope_type=rtype, rope_factor=float(rp.get("factor", 1.0)),
                    rope_low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
                    rope_high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
                    rope_original_max_pos=int(rp.get("original_max_position_embeddings", 8192)),
                    qkv_bias=attn_bias or fam == "qwen2", o_bias=attn_bias,
                    mlp_bias=bool(g("mlp_bias", False)), windows=windows, emb_scale=fam in GEMMAS,
                    local_rope_theta=float(local["rope_theta"]) if "rope_theta" in local else None,
                    local_rope_type=local_type, local_rope_factor=float(local.get("factor", 1.0)),
                    qk_norm=fam in ("qwen3", "gemma3_text"), sandwich_norm=gemma23,
                    query_pre_attn_scalar=float(c.query_pre_attn_scalar) if gemma23 else None,
                    # transformers' Gemma3 attention takes no softcap argument: it ignores the setting
                    attn_softcap=_opt_float(g("attn_logit_softcapping")) if fam == "gemma2" else None,
                    final_softcap=_opt_float(g("final_logit_softcapping")) if gemma23 else None)


def _opt_float(x):
    return None if x is None else float(x)


def _act_name(a: str) -> str:
    table = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
             "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
    if a not in table:
        raise UserError(f"config.json: unsupported activation {a!r}")
    return table[a]


def config_to_hf(cfg: M.Config) -> dict:
    """An HF config.json dict that describes cfg (used on export, over the source config if any)."""
    d = dict(model_type=cfg.family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden,
             num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
             max_position_embeddings=cfg.max_pos, tie_word_embeddings=cfg.tied,
             bos_token_id=cfg.bos_id, pad_token_id=cfg.pad_id,
             eos_token_id=(cfg.eos_ids[0] if len(cfg.eos_ids) == 1 else list(cfg.eos_ids) or None))
    d["architectures"] = [ARCHITECTURES[cfg.family]]
    act = {"silu": "silu", "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.act]
    if cfg.family == "opt":
        d.update(ffn_dim=cfg.intermediate, do_layer_norm_before=cfg.pre_norm,
                 _remove_final_layer_norm=cfg.pre_norm and not cfg.final_norm,
                 word_embed_proj_dim=cfg.E, activation_function=act, enable_bias=cfg.qkv_bias,
                 layer_norm_elementwise_affine=True)
        return d
    rope = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    if cfg.rope_type == "linear":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_pos)
    d.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
             intermediate_size=cfg.intermediate, rms_norm_eps=cfg.norm_eps, hidden_act=act,
             rope_parameters=rope, rope_theta=cfg.rope_theta)
    if cfg.family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"):
        d["attention_bias"] = cfg.o_bias
    if cfg.family == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    layer_types = ["sliding_attention" if w else "full_attention" for w in (cfg.windows or (None,) * cfg.n_layers)]
    if cfg.family in ("gemma2", "gemma3_text"):
        wins = [w for w in cfg.windows if w is not None]
        qs = cfg.query_pre_attn_scalar
        d.update(hidden_activation=act, query_pre_attn_scalar=int(qs) if float(qs).is_integer() else qs,
                 final_logit_softcapping=cfg.final_softcap, sliding_window=wins[0] if wins else None,
                 layer_types=layer_types)
        if cfg.family == "gemma2":
            d["attn_logit_softcapping"] = cfg.attn_softcap
        else:
            local = {"rope_type": cfg.local_rope_type,
                     "rope_theta": cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta}
            if cfg.local_rope_type == "linear":
                local["factor"] = cfg.local_rope_factor
            d["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
            d.pop("rope_theta")
    if cfg.family in ("mistral", "qwen2", "qwen3"):
        wins = [w for w in cfg.windows if w is not None]
        d["sliding_window"] = wins[0] if wins else None
        if cfg.family in ("qwen2", "qwen3"):
            d["use_sliding_window"] = bool(wins)
            d["max_window_layers"] = next((i for i, w in enumerate(cfg.windows) if w), cfg.n_layers)
            d["layer_types"] = layer_types
    return d


# ------------------------------------------------------------------------------------ tensor names
def hf_names(cfg: M.Config) -> M.Params:
    """The HF tensor name of every parameter (same tree as Params; None where absent)."""
    specs = M.param_specs(cfg)
    opt = cfg.family == "opt"
    pre = "model.decoder." if opt else "model."
    if opt:
        lmap = dict(attn_norm="self_attn_layer_norm.weight", attn_norm_b="self_attn_layer_norm.bias",
                    q="self_attn.q_proj.weight", k="self_attn.k_proj.weight", v="self_attn.v_proj.weight",
                    o="self_attn.out_proj.weight", q_b="self_attn.q_proj.bias", k_b="self_attn.k_proj.bias",
                    v_b="self_attn.v_proj.bias", o_b="self_attn.out_proj.bias",
                    mlp_norm="final_layer_norm.weight", mlp_norm_b="final_layer_norm.bias",
                    up="fc1.weight", up_b="fc1.bias", down="fc2.weight", down_b="fc2.bias")
        top = dict(embed="embed_tokens.weight", pos_embed="embed_positions.weight",
                   proj_in="project_in.weight", proj_out="project_out.weight",
                   final_norm="final_layer_norm.weight", final_norm_b="final_layer_norm.bias")
    else:
        lmap = dict(attn_norm="input_layernorm.weight", q="self_attn.q_proj.weight",
                    k="self_attn.k_proj.weight", v="self_attn.v_proj.weight", o="self_attn.o_proj.weight",
                    q_b="self_attn.q_proj.bias", k_b="self_attn.k_proj.bias", v_b="self_attn.v_proj.bias",
                    o_b="self_attn.o_proj.bias", mlp_norm="post_attention_layernorm.weight",
                    gate="mlp.gate_proj.weight", up="mlp.up_proj.weight", down="mlp.down_proj.weight",
                    up_b="mlp.up_proj.bias", down_b="mlp.down_proj.bias")
        lmap.update(q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight")
        if cfg.sandwich_norm:  # gemma2/3: post_attention_layernorm is the norm on the attention output
            lmap.update(post_attn_norm="post_attention_layernorm.weight", mlp_norm="pre_feedforward_layernorm.weight",
                        post_mlp_norm="post_feedforward_layernorm.weight")
        top = dict(embed="embed_tokens.weight", final_norm="norm.weight")
    layers = []
    for i, ls in enumerate(specs.layers):
        layers.append(M.Layer(**{f.name: (None if getattr(ls, f.name) is None
                                          else f"{pre}layers.{i}.{lmap[f.name]}")
                                 for f in dataclasses.fields(M.Layer)}))
    kw = {f: (None if getattr(specs, f) is None else pre + top[f])
          for f in ("embed", "pos_embed", "proj_in", "proj_out", "final_norm", "final_norm_b")}
    return M.Params(**kw, layers=layers, lm_head=None if specs.lm_head is None else "lm_head.weight")


# ----------------------------------------------------------------------------------- safetensors io
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _read_header(path: Path) -> tuple[dict, int]:
    """The tensor entries of a safetensors file and where its data starts; every entry's dtype, shape
    and byte range are checked against the file's size (a truncated file is refused here, not read)."""
    size = path.stat().st_size
    if size < 8:
        raise UserError(f"{path}: not a safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > min(MAX_HEADER, size - 8):
            raise UserError(f"{path}: header length {n} does not fit the file ({size} bytes): not a safetensors "
                            "file, or cut short")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    for name, e in header.items():
        _check_entry(path, name, e, size - start)
    return header, start


def _check_entry(path: Path, name: str, e, data_bytes: int) -> None:
    where = f"{path}: tensor {name}"
    if not isinstance(e, dict):
        raise UserError(f"{where}: header entry is not an object")
    if e.get("dtype") not in ST_DTYPES:
        raise UserError(f"{where}: unsupported dtype {e.get('dtype')!r} (supported: {', '.join(ST_DTYPES)})")
    shape, offs = e.get("shape"), e.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise UserError(f"{where}: bad shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise UserError(f"{where}: bad data_offsets {offs!r}")
    nbytes = math.prod(shape) * np.dtype(ST_DTYPES[e["dtype"]]).itemsize
    if offs[1] - offs[0] != nbytes:
        raise UserError(f"{where}: {offs[1] - offs[0]} bytes for shape {tuple(shape)} {e['dtype']} "
                        f"(needs {nbytes})")
    if offs[1] > data_bytes:
        raise UserError(f"{where}: data_offsets {offs} outside the file's {data_bytes} data bytes "
                        "(file cut short?)")


def _shard_files(index: Path) -> list[str]:
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{index}: not a valid shard index (not valid JSON: {e})") from None
    wmap = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise UserError(f"{index}: not a valid shard index: it needs {{\"weight_map\": {{tensor: file}}}}")
    for name, fn in wmap.items():
        if not isinstance(fn, str) or Path(fn).name != fn or fn.startswith("."):
            raise UserError(f"{index}: not a valid shard index: weight_map[{name!r}]: bad shard file name {fn!r}")
    return sorted(set(wmap.values()))


def _index(model_dir: Path) -> dict[str, tuple[Path, dict, int]]:
    """tensor name -> (file, header entry, data start) over model.safetensors or a sharded index."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = _shard_files(index)
    elif single.is_file():
        files = ["model.safetensors"]
    else:
        found = [p for p in PICKLES if (model_dir / p).exists()] + [p.name for p in model_dir.glob("*.bin")]
        if found:
            raise UserError(f"{model_dir}: only pickle checkpoints ({found[0]}); selfalign-jax loads "
                            "safetensors only: re-save with save_pretrained(safe_serialization=True)")
        raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for fn in files:
        p = model_dir / fn
        if not p.is_file():
            raise UserError(f"{index}: shard {fn} is missing")
        header, start = _read_header(p)
        for name, e in header.items():
            out[name] = (p, e, start)
    return out


def tensor_shapes(model_dir) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a safetensors checkpoint (single file or sharded index)."""
    return {n: tuple(e["shape"]) for n, (_, e, _) in _index(Path(model_dir)).items()}


def read_tensors(model_dir, names, dtype):
    """The named tensors, one at a time in order, as (aligned) host arrays of `dtype`."""
    index, files = _index(Path(model_dir)), {}
    try:
        for name in names:
            path, e, start = index[name]
            f = files.get(path) or files.setdefault(path, open(path, "rb"))
            yield _read_tensor(f, name, e, start, dtype)
    finally:
        for f in files.values():
            f.close()


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data is `align`-byte aligned, so the CPU backend can alias it."""
    n = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


def _read_tensor(f, name: str, e: dict, start: int, dtype) -> np.ndarray:
    """One tensor from an open safetensors file into an aligned host array of `dtype`."""
    a, b = e["data_offsets"]
    src_dt = np.dtype(ST_DTYPES[e["dtype"]])
    arr = _aligned_empty(tuple(e["shape"]), src_dt)
    f.seek(start + a)
    got = f.readinto(memoryview(arr.reshape(-1).view(np.uint8))) if arr.nbytes else 0
    if got != b - a:  # the file shrank since its header was checked
        raise UserError(f"{f.name}: tensor {name}: read {got} of {b - a} bytes (file truncated?)")
    if src_dt != np.dtype(dtype):
        out = _aligned_empty(arr.shape, dtype)
        out[...] = arr
        arr = out
    return arr


def load(model_dir, dtype: str | None = None, shardings: M.Params | None = None):
    """(cfg, params) from an HF directory; tensors go one at a time to the device (or `shardings`).
    dtype: compute/parameter dtype ('float32' default on CPU, 'bfloat16' elsewhere)."""
    model_dir = Path(model_dir)
    raw = read_config(model_dir)
    cfg = config_from_hf(raw, compute_dtype(dtype), _generation_eos(model_dir))
    index = _index(model_dir)
    names, specs = hf_names(cfg), M.param_specs(cfg)
    flat_names, treedef = jax.tree.flatten(names)
    flat_specs = jax.tree.leaves(specs, is_leaf=M.is_spec)
    if not cfg.tied and "lm_head.weight" not in index:
        raise UserError(f"{model_dir}: missing tensor lm_head.weight (config says untied embeddings)")
    # older exports may lack the "model." prefix
    resolve = {n: n if n in index else n.removeprefix("model.") for n in flat_names}
    missing = [n for n in flat_names if resolve[n] not in index]
    expected = set(resolve.values()) | {"lm_head.weight"}
    unexpected = [n for n in index if n not in expected and not n.endswith("rotary_emb.inv_freq")]
    bad = [f"{n} {tuple(index[resolve[n]][1]['shape'])} != expected {s.shape}"
           for n, s in zip(flat_names, flat_specs)
           if n not in missing and tuple(index[resolve[n]][1]["shape"]) != s.shape]
    for what, lst in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
        if lst:
            more = f" (+{len(lst) - 3} more)" if len(lst) > 3 else ""
            raise UserError(f"{model_dir}: {what} tensor{'s' if len(lst) > 1 else ''}: "
                            f"{', '.join(lst[:3])}{more}")
    flat_sh = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat_names)
    leaves, files = [], {}
    try:
        for n, sh in zip(flat_names, flat_sh):
            path, e, start = index[resolve[n]]
            f = files.get(path) or files.setdefault(path, open(path, "rb"))
            arr = _read_tensor(f, resolve[n], e, start, dtype)
            # may_alias: on CPU the aligned host buffer becomes the device buffer (no second copy)
            leaves.append(jax.device_put(arr, sh, may_alias=True))
            del arr
    finally:
        for f in files.values():
            f.close()
    return cfg, jax.tree.unflatten(treedef, leaves)


def load_tokenizer(model_dir, check: bool = True):
    """The checkpoint's tokenizer, via transformers, local files only, no remote code. With `check`, fitted
    to the model's vocab_size (`fit_tokenizer`): tokens the tokenizer class adds by itself past the embedding
    rows are dropped (one note on stderr); ids past the rows that the checkpoint's files define are refused."""
    d = Path(model_dir)
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        raise UserError(f"{d}: no tokenizer (need tokenizer.json, tokenizer.model or vocab files)")
    tok = _auto_tokenizer(d)
    if check and (d / "config.json").is_file():
        tok = fit_tokenizer(tok, read_config(d).get("vocab_size"), d)
    return tok


def _auto_tokenizer(d: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)


def tokenizer_size(tok) -> int:
    """One past the largest id the tokenizer can produce (added tokens included)."""
    return max(max(tok.get_vocab().values(), default=-1) + 1, len(tok))


@dataclasses.dataclass(frozen=True)
class VocabFit:
    """A tokenizer measured against the model's embedding rows (ids 0 .. vocab_size - 1).
    size: ids as transformers builds it (`tokenizer_size`); kept: ids once `dropped` are dropped.
    dropped: tokens past the rows that the tokenizer class adds by itself (the checkpoint's tokenizer files
    give them no id); foreign: ids past the rows that the files define. {id: token} each."""

    size: int
    kept: int
    vocab_size: int | None
    tokenizer_class: str
    dropped: dict[int, str]
    foreign: dict[int, str]

    def why_dropped(self) -> str:
        toks = ", ".join(f"{t!r} (id {i})" for i, t in sorted(self.dropped.items()))
        them = "it" if len(self.dropped) == 1 else "them"
        return (f"{toks}: transformers' {self.tokenizer_class} adds {them} by itself, the checkpoint's tokenizer "
                f"files give {them} no id, and the model has {self.vocab_size} embedding rows")

    def refusal(self) -> str:
        ids = sorted(self.foreign)
        span = f"id {ids[0]}" if len(ids) == 1 else f"ids {ids[0]}-{ids[-1]}"
        return (f"the tokenizer has {self.size} tokens but the model's vocab_size is {self.vocab_size}: the "
                f"tokenizer files define {span} ({self.foreign[ids[0]]!r}{', ...' if len(ids) > 1 else ''}), "
                "past the embedding rows; the tokenizer does not belong to this model")


def vocab_fit(tok, vocab_size, model_dir) -> VocabFit:
    """How `tok` (loaded from model_dir) fits vocab_size rows (no check when vocab_size is not an int)."""
    size, cls = tokenizer_size(tok), type(tok).__name__
    if not isinstance(vocab_size, int) or size <= vocab_size:
        return VocabFit(size, size, vocab_size, cls, {}, {})
    vocab = tok.get_vocab()
    past = {i: t for t, i in vocab.items() if i >= vocab_size}
    own = _file_ids(Path(model_dir))
    added = {i: str(t) for i, t in tok.added_tokens_decoder.items()}
    dropped = {i: t for i, t in past.items() if added.get(i) == t and t not in own}
    kept = max(max((i for i in vocab.values() if i not in dropped), default=-1) + 1, len(tok) - len(dropped))
    return VocabFit(size, kept, vocab_size, cls, dropped, {i: t for i, t in past.items() if i not in dropped})


def _file_ids(d: Path) -> set[str]:
    """Tokens the checkpoint's tokenizer files give an id: tokenizer.json's vocabulary and added tokens,
    tokenizer_config.json's added_tokens_decoder, added_tokens.json, vocab.json / vocab.txt."""
    own: set[str] = set()
    if (d / "tokenizer.json").is_file():
        raw = _json_object(d / "tokenizer.json")
        vocab = (raw.get("model") or {}).get("vocab") or {}
        own |= set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab if isinstance(v, list) and v}
        own |= {t.get("content") for t in raw.get("added_tokens") or [] if isinstance(t, dict)}
    if (d / "tokenizer_config.json").is_file():
        dec = _json_object(d / "tokenizer_config.json").get("added_tokens_decoder")
        own |= {t.get("content") for t in dec.values() if isinstance(t, dict)} if isinstance(dec, dict) else set()
    for name in ("added_tokens.json", "vocab.json"):
        if (d / name).is_file():
            own |= set(_json_object(d / name))
    if (d / "vocab.txt").is_file():
        own |= set((d / "vocab.txt").read_text(encoding="utf-8").splitlines())
    return own


_NOTED: set[tuple] = set()  # notes printed by this process (one per tokenizer class and dropped tokens)


def fit_tokenizer(tok, vocab_size, model_dir):
    """`tok` without the tokens its class adds past vocab_size (`vocab_fit`; the same trim as a GGUF
    conversion's export, `_trim_added_tokens`), with one note on stderr; ids past the rows that the
    checkpoint's files define raise UserError."""
    fit = vocab_fit(tok, vocab_size, model_dir)
    if fit.foreign:
        raise UserError(f"{model_dir}: {fit.refusal()}")
    if not fit.dropped:
        return tok
    key = (fit.tokenizer_class, vocab_size, tuple(sorted(fit.dropped.items())))
    if key not in _NOTED:
        _NOTED.add(key)
        print(f"{model_dir}: the tokenizer drops {fit.why_dropped()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as t:
        tok.save_pretrained(t)
        _trim_added_tokens(Path(t), vocab_size)
        trimmed = _auto_tokenizer(Path(t))
    trimmed.name_or_path = tok.name_or_path
    left = tokenizer_size(trimmed)
    if left != fit.kept:  # the trim is exact for every class transformers ships; say so if one is not
        raise UserError(f"{model_dir}: the tokenizer has {left} tokens after dropping {fit.why_dropped()} "
                        f"(expected {fit.kept})")
    return trimmed


def check_ids(ids: Sequence[Sequence[int]], vocab_size: int, where: Sequence[str], tokenizer=None) -> None:
    """Refuse encoded text holding an id past the model's embedding rows; where[i] names row i's source."""
    for i, row in enumerate(ids):
        top = max(row, default=-1)
        if top >= vocab_size:
            tok = f" ({tokenizer.convert_ids_to_tokens(int(top))!r})" if tokenizer is not None else ""
            raise UserError(f"{where[i]}: the text encodes to id {top}{tok}, past the model's {vocab_size} "
                            "embedding rows; the tokenizer does not belong to this model")


def _drop_remote_code(p: Path) -> None:
    """Remove remote-code entries from a copied JSON config (the copy is rewritten only if it had any)."""
    if not p.is_file():
        return
    raw = _json_object(p)
    if any(k in raw for k in REMOTE_CODE):
        p.write_text(json.dumps({k: v for k, v in raw.items() if k not in REMOTE_CODE}, indent=2,
                                ensure_ascii=False) + "\n", encoding="utf-8")


def _trim_added_tokens(d: Path, vocab_size: int) -> None:
    """Drop added tokens with ids past the model's embedding rows from tokenizer files that transformers
    wrote for a tokenizer built in memory (its class may add e.g. <|endoftext|> at id vocab_size, as a GGUF
    conversion's does): the model has no row for them, so the tokenizer must not produce them. Special-token
    entries naming a dropped token become null, so the class does not add it again when loading."""
    gone: set[str] = set()
    tj = d / "tokenizer.json"
    if tj.is_file():
        raw = _json_object(tj)
        gone |= {t.get("content") for t in raw.get("added_tokens") or [] if t.get("id", 0) >= vocab_size}
        if gone:
            raw["added_tokens"] = [t for t in raw["added_tokens"] if t.get("id", 0) < vocab_size]
            tj.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        conf = _json_object(tc)
        dec = conf.get("added_tokens_decoder")
        if isinstance(dec, dict):
            past = {k for k in dec if k.isdigit() and int(k) >= vocab_size}
            gone |= {dec[k].get("content") for k in past if isinstance(dec[k], dict)}
            conf["added_tokens_decoder"] = {k: v for k, v in dec.items() if k not in past}
        if gone:
            tc.write_text(json.dumps(_without_tokens(conf, gone), indent=2, ensure_ascii=False) + "\n",
                          encoding="utf-8")
    if gone and (d / "special_tokens_map.json").is_file():
        fileio.write_json(d / "special_tokens_map.json", _without_tokens(_json_object(d / "special_tokens_map.json"),
                                                                         gone))
    if gone and (d / "added_tokens.json").is_file():
        fileio.write_json(d / "added_tokens.json", {k: v for k, v in _json_object(d / "added_tokens.json").items()
                                                    if k not in gone})


def _without_tokens(conf: dict, gone: set[str]) -> dict:
    """A tokenizer config whose special-token entries (NAME_token, additional / extra special tokens) no
    longer name the tokens in `gone`."""
    def named(v) -> str | None:
        return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None

    out = {}
    for k, v in conf.items():
        if k.endswith("_token") and named(v) in gone:
            v = None
        elif k in ("additional_special_tokens", "extra_special_tokens") and isinstance(v, list):
            v = [x for x in v if named(x) not in gone]
        elif k == "extra_special_tokens" and isinstance(v, dict):
            v = {n: x for n, x in v.items() if named(x) not in gone}
        out[k] = v
    return out


def _write_safetensors(path: Path, items: list[tuple[str, jax.Array]], dtype) -> None:
    """Stream tensors to one safetensors file: header from shapes, then one tensor at a time."""
    header, off = {}, 0
    for name, x in items:
        nbytes = math.prod(x.shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": ST_NAMES[np.dtype(dtype)], "shape": list(x.shape),
                        "data_offsets": [off, off + nbytes]}
        off += nbytes
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, x in items:  # no copies beyond a cast: one tensor's bytes at a time
            a = np.asarray(jax.device_get(x))
            a = np.ascontiguousarray(a if a.dtype == np.dtype(dtype) else a.astype(dtype))
            f.write(a.reshape(-1).view(np.uint8).data)
            del a


def save(out_dir, cfg: M.Config, params: M.Params, tokenizer_from=None, dtype: str | None = None,
         base_config: dict | None = None, max_shard_bytes: int = 4 << 30, overwrite: bool = False):
    """Export to an HF directory (config.json, safetensors, generation_config.json, tokenizer files).
    tokenizer_from: a source directory to copy tokenizer files from, or a tokenizer object.
    Written to a temporary directory first, then renamed; an existing non-empty out_dir is refused
    unless overwrite."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory exists and is not empty: {out}")
    dtype = dtype or cfg.dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype: unsupported {dtype!r} (float32, bfloat16, float16)")
    with fileio.atomic(out, directory=True) as tmp:
        conf = {k: v for k, v in {**(base_config or {}), **config_to_hf(cfg)}.items() if k not in REMOTE_CODE}
        conf["dtype"] = conf["torch_dtype"] = dtype
        conf.pop("transformers_version", None)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        gen = {"bos_token_id": cfg.bos_id, "pad_token_id": cfg.pad_id,
               "eos_token_id": cfg.eos_ids[0] if len(cfg.eos_ids) == 1 else list(cfg.eos_ids) or None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        items = [(n, x) for n, x in zip(jax.tree.leaves(hf_names(cfg)), jax.tree.leaves(params))]
        shards, cur, size = [], [], 0
        for it in items:
            nb = math.prod(it[1].shape) * np.dtype(dtype).itemsize
            if cur and size + nb > max_shard_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append(it)
            size += nb
        shards.append(cur)
        if len(shards) == 1:
            _write_safetensors(tmp / "model.safetensors", shards[0], dtype)
        else:
            wmap = {}
            for j, sh in enumerate(shards):
                fn = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / fn, sh, dtype)
                wmap.update({n: fn for n, _ in sh})
            total = sum(math.prod(x.shape) * np.dtype(dtype).itemsize for _, x in items)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))
        if isinstance(tokenizer_from, (str, os.PathLike)):
            for f in TOKENIZER_FILES:
                if (Path(tokenizer_from) / f).is_file():
                    shutil.copy2(Path(tokenizer_from) / f, tmp / f)
        elif tokenizer_from is not None:
            tokenizer_from.save_pretrained(str(tmp))
            _trim_added_tokens(tmp, cfg.vocab_size)
        _drop_remote_code(tmp / "tokenizer_config.json")
    return out
