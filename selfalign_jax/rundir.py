"""The run directory: resolved config, resumable stages, indexes, evaluation rows, the report; the
ISARA loop (`run`) and the paper's baselines (`baseline`) over it; presets (`load_config`, `resolve`).

Layout:
    config.json            resolved config + model + input hashes (a different config is refused)
    seeds.jsonl            D_0 as used
    index/D_{j}.*          one Annoy index (or exact table) per pool set
    pretrained/            eval.jsonl + metrics.json of the base model
    iter_{t}/              questions.jsonl, answers.jsonl, filter.json, kept.jsonl, model/, eval.jsonl,
                           metrics.json
    baselines/{kind}/      eval.jsonl + metrics.json (one-round: a whole 1-iteration run)
    metrics.jsonl, report.md, report.png

Every stage writes its output atomically and is skipped when that output exists, so re-running the same
command resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
from pathlib import Path

from selfalign_jax import embed, fileio, isara, report, retrieval
from selfalign_jax.config import GenConfig, IsaraConfig, TrainConfig
from selfalign_jax.errors import UserError
from selfalign_jax.isara import log
from selfalign_jax.loaded import LoadedModel
from selfalign_jax.mesh import make_mesh

ROW_ORDER = ["pretrained", "sft", "icl-knn", "icl-random", "one-round"]


# --------------------------------------------------------------------------------------- presets
def load_config(path) -> IsaraConfig:
    """An IsaraConfig from a JSON preset (nested dicts for question_gen / answer_gen / sft)."""
    p = Path(path)
    for d in (Path("configs"), Path(__file__).resolve().parents[1] / "configs"):
        for cand in (d / Path(path).name, d / f"{Path(path).name}.json"):
            if not p.is_file() and cand.is_file():
                p = cand
    if not p.is_file():
        raise UserError(f"--config: no such preset file: {path}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return from_dict(d, str(p))


def from_dict(d: dict, where: str = "config") -> IsaraConfig:
    """An IsaraConfig from nested dicts; an unknown field or a bad value is a UserError naming it.
    (`sft.lr_decay`, where presets before the sft section became the trainer's config had it, is read
    as the top-level `lr_decay`.)"""
    sub = {"question_gen": GenConfig, "answer_gen": GenConfig, "sft": TrainConfig}
    names = {f.name for f in dataclasses.fields(IsaraConfig)}
    kw = {}
    for k, v in d.items():
        if k not in names:
            raise UserError(f"{where}: unknown field {k!r}")
        if k in sub:
            v = dict(v)
            if k == "sft" and "lr_decay" in v:
                kw.setdefault("lr_decay", v.pop("lr_decay"))
            fields = {f.name for f in dataclasses.fields(sub[k])}
            bad = set(v) - fields
            if bad:
                raise UserError(f"{where}: unknown field {k}.{sorted(bad)[0]}")
            for name in ("lora_targets", "exponential_decay_length_penalty"):  # JSON lists -> tuples
                if isinstance(v.get(name), list):
                    v[name] = tuple(v[name])
            try:
                v = sub[k](**{**_defaults(k), **v})
            except UserError as e:
                raise UserError(f"{where}: {k}: {e}") from None
        kw[k] = v
    return IsaraConfig(**kw)


def _defaults(section: str) -> dict:
    """The section's defaults within IsaraConfig (a preset's sft section starts from the run's SFT
    defaults, e.g. batch 32 without accumulation, not the bare trainer's)."""
    return dataclasses.asdict(getattr(IsaraConfig(), section)) if section == "sft" else {}


