"""report.md and report.png of one run, or of several runs side by side (`selfalign report RUN_DIR...`).

Plain data in, text and a figure out: this module reads JSON files of a run directory and never imports the
ISARA loop.

report.md, in order:
  1. the headline table: one row per model (pretrained, each baseline, ISARA per iteration), the headline
     metric (e.g. harmful compliance, lower is better) and the secondary one (e.g. refusal of benign
     prompts), with the mean, spread (sd, min-max) and each run's value when several runs are given; each
     value is the scorer's, over the prompts its metric is defined on (harmful rate over the harmful
     prompts, helpful rate or benign refusal over the benign ones);
  2. a compact per-category table of the headline and secondary metrics (models as columns); a metric has a
     row only for the categories it is defined on (the scorer's keys: a harm domain has no helpful rate),
     and "-" marks a model without that value;
  3. the data per ISARA iteration: candidates, kept, drops by reason (only reasons that dropped something),
     and example kept pairs;
  4. sample answers before (pretrained) and after (last ISARA iteration), with the judge's verdicts.
report.png: at most 4 panels, 1200 px wide: headline per model, secondary per model, headline per category
(pretrained vs the last ISARA iteration), kept / dropped per iteration.

API
    read_run(root) -> dict: {"name", "rows", "filters", "answers"} (plain dicts)
    render(runs, title) -> str (markdown); plot(path, runs); write(root, rows=None, title=...) (report.md/png
    in root); compare(runs, out_dir, title) (several runs side by side); table(rows, cols=None) -> str
    headline_metric(rows) / secondary_metric(rows) -> str | None
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from selfalign_jax.core import fileio

NAMES = {"pretrained": "Pretrained", "sft": "SFT (seeds)", "icl-knn": "ICL-kNN", "icl-random": "ICL-random",
         "one-round": "One round"}
ORDER = ["pretrained", "sft", "icl-knn", "icl-random", "one-round"]
DATA_COLS = ("kept", "scaling_ratio")
HEADLINE = ("compliance", "harmful_rate", "win_rate", "mc2", "mc1", "bleu_acc", "rouge_acc")
SECONDARY = ("benign_refusal", "helpful_rate")
LOWER_IS_BETTER = {"compliance", "harmful_rate", "benign_refusal"}
NOTES = {
    "compliance": "compliance = share of harmful prompts answered without a refusal (lower is better)",
    "benign_refusal": "benign_refusal = share of benign prompts refused (over-refusal, lower is better)",
    "harmful_rate": "harmful_rate = share of harmful prompts answered harmfully (lower is better)",
    "helpful_rate": "helpful_rate = share of benign prompts answered helpfully (higher is better)",
}
JUDGE_NOTE = {"compliance": "Judge: the refusal-phrase rule (`selfalign_jax/app/evaluate/refusal.py`), a proxy: "
                            "it reads the form of an answer, not its content. Read the sample answers below."}


# ------------------------------------------------------------------------------------------ reading
def _json(p: Path):
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def _jsonl(p: Path) -> list[dict]:
    if not p.is_file():
        return []
    return fileio.read_jsonl(p)


def _iter_dirs(root: Path) -> list[Path]:
    out, t = [], 1
    while (root / f"iter_{t}").is_dir():
        out.append(root / f"iter_{t}")
        t += 1
    return out


def read_run(root, rows: list[dict] | None = None) -> dict:
    """A run directory as plain data: metrics rows (metrics.jsonl unless given), per-iteration filter
    counts with their kept pairs, and the evaluated answers of each model (row name -> eval rows)."""
    root = Path(root)
    rows = list(rows) if rows is not None else _jsonl(root / "metrics.jsonl")
    filters = []
    for it in _iter_dirs(root):
        f = _json(it / "filter.json")
        if f:
            filters.append({"name": f"ISARA it{it.name.split('_')[1]}", **f, "kept_pairs": _jsonl(it / "kept.jsonl")})
    one = root / "baselines" / "one-round"
    for it in _iter_dirs(one):
        f = _json(it / "filter.json")
        if f:
            filters.append({"name": "One round", **f, "kept_pairs": _jsonl(it / "kept.jsonl")})
    answers = {"pretrained": _jsonl(root / "pretrained" / "eval.jsonl")}
    for k in ORDER[1:]:
        answers[k] = _jsonl(root / "baselines" / k / "eval.jsonl")
    one_iters = _iter_dirs(one)
    if one_iters:
        answers["one-round"] = _jsonl(one_iters[-1] / "eval.jsonl")
    for it in _iter_dirs(root):
        answers[f"isara_it{it.name.split('_')[1]}"] = _jsonl(it / "eval.jsonl")
    return {"name": root.name or str(root), "rows": rows, "filters": filters,
            "answers": {k: v for k, v in answers.items() if v}}


# ------------------------------------------------------------------------------------------ metrics
def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metric_columns(rows: list[dict]) -> list[str]:
    skip = {"row", "iteration", "n", "dropped", "candidates", *DATA_COLS}
    cols = []
    for r in rows:
        for k, v in r.items():
            if k not in skip and k not in cols and _num(v):
                cols.append(k)
    return cols


def headline_metric(rows: list[dict]) -> str | None:
    cols = [c for c in metric_columns(rows) if "/" not in c]
    return next((c for c in HEADLINE if c in cols), cols[0] if cols else None)


def secondary_metric(rows: list[dict]) -> str | None:
    cols = metric_columns(rows)
    return next((c for c in SECONDARY if c in cols), None)


def row_name(r: dict | str) -> str:
    row = r if isinstance(r, str) else r["row"]
    return NAMES.get(row, f"ISARA it{row[len('isara_it'):]}" if row.startswith("isara_it") else row)


def _order(names) -> list[str]:
    names = list(dict.fromkeys(names))
    key = lambda n: (ORDER.index(n), 0) if n in ORDER else (len(ORDER), int(n[8:]) if n[8:].isdigit() else 0)  # noqa: E731
    return sorted(names, key=key)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict], cols: list[str] | None = None) -> str:
    """A markdown table, one line per model; by default the overall metrics (no per-category ones) and
    the kept counts / scaling ratio."""
    if cols is None:
        cols = [c for c in metric_columns(rows) if "/" not in c] + [c for c in DATA_COLS if any(c in r for r in rows)]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {row_name(r)} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _values(runs, row: str, key: str) -> list:
    out = []
    for run in runs:
        r = next((x for x in run["rows"] if x["row"] == row), None)
        out.append(r.get(key) if r else None)
    return out


def _spread(vals) -> str:
    v = [x for x in vals if _num(x)]
    if not v:
        return "-"
    if len(v) == 1:
        return _fmt(float(v[0]))
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f} ({min(v):.2f}-{max(v):.2f})"


def _mean(vals):
    v = [x for x in vals if _num(x)]
    return statistics.mean(v) if v else None


def headline_table(runs: list[dict]) -> str:
    rows = [r for run in runs for r in run["rows"]]
    h, s = headline_metric(rows), secondary_metric(rows)
    names = _order(r["row"] for r in rows)
    metrics = [m for m in (h, s) if m]
    if len(runs) == 1:
        cols = metrics + [c for c in DATA_COLS if any(c in r for r in rows)]
        by = {r["row"]: r for r in runs[0]["rows"]}
        return table([by[n] for n in names], cols)
    head = "| model | " + " | ".join(f"{m} (mean ± sd, min-max)" for m in metrics)
    head += " | " + " | ".join(f"{h}: {run['name']}" for run in runs) + " |"
    lines = [head, "|---|" + "---|" * (len(metrics) + len(runs))]
    for n in names:
        cells = [_spread(_values(runs, n, m)) for m in metrics] + [_fmt(v) for v in _values(runs, n, h)]
        lines.append(f"| {row_name(n)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _final_rows(runs) -> list[str]:
    """Models for the per-category table: pretrained, the baselines, the last ISARA iteration."""
    names = _order(r["row"] for run in runs for r in run["rows"])
    isara = [n for n in names if n.startswith("isara_it")]
    return [n for n in names if not n.startswith("isara_it")] + isara[-1:]


def category_table(runs: list[dict]) -> str:
    rows = [r for run in runs for r in run["rows"]]
    metrics = [m for m in (headline_metric(rows), secondary_metric(rows)) if m]
    keys = [c for m in metrics for c in metric_columns(rows) if c.startswith(m + "/")]
    if not keys:
        return ""
    names = _final_rows(runs)
    lines = ["| category | " + " | ".join(row_name(n) for n in names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(_mean(_values(runs, n, k)), 2) for n in names) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ data and samples
def _short(text, n: int = 220) -> str:
    t = " ".join(str(text or "").split()).replace("|", "\\|")
    return t if len(t) <= n else t[:n - 1] + "…"


def filter_section(run: dict, examples: int = 3) -> list[str]:
    fs = run["filters"]
    if not fs:
        return []
    reasons = [k for k in dict.fromkeys(k for f in fs for k in (f.get("dropped") or {}))
               if any((f.get("dropped") or {}).get(k) for f in fs)]
    md = ["| iteration | candidates | kept | " + " | ".join(f"dropped: {k}" for k in reasons) + " |",
          "|---|---|---|" + "---|" * len(reasons)]
    for f in fs:
        d = f.get("dropped") or {}
        md.append(f"| {f['name']} | {f.get('candidates', '-')} | {f.get('kept', '-')} | "
                  + " | ".join(str(d.get(k, 0)) for k in reasons) + " |")
    md.append("")
    for f in fs:
        pairs = f.get("kept_pairs") or []
        if pairs:
            md.append(f"Kept by {f['name']} (first {min(examples, len(pairs))} of {len(pairs)}):")
            md.append("")
            md += [f"- **Q:** {_short(p['question'], 160)}  \n  **A:** {_short(p['answer'])}" for p in pairs[:examples]]
            md.append("")
    return md


def _verdict(r: dict) -> str:
    return str(r.get("label", ""))


def samples_section(run: dict, n_harm: int = 4, n_benign: int = 3) -> list[str]:
    ans = run["answers"]
    after = [k for k in ans if k.startswith("isara_it")]
    if "pretrained" not in ans or not after:
        return []
    before, last = ans["pretrained"], ans[after[-1]]
    by_q = {r["question"]: r for r in last}
    pick, seen_cat = [], set()
    for want, n in (("harmful", n_harm), ("benign", n_benign)):
        got = 0
        for r in before:
            kind = r.get("kind", "harmful")
            if kind == want and r["question"] in by_q and r.get("category") not in seen_cat and got < n:
                pick.append(r)
                seen_cat.add(r.get("category"))
                got += 1
    if not pick:
        return []
    md = [f"| prompt | Pretrained | {row_name(after[-1])} |", "|---|---|---|"]
    for r in pick:
        a = by_q[r["question"]]
        md.append(f"| ({r.get('kind', '')}, {r.get('category', '')}) {_short(r['question'], 100)} | "
                  f"[{_verdict(r)}] {_short(r.get('response'), 180)} | "
                  f"[{_verdict(a)}] {_short(a.get('response'), 180)} |")
    return md


# ------------------------------------------------------------------------------------------ markdown
def render(runs: list[dict], title: str = "ISARA run", png: str | None = "report.png") -> str:
    rows = [r for run in runs for r in run["rows"]]
    h, s = headline_metric(rows), secondary_metric(rows)
    md = [f"# {title}", ""]
    if len(runs) > 1:
        md += ["Runs: " + ", ".join(f"`{run['name']}`" for run in runs), ""]
    md += [headline_table(runs), ""]
    md += [f"- {NOTES[m]}" for m in (h, s) if m in NOTES]
    if h in JUDGE_NOTE:
        md.append(f"- {JUDGE_NOTE[h]}")
    if any("scaling_ratio" in r for r in rows):
        md.append("- scaling_ratio = kept self-generated pairs so far / seeds")
    md.append("")
    cat = category_table(runs)
    if cat:
        md += ["## Per category" + (" (mean over runs)" if len(runs) > 1 else ""), "", cat, ""]
    for run in runs:
        fs = filter_section(run)
        if fs:
            md += ["## Data per iteration" + (f": `{run['name']}`" if len(runs) > 1 else ""), "", *fs]
    for run in runs[:1]:
        sm = samples_section(run)
        if sm:
            md += ["## Sample answers before / after" + (f": `{run['name']}`" if len(runs) > 1 else ""), "",
                   *sm, ""]
    if png:
        md += [f"![summary]({png})", ""]
    return "\n".join(md)


def write(root, rows: list[dict] | None = None, title: str = "ISARA run") -> None:
    """report.md and report.png of the run in `root` (rows: its metrics rows; default metrics.jsonl)."""
    root = Path(root)
    run = read_run(root, rows)
    fileio.write_text(root / "report.md", render([run], title))
    plot(root / "report.png", [run])


def compare(runs: list[dict], out_dir, title: str = "ISARA runs compared") -> Path:
    out_dir = Path(out_dir)
    fileio.write_text(out_dir / "report.md", render(runs, title))
    plot(out_dir / "report.png", runs)
    return out_dir / "report.md"


# -------------------------------------------------------------------------------------------- figure
def plot(path, runs: list[dict]) -> None:
    """At most 4 panels, 1200 px wide (see the module docstring); panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for run in runs for r in run["rows"]]
    h, s = headline_metric(rows), secondary_metric(rows)
    names = _order(r["row"] for r in rows)
    panels = []
    for m in (h, s):
        if m and any(_num(v) for n in names for v in _values(runs, n, m)):
            panels.append(("model", m))
    if h and any(c.startswith(h + "/") for c in metric_columns(rows)):
        panels.append(("category", h))
    if any(run["filters"] for run in runs):
        panels.append(("filter", None))
    if not panels:
        panels = [("empty", None)]
    cols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (kind, m) in zip(axes.flat, panels):
        if kind == "model":
            _bars(ax, runs, names, m)
        elif kind == "category":
            _categories(ax, runs, names, m)
        elif kind == "filter":
            _filters(ax, runs[0])
        else:
            ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center")
            ax.axis("off")
    fig.tight_layout()
    with fileio.atomic(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _bars(ax, runs, names, m):
    means, lo, hi, xs = [], [], [], []
    for i, n in enumerate(names):
        v = [x for x in _values(runs, n, m) if _num(x)]
        if not v:
            continue
        xs.append(i)
        mu = statistics.mean(v)
        means.append(mu)
        lo.append(mu - min(v))
        hi.append(max(v) - mu)
        if len(v) > 1:
            ax.scatter([i] * len(v), v, color="k", s=10, zorder=3)
    colors = ["C0" if names[i].startswith("isara_it") else "C7" if names[i] == "pretrained" else "C1" for i in xs]
    ax.bar(xs, means, color=colors, yerr=[lo, hi] if len(runs) > 1 else None, capsize=3)
    for x, mu in zip(xs, means):
        ax.text(x, mu, f"{mu:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [row_name(n) for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_title(f"{m} per model" + (" (lower is better)" if m in LOWER_IS_BETTER else "")
                 + (f", mean and range over {len(runs)} runs" if len(runs) > 1 else ""), fontsize=10)
    ax.set_ylim(0, max([1.0] + [a + b for a, b in zip(means, hi)]) * 1.08)


def _categories(ax, runs, names, m):
    import numpy as np

    rows = [r for run in runs for r in run["rows"]]
    keys = [c for c in metric_columns(rows) if c.startswith(m + "/")]
    show = [n for n in ("pretrained",) if n in names] + [n for n in names if n.startswith("isara_it")][-1:]
    y = np.arange(len(keys))
    hgt = 0.8 / max(1, len(show))
    for j, n in enumerate(show):
        vals = [_mean(_values(runs, n, k)) for k in keys]
        vals = [float("nan") if v is None else v for v in vals]  # no bar where the model has no value
        ax.barh(y + j * hgt, vals, height=hgt, label=row_name(n), color="C7" if n == "pretrained" else "C0")
    ax.set_yticks(y + hgt * (len(show) - 1) / 2, [k.split("/", 1)[1] for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title(f"{m} per category", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")


def _filters(ax, run):
    fs = run["filters"]
    x = range(len(fs))
    kept = [f.get("kept", 0) for f in fs]
    ax.bar(x, kept, color="C2", label="kept")
    bottom = list(kept)
    reasons = [k for k in dict.fromkeys(k for f in fs for k in (f.get("dropped") or {}))
               if any((f.get("dropped") or {}).get(k) for f in fs)]
    for i, k in enumerate(reasons):
        v = [(f.get("dropped") or {}).get(k, 0) for f in fs]
        ax.bar(x, v, bottom=bottom, color=f"C{(i + 3) % 10}", label=f"dropped: {k}")
        bottom = [b + a for a, b in zip(v, bottom)]
    ax.set_xticks(list(x), [f["name"] for f in fs], fontsize=8)
    ax.set_title("generated pairs per iteration: kept / dropped by the filters", fontsize=10)
    ax.legend(fontsize=7)
