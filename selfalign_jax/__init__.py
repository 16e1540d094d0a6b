"""selfalign-jax: ISARA self-alignment in pure JAX.

The verbs are in `selfalign_jax.api` (run, baseline, generate, finetune, evaluate / eval, data, convert, plan);
those whose names are not also submodules (run, baseline, generate, finetune, convert, eval) can be taken from
the package itself, imported on first use (`import selfalign_jax` stays light)."""

__version__ = "0.1.0"

_VERBS = ("run", "baseline", "generate", "finetune", "convert", "eval")  # data / plan / evaluate are modules


def __getattr__(name):
    if name in _VERBS:
        from selfalign_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'selfalign_jax' has no attribute {name!r}")
