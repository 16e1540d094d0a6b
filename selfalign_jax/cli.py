"""`selfalign` entry point: one tyro subcommand per module in `selfalign_jax.commands`.

Every command module is imported to build the help, so each imports JAX, transformers and the package's
heavy modules inside its `main` (start-up time), and only light ones (configs, tyro) at the top."""

import importlib
import sys
from pathlib import Path

import tyro

from selfalign_jax import hostmem
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
    "plan": "plan",
}


def _load():
    return {name: importlib.import_module(f"selfalign_jax.commands.{mod}").main for name, mod in SUBCOMMANDS.items()}


def started_as_command(argv0: str | None = None) -> bool:
    """This process is `selfalign ...` or `python -m selfalign_jax.cli ...` (not a notebook or a script
    that calls main())."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    p = Path(argv0)
    return p.name == "selfalign" or p.parts[-2:] == ("selfalign_jax", "cli.py")


def main(argv=None):
    if argv is None and started_as_command():  # the `selfalign` command itself (not a call from Python code)
        hostmem.reexec()  # huge pages for XLA:CPU's per-call temporaries (see hostmem)
    funcs = _load()
    try:
        tyro.extras.subcommand_cli_from_dict(funcs, args=argv, prog="selfalign")
    except UserError as e:
        print(f"selfalign: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
