"""`selfalign report`: re-render a run's report, or compare several runs side by side."""

from pathlib import Path
from typing import Annotated

import tyro


def main(run_dirs: Annotated[tuple[Path, ...], tyro.conf.Positional], out: Path | None = None,
         title: str | None = None) -> None:
    """Rewrite RUN_DIR/report.md and report.png from the files in the run directory. With several run
    directories (e.g. the same settings with different seeds), also write a side-by-side report with the
    mean and spread of each model's headline metric into OUT (default: ./report-compare).

    Args:
        run_dirs: one or more run directories (made by `selfalign run` / `baseline` / `demo`).
        out: where the comparison of several runs goes (report.md + report.png).
        title: report title.
    """
    from selfalign_jax.app import report
    from selfalign_jax.core import fileio
    from selfalign_jax.core.errors import UserError

    if not run_dirs:
        raise UserError("give at least one run directory")
    runs = []
    for d in run_dirs:  # every directory is checked before any report is written
        if not d.is_dir():
            raise UserError(f"{d}: no such run directory")
        run = report.read_run(d)
        if not run["rows"]:
            raise UserError(f"{d}: no metrics.jsonl (not a finished run directory?)")
        runs.append(run)
    if len(runs) > 1:
        fileio.check_output(out or Path("report-compare"), "--out", directory=True, overwrite=True)
    for d in run_dirs:
        report.write(d, title=title or "ISARA run")
        print(f"{d / 'report.md'}")
    if len(runs) > 1:
        names = [r["name"] for r in runs]
        for i, r in enumerate(runs):  # same basename in different folders: use the path
            if names.count(r["name"]) > 1:
                r["name"] = str(run_dirs[i])
        path = report.compare(runs, out or Path("report-compare"), title or "ISARA runs compared")
        print(report.headline_table(runs))
        print(f"report: {path}")
    else:
        print(report.headline_table(runs))
