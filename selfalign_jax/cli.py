"""`selfalign` entry point: one tyro subcommand per module in `selfalign_jax.commands`."""

import importlib
import sys

from selfalign_jax.errors import UserError

# name on the command line -> module under selfalign_jax.commands (each has `main`)
SUBCOMMANDS = {
    "inspect": "inspect_model",
    "convert": "convert",
    "generate": "generate",
    "finetune": "finetune",
    "data": "data",
    "index": "index",
    "run": "run",
    "baseline": "baseline",
    "eval": "evaluate",
    "demo": "demo",
    "report": "report",
}


def _load():
    funcs = {}
    for name, mod in SUBCOMMANDS.items():
        try:
            m = importlib.import_module(f"selfalign_jax.commands.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"selfalign_jax.commands.{mod}":
                continue  # not built yet
            raise
        funcs[name] = m.main
    return funcs


def main(argv=None):
    if argv is None:  # the `selfalign` command itself (not a call from Python code)
        from selfalign_jax import hostmem

        hostmem.reexec()  # huge pages for XLA:CPU's per-call temporaries (see hostmem)
    import tyro

    funcs = _load()
    try:
        tyro.extras.subcommand_cli_from_dict(funcs, args=argv, prog="selfalign")
    except UserError as e:
        print(f"selfalign: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
