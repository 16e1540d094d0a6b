"""`selfalign inspect`: what a checkpoint directory (or GGUF file) holds."""

from pathlib import Path


def summary(model_dir) -> dict:
    """Family, parameter count, dtype, vocabulary, context length, tied or not (reads headers only)."""
    from selfalign_jax.core import checkpoint, gguf_import, model as M
    from selfalign_jax.core.errors import UserError

    tokenizer = None
    if Path(model_dir).suffix.lower() == ".gguf" or Path(model_dir).is_file():
        _, cfg, lazy = gguf_import.read(model_dir)
        dtypes = sorted({gguf_import.type_name(t.tensor) for t in lazy.values()})
    else:
        raw = checkpoint.read_config(model_dir)
        index = checkpoint._index(Path(model_dir))
        cfg = checkpoint.config_from_hf(raw, "float32")
        dtypes = sorted({e["dtype"] for _, e, _ in index.values()})
        try:
            tokenizer = _tokenizer(checkpoint.load_tokenizer(model_dir, check=False), cfg.vocab_size, model_dir)
        except UserError as e:
            tokenizer = f"none ({e})"
    specs = jax_leaves(M.param_specs(cfg))
    n = sum(_prod(s.shape) for s in specs)
    return {"family": cfg.family, "parameters": n, "dtype": ",".join(dtypes),
            "vocabulary": cfg.vocab_size, "tokenizer": tokenizer, "context_length": cfg.max_pos,
            "tied_embeddings": cfg.tied,
            "layers": cfg.n_layers, "hidden": cfg.hidden, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
            "sliding_window": next((w for w in cfg.windows if w), None), "rope": cfg.rope_type
            if cfg.rope_theta is not None else "learned positions"}


def _tokenizer(tok, vocab_size: int, model_dir) -> str:
    """The tokenizer's size as loading fits it to the model's rows: the ids it drops and why, or why it is
    refused."""
    from selfalign_jax.core import checkpoint

    fit = checkpoint.vocab_fit(tok, vocab_size, model_dir)
    if fit.foreign:
        return f"{fit.size} ids (MORE than vocab_size {vocab_size}: refused at load)"
    if fit.dropped:
        return f"{fit.kept} ids ({fit.size} as transformers builds it; loading drops {fit.why_dropped()})"
    return f"{fit.size} ids"


def jax_leaves(tree):
    import jax
    from selfalign_jax.core import model as M

    return jax.tree.leaves(tree, is_leaf=M.is_spec)


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def main(model: Path, json: bool = False) -> None:
    """Show a checkpoint's family, parameter count, dtype, vocabulary, context length and tying.

    Args:
        model: Hugging Face checkpoint directory (config.json + safetensors), or a .gguf file.
        json: print one JSON object instead of a table.
    """
    import json as _json

    s = summary(model)
    if json:
        print(_json.dumps(s))
        return
    for k, v in s.items():
        if k == "parameters":
            v = f"{v:,} ({v / 1e6:.1f}M)"
        print(f"{k:>16}: {v}")