def resolve(cli: IsaraConfig, preset: str | None, max_new_tokens: int | None = None) -> IsaraConfig:
    """The preset (if any) with every field the command line changed from the default laid over it;
    --max-new-tokens sets both question and answer generation lengths."""
    def overlay(base, given, default):
        kw = {}
        for f in dataclasses.fields(given):
            g, d = getattr(given, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(g):
                kw[f.name] = overlay(getattr(base, f.name), g, d)
            else:
                kw[f.name] = g if g != d else getattr(base, f.name)
        return dataclasses.replace(base, **kw)

    cfg = overlay(load_config(preset), cli, IsaraConfig()) if preset else cli
    if max_new_tokens is not None:
        cfg = dataclasses.replace(
            cfg, question_gen=dataclasses.replace(cfg.question_gen, max_new_tokens=max_new_tokens),
            answer_gen=dataclasses.replace(cfg.answer_gen, max_new_tokens=max_new_tokens))
    return cfg


# ------------------------------------------------------------------------------------ run directory
def sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def check_seeds(seeds: list[dict], cfg: IsaraConfig, where: str = "--seeds") -> list[dict]:
    if not seeds:
        raise UserError(f"{where}: no seed pairs")
    for i, s in enumerate(seeds, 1):
        if not str(s.get("question", "")).strip() or not str(s.get("answer", "")).strip():
            raise UserError(f"{where}: seed {i} has an empty question or answer")
    if len(seeds) < cfg.demos:
        raise UserError(f"{where}: {len(seeds)} seeds is fewer than --demos {cfg.demos}")
    return [{"question": s["question"], "answer": s["answer"], "source": "D_0", "iteration": 0}
            for s in seeds]


class LazyModel:
    """A model directory, loaded on first use of `.model` (a resumed run may never need it)."""

    def __init__(self, path, dtype: str = "auto"):
        self.path, self.dtype = Path(path), dtype

    @functools.cached_property
    def model(self) -> LoadedModel:
        return LoadedModel.load(self.path, self.dtype)


def without_mesh(d: dict) -> dict:
    """A config dict without its device layout (mesh, sft.mesh): a run resumes on another mesh."""
    return {k: (without_mesh(v) if isinstance(v, dict) else v) for k, v in d.items() if k != "mesh"}


class RunDir:
    def __init__(self, root: Path, cfg, model_dir, seeds, eval_set=None, force=False, note=None):
        self.root, self.cfg, self.model_dir = Path(root), cfg, Path(model_dir)
        self.seeds = check_seeds(seeds, cfg)
        self.eval_set = eval_set
        self.base = LazyModel(self.model_dir, cfg.dtype)
        self.root.mkdir(parents=True, exist_ok=True)
        ident = {"isara": without_mesh(dataclasses.asdict(cfg)), "model": str(self.model_dir.resolve()),
                 "seeds": sha(self.seeds), "eval": sha(eval_set) if eval_set is not None else None,
                 **(note or {})}
        ident = json.loads(json.dumps(ident))  # as config.json holds it (tuples become lists)
        p = self.root / "config.json"
        if p.is_file():
            old = json.loads(p.read_text())
            if old.get("eval") is None or ident["eval"] is None:  # adding eval prompts later is fine
                old["eval"] = ident["eval"] = ident["eval"] or old.get("eval")
            if old != ident:
                diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
                if k := next((k for k in diff if k == "isara"), None):
                    sub = sorted(f for f in set(old[k]) | set(ident[k]) if old[k].get(f) != ident[k].get(f))
                    diff = [f"isara.{f}" for f in sub] + [d for d in diff if d != "isara"]
                if not force:
                    raise UserError(f"{self.root}: made with a different config ({', '.join(diff)}); "
                                    "use --force to start over (old results are moved aside)")
                self._supersede()
        fileio.write_json(p, ident)
        if not (self.root / "seeds.jsonl").is_file():
            fileio.write_jsonl(self.root / "seeds.jsonl", self.seeds)

    def _supersede(self):
        n = 1 + len(list(self.root.glob("superseded-*")))
        dst = self.root / f"superseded-{n}"
        dst.mkdir()
        for p in list(self.root.iterdir()):
            if not p.name.startswith("superseded-"):
                shutil.move(str(p), dst / p.name)
        log(f"config changed: previous results moved to {dst}")

    # ------------------------------------------------------------------------- models, indexes
    @functools.cached_property
    def embedder(self):
        c = self.cfg
        if c.embedder == "lm":
            return embed.LMEmbedder(self.base.model, mesh=make_mesh(c.mesh) if c.mesh else None)
        if c.embedder == "encoder" and not c.encoder:
            raise UserError("--embedder encoder needs --encoder DIR (a local sentence-encoder directory)")
        return embed.get_embedder(c.embedder, model=c.encoder)

    def index(self, j: int, pool: list[dict], embedder):
        """Pool set D_j's index (built once, saved under index/D_j, reloaded memory-mapped)."""
        d, name = self.root / "index", f"D_{j}"
        if not (d / f"{name}.json").is_file():
            vecs = embedder.embed([p["question"] for p in pool])
            retrieval.PoolIndex.build(vecs, seed=self.cfg.seed).save(d, name)
        return retrieval.PoolIndex.load(d, name)

    # ---------------------------------------------------------------------------------- stages
    def iter_dir(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def stage(self, path: Path, fn) -> list[dict]:
        if path.is_file():
            log(f"{path.relative_to(self.root)}: done, reusing")
            return fileio.read_jsonl(path)
        t0 = time.time()
        rows = fn()
        fileio.write_jsonl(path, rows)
        log(f"{path.relative_to(self.root)}: {len(rows)} rows in {time.time() - t0:.1f}s")
        return rows

    def filter_stage(self, it: Path, fn) -> list[dict]:
        if (it / "kept.jsonl").is_file() and (it / "filter.json").is_file():
            return fileio.read_jsonl(it / "kept.jsonl")
        kept, drops = fn()
        n = len(fileio.read_jsonl(it / "answers.jsonl"))
        fileio.write_json(it / "filter.json", {"candidates": n, "kept": len(kept), "dropped": drops})
        fileio.write_jsonl(it / "kept.jsonl", kept)
        log(f"{it.name}: kept {len(kept)} of {n} (dropped: "
                  + ", ".join(f"{k} {v}" for k, v in drops.items() if v) + ")")
        return kept

    def model_stage(self, path: Path, fn) -> LazyModel:
        """The model in `path` (loaded on first use), training it with fn(path) if not there yet.
        The model is always read back from the exported directory, so a resumed run (which can only
        read it) uses exactly the same weights as an uninterrupted one."""
        if (path / "config.json").is_file():
            log(f"{path.relative_to(self.root)}: done, reusing")
        else:
            t0 = time.time()
            fn(path)
            log(f"{path.relative_to(self.root)}: fine-tuned in {time.time() - t0:.1f}s")
        return LazyModel(path, self.cfg.dtype)

    def eval_stage(self, name: str, model, scorer, row: str, iteration=None, demos_for=None) -> dict:
        d = self.root / name
        if (d / "metrics.json").is_file():
            return json.loads((d / "metrics.json").read_text())
        t0 = time.time()
        rows, metrics = isara.evaluate(model.model, self.eval_set, scorer, self.cfg, demos_for)
        fileio.write_jsonl(d / "eval.jsonl", rows)
        out = {"row": row, "iteration": iteration, **metrics}
        fileio.write_json(d / "metrics.json", out)
        log(f"{name}: evaluated in {time.time() - t0:.1f}s: "
                  + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        return out

    # ---------------------------------------------------------------------------------- report
    def finish(self) -> list[dict]:
        rows = collect_rows(self.root, len(self.seeds))
        fileio.write_jsonl(self.root / "metrics.jsonl", rows)
        report.write(self.root, rows)
        return rows


def collect_rows(root: Path, n_seeds: int) -> list[dict]:
    """Every metrics row in the run directory, in the paper's table order."""
    rows = []
    for name in ROW_ORDER:
        for p in ([root / "pretrained" / "metrics.json"] if name == "pretrained"
                  else [root / "baselines" / name / "metrics.json"]):
            if p.is_file():
                rows.append(json.loads(p.read_text()))
    t, total_kept = 1, 0
    while (root / f"iter_{t}").is_dir():
        it = root / f"iter_{t}"
        r = {"row": f"isara_it{t}", "iteration": t}
        if (it / "filter.json").is_file():
            f = json.loads((it / "filter.json").read_text())
            total_kept += f["kept"]
            r.update(candidates=f["candidates"], kept=f["kept"], dropped=f["dropped"],
                     scaling_ratio=round(total_kept / n_seeds, 4))
        if (it / "metrics.json").is_file():
            r.update({k: v for k, v in json.loads((it / "metrics.json").read_text()).items()
                      if k not in ("row", "iteration")})
        rows.append(r)
        t += 1
    return rows


def baseline(kind: str, model_dir, seeds, run_dir, cfg, eval_set, scorer, force=False, note=None) -> list[dict]:
    """One of the paper's baselines into run_dir/baselines/kind; returns all metrics rows."""
    rd = RunDir(Path(run_dir), cfg, model_dir, seeds, eval_set, force, note)
    base, name = rd.base, f"baselines/{kind}"
    if kind == "pretrained":
        rd.eval_stage("pretrained", base, scorer, row="pretrained")
    elif kind == "sft":
        m = rd.model_stage(rd.root / name / "model",
                            lambda out: isara.sft(base.model, rd.seeds, out, cfg.sft.lr, cfg, 0))
        rd.eval_stage(name, m, scorer, row="sft")
    elif kind == "icl-knn":
        emb = rd.embedder
        ids = rd.index(0, rd.seeds, emb).query(emb.embed([r["question"] for r in eval_set]), cfg.demos)
        pick = lambda i, q: [(rd.seeds[j]["question"], rd.seeds[j]["answer"]) for j in ids[i] if j >= 0]  # noqa: E731
        rd.eval_stage(name, base, scorer, row="icl-knn", demos_for=pick)
    elif kind == "icl-random":
        rng = isara.stage_rng(cfg.seed, 0, "icl")
        ids = [rng.choice(len(rd.seeds), cfg.demos, replace=False) for _ in eval_set]
        pick = lambda i, q: [(rd.seeds[j]["question"], rd.seeds[j]["answer"]) for j in ids[i]]  # noqa: E731
        rd.eval_stage(name, base, scorer, row="icl-random", demos_for=pick)
    elif kind == "one-round":
        sub = rd.root / name
        if not (sub / "metrics.json").is_file():
            one = dataclasses.replace(cfg, iterations=1, generate=cfg.iterations * cfg.generate)
            rows = run(model_dir, seeds, sub, one, eval_set, scorer, force, eval_pretrained=False)
            fileio.write_json(sub / "metrics.json", {**rows[-1], "row": "one-round", "iteration": None})
    else:
        raise UserError(f"--kind: unknown baseline {kind!r}")
    return rd.finish()


# ------------------------------------------------------------------------------------ the loop
def run(model_dir, seeds: list[dict], run_dir, cfg: IsaraConfig, eval_set=None, scorer=None,
        force: bool = False, argv_note: dict | None = None, eval_pretrained: bool = True) -> list[dict]:
    """The ISARA loop with resumable stages; returns the metrics rows (also in metrics.jsonl)."""
    rd = RunDir(Path(run_dir), cfg, model_dir, seeds, eval_set, force, argv_note)
    model = rd.base
    embedder = rd.embedder
    pools, indexes = [rd.seeds], [rd.index(0, rd.seeds, embedder)]
    if eval_set is not None and eval_pretrained:
        rd.eval_stage("pretrained", model, scorer, row="pretrained")
    for t in range(1, cfg.iterations + 1):
        it = rd.iter_dir(t)
        questions = rd.stage(it / "questions.jsonl", lambda: isara.write_questions(model.model, pools, t, cfg))
        answers = rd.stage(it / "answers.jsonl",
                            lambda: isara.write_answers(model.model, pools, indexes, embedder, questions, t, cfg))
        kept = rd.filter_stage(it, lambda: isara.filter_answers(answers, pools, t, cfg))
        lr = cfg.sft.lr * cfg.lr_decay ** (t - 1)
        model = rd.model_stage(it / "model", lambda out: isara.sft(model.model, rd.seeds + kept, out, lr, cfg, t))
        if eval_set is not None:
            rd.eval_stage(f"iter_{t}", model, scorer, row=f"isara_it{t}", iteration=t)
        pools.append(kept)
        indexes.append(rd.index(t, kept, embedder))
    return rd.finish()
