"""`selfalign` entry point: one tyro subcommand per module in `selfalign_jax.commands`.

Errors: a `UserError` (bad input) prints one line and exits 2; any other exception prints one line plus
"run with SELFALIGN_DEBUG=1 for the traceback" and exits 1 (SELFALIGN_DEBUG=1 lets it propagate).

Every command module is imported to build the help, so each imports JAX, transformers and the package's
heavy modules inside its `main` (start-up time), and only light ones (configs, tyro) at the top."""

import importlib
import os
import sys
from pathlib import Path

import tyro

from selfalign_jax.app import config
from selfalign_jax.core import fileio, hostmem
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.settings import SettingError

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
    "report": "report",
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
    config.COMMAND_LINE = list(sys.argv[1:] if argv is None else argv)
    try:
        tyro.extras.subcommand_cli_from_dict(funcs, args=argv, prog="selfalign")
    except UserError as e:
        if isinstance(e, SettingError):  # name the flag as typed (`run --sft.grad-accum`)
            e = e.as_typed(config.COMMAND_LINE)
        print(f"selfalign: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("selfalign: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug or an environment failure: one line, the traceback on request
        if os.environ.get("SELFALIGN_DEBUG"):
            raise
        disk = fileio.disk_error(e, e.filename) if isinstance(e, OSError) and e.filename else None
        if disk is not None:
            print(f"selfalign: error: {disk}", file=sys.stderr)
            sys.exit(1)
        msg = " ".join(str(e).split())[:300]
        print(f"selfalign: internal error: {type(e).__name__}: {msg} "
              "(run with SELFALIGN_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
    finally:
        config.COMMAND_LINE = None  # a later call from Python code has no command line


if __name__ == "__main__":
    main()
