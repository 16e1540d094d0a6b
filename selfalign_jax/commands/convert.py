"""`selfalign convert`: load a checkpoint (HF directory or GGUF file), then export it as an HF directory."""

from pathlib import Path
from typing import Literal


def main(model: Path, out: Path, dtype: Literal["float32", "bfloat16"] = "float32",
         overwrite: bool = False) -> None:
    """Load a Hugging Face checkpoint directory or a GGUF file (architectures llama, qwen2, qwen3,
    gemma2, gemma3; dequantized) and export it as a Hugging Face directory (safetensors, config,
    generation config, tokenizer files with the chat template).

    Args:
        model: source checkpoint directory, or a .gguf file.
        out: destination directory (must not exist or be empty, unless --overwrite).
        dtype: dtype of the exported weights.
        overwrite: replace a non-empty destination.
    """
    import json
    import sys

    from selfalign_jax import checkpoint, fileio, gguf_import

    fileio.check_output(out, inputs={"--model": model}, directory=True, overwrite=overwrite)
    if model.suffix.lower() == ".gguf" or model.is_file():
        cfg = gguf_import.convert(model, out, dtype=dtype, overwrite=overwrite, progress=sys.stderr.isatty())
        print(f"wrote {out} ({cfg.family}, {dtype}, from GGUF {model.name})")
        return
    checkpoint.load_tokenizer(model)  # fail early if there is none
    cfg, params = checkpoint.load(model, dtype="float32")
    base = json.loads((model / "config.json").read_text())
    checkpoint.save(out, cfg, params, tokenizer_from=model, dtype=dtype, base_config=base, overwrite=overwrite)
    print(f"wrote {out} ({cfg.family}, {dtype})")
