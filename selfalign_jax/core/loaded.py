"""The one loaded-model type: config, parameters, tokenizer and where they came from."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from selfalign_jax.core import checkpoint
from selfalign_jax.core import model as M
from selfalign_jax.core.mesh import compute_dtype


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    cfg: M.Config
    params: M.Params
    tokenizer: Any
    path: Path | None = None  # the HF directory it was loaded from (None: built in memory)

    @classmethod
    def load(cls, path, dtype: str | None = "auto", shardings=None) -> "LoadedModel":
        """From an HF directory; dtype "auto" follows `mesh.compute_dtype`."""
        cfg, params = checkpoint.load(path, dtype=compute_dtype(dtype), shardings=shardings)
        return cls(cfg, params, checkpoint.load_tokenizer(path), Path(path))
