"""report.md (the paper's table: pretrained, SFT, ICL-kNN, ICL-random, one-round, ISARA it1..T) and
report.png (metrics per iteration, baselines as dashed lines)."""

from __future__ import annotations

from pathlib import Path

NAMES = {"pretrained": "Pretrained", "sft": "SFT (seeds)", "icl-knn": "ICL-kNN", "icl-random": "ICL-random",
         "one-round": "One round"}
DATA_COLS = ("candidates", "kept", "scaling_ratio")


def metric_columns(rows: list[dict]) -> list[str]:
    skip = {"row", "iteration", "n", "dropped", *DATA_COLS}
    cols = []
    for r in rows:
        for k, v in r.items():
            if k not in skip and k not in cols and isinstance(v, (int, float)) and not isinstance(v, bool):
                cols.append(k)
    return cols


def row_name(r: dict) -> str:
    row = r["row"]
    return NAMES.get(row, f"ISARA it{r['iteration']}" if row.startswith("isara_it") else row)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    cols = metric_columns(rows) + [c for c in DATA_COLS if any(c in r for r in rows)]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {row_name(r)} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write(root: Path, rows: list[dict], title: str = "ISARA run") -> None:
    import os
    import tempfile

    drops = [r for r in rows if r.get("dropped")]
    md = [f"# {title}", "", table(rows), ""]
    if drops:
        md += ["## Filter drops per iteration", "", "| iteration | " + " | ".join(drops[0]["dropped"]) + " |",
               "|---|" + "---|" * len(drops[0]["dropped"])]
        md += [f"| {r['iteration']} | " + " | ".join(str(v) for v in r["dropped"].values()) + " |" for r in drops]
        md.append("")
    md += ["Scaling ratio = kept self-generated samples so far / seeds. Metrics: see metrics.jsonl.",
           "", "![metrics per iteration](report.png)", ""]
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".report.md.")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(md))
    os.replace(tmp, root / "report.md")
    plot(root / "report.png", rows)


def plot(path: Path, rows: list[dict]) -> None:
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = metric_columns(rows) or ["scaling_ratio"]
    iters = [r for r in rows if r["row"].startswith("isara_it")]
    base = {r["row"]: r for r in rows if not r["row"].startswith("isara_it")}
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4), squeeze=False)
    for ax, c in zip(axes[0], cols):
        xs, ys = [], []
        if c in base.get("pretrained", {}):
            xs.append(0)
            ys.append(base["pretrained"][c])
        for r in iters:
            if c in r:
                xs.append(r["iteration"])
                ys.append(r[c])
        ax.plot(xs, ys, "o-", color="C0", label="ISARA")
        for i, (name, r) in enumerate(base.items()):
            if name != "pretrained" and c in r:
                ax.axhline(r[c], ls="--", color=f"C{i + 1}", label=NAMES.get(name, name))
        ax.set_title(c)
        ax.set_xlabel("iteration (0 = pretrained)")
        ax.set_xticks(range(0, len(iters) + 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".report.png.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
