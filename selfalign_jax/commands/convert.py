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
    from selfalign_jax import api

    api.convert(model, out, dtype, overwrite)
