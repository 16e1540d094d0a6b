"""The run directory: resolved config, resumable stages, indexes, evaluation rows, the report.

Layout:
    config.json            resolved config + model + input hashes (a different config is refused)
    seeds.jsonl            D_0 as used
    index/D_{j}.*          one Annoy index (or exact table) per pool set
    pretrained/            eval.jsonl + metrics.json of the base model
    iter_{t}/              questions.jsonl, answers.jsonl, filter.json, kept.jsonl, model/, eval.jsonl,
                           metrics.json
    baselines/{kind}/      eval.jsonl + metrics.json (one-round: a whole 1-iteration run)
    metrics.jsonl, report.md, report.png
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from selfalign_jax import fileio, isara
from selfalign_jax.errors import UserError

ROW_ORDER = ["pretrained", "sft", "icl-knn", "icl-random", "one-round"]


def sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def check_seeds(seeds: list[dict], cfg: isara.IsaraConfig, where: str = "--seeds") -> list[dict]:
    if not seeds:
        raise UserError(f"{where}: no seed pairs")
    for i, s in enumerate(seeds, 1):
        if not str(s.get("question", "")).strip() or not str(s.get("answer", "")).strip():
            raise UserError(f"{where}: seed {i} has an empty question or answer")
    if len(seeds) < cfg.demos:
        raise UserError(f"{where}: {len(seeds)} seeds is fewer than --demos {cfg.demos}")
    return [{"question": s["question"], "answer": s["answer"], "source": "D_0", "iteration": 0}
            for s in seeds]


class RunDir:
    def __init__(self, root: Path, cfg, model_dir, seeds, eval_set=None, force=False, note=None):
        self.root, self.cfg, self.model_dir = Path(root), cfg, Path(model_dir)
        self.seeds = check_seeds(seeds, cfg)
        self.eval_set = eval_set
        self._base = None
        self.root.mkdir(parents=True, exist_ok=True)
        ident = {"isara": dataclasses.asdict(cfg), "model": str(self.model_dir.resolve()),
                 "seeds": sha(self.seeds), "eval": sha(eval_set) if eval_set is not None else None,
                 **(note or {})}
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
        isara.log(f"config changed: previous results moved to {dst}")

    # ------------------------------------------------------------------------- models, indexes
    def base_model(self):
        """A callable returning the base model (loaded on first use)."""
        def get():
            if self._base is None:
                self._base = isara.Model.load(self.model_dir, self.cfg.dtype)
            return self._base
        return get

    def embedder(self):
        from selfalign_jax import embed

        c = self.cfg
        if c.embedder == "lm":
            base = self.base_model()()
            return embed.LMEmbedder(base.cfg, base.params, base.tokenizer)
        if c.embedder == "encoder" and not c.encoder:
            raise UserError("--embedder encoder needs --encoder DIR (a local sentence-encoder directory)")
        return embed.get_embedder(c.embedder, model=c.encoder)

    def index(self, j: int, pool: list[dict], embedder):
        """Pool set D_j's index (built once, saved under index/D_j, reloaded memory-mapped)."""
        from selfalign_jax import retrieval

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
            isara.log(f"{path.relative_to(self.root)}: done, reusing")
            return fileio.read_jsonl(path)
        t0 = time.time()
        rows = fn()
        fileio.write_jsonl(path, rows)
        isara.log(f"{path.relative_to(self.root)}: {len(rows)} rows in {time.time() - t0:.1f}s")
        return rows

    def filter_stage(self, it: Path, fn) -> list[dict]:
        if (it / "kept.jsonl").is_file() and (it / "filter.json").is_file():
            return fileio.read_jsonl(it / "kept.jsonl")
        kept, drops = fn()
        n = len(fileio.read_jsonl(it / "answers.jsonl"))
        fileio.write_json(it / "filter.json", {"candidates": n, "kept": len(kept), "dropped": drops})
        fileio.write_jsonl(it / "kept.jsonl", kept)
        isara.log(f"{it.name}: kept {len(kept)} of {n} (dropped: "
                  + ", ".join(f"{k} {v}" for k, v in drops.items() if v) + ")")
        return kept

    def model_stage(self, path: Path, fn):
        """A callable returning the model in `path`, training it with fn(path) if not there yet.
        The model is always read back from the exported directory, so a resumed run (which can only
        read it) uses exactly the same weights as an uninterrupted one."""
        if (path / "config.json").is_file():
            isara.log(f"{path.relative_to(self.root)}: done, reusing")
        else:
            t0 = time.time()
            fn(path)
            isara.log(f"{path.relative_to(self.root)}: fine-tuned in {time.time() - t0:.1f}s")
        cache = {}
        return lambda: cache.get("m") or cache.setdefault("m", isara.Model.load(path, self.cfg.dtype))

    def eval_stage(self, name: str, model, scorer, row: str, iteration=None, demos_for=None) -> dict:
        d = self.root / name
        if (d / "metrics.json").is_file():
            return json.loads((d / "metrics.json").read_text())
        t0 = time.time()
        rows, metrics = isara.evaluate(model(), self.eval_set, scorer, self.cfg, demos_for)
        fileio.write_jsonl(d / "eval.jsonl", rows)
        out = {"row": row, "iteration": iteration, **metrics}
        fileio.write_json(d / "metrics.json", out)
        isara.log(f"{name}: evaluated in {time.time() - t0:.1f}s: "
                  + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        return out

    # ---------------------------------------------------------------------------------- report
    def finish(self) -> list[dict]:
        from selfalign_jax import report

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
    run = RunDir(Path(run_dir), cfg, model_dir, seeds, eval_set, force, note)
    base, name = run.base_model(), f"baselines/{kind}"
    if kind == "pretrained":
        run.eval_stage("pretrained", base, scorer, row="pretrained")
    elif kind == "sft":
        m = run.model_stage(run.root / name / "model",
                            lambda out: isara.sft(base(), run.seeds, out, cfg.sft.lr, cfg, 0))
        run.eval_stage(name, m, scorer, row="sft")
    elif kind == "icl-knn":
        emb = run.embedder()
        ids = run.index(0, run.seeds, emb).query(emb.embed([r["question"] for r in eval_set]), cfg.demos)
        pick = lambda i, q: [(run.seeds[j]["question"], run.seeds[j]["answer"]) for j in ids[i] if j >= 0]  # noqa: E731
        run.eval_stage(name, base, scorer, row="icl-knn", demos_for=pick)
    elif kind == "icl-random":
        rng = isara.stage_rng(cfg.seed, 0, "icl")
        ids = [rng.choice(len(run.seeds), cfg.demos, replace=False) for _ in eval_set]
        pick = lambda i, q: [(run.seeds[j]["question"], run.seeds[j]["answer"]) for j in ids[i]]  # noqa: E731
        run.eval_stage(name, base, scorer, row="icl-random", demos_for=pick)
    elif kind == "one-round":
        sub = run.root / name
        if not (sub / "metrics.json").is_file():
            one = dataclasses.replace(cfg, iterations=1, generate=cfg.iterations * cfg.generate)
            rows = isara.run(model_dir, seeds, sub, one, eval_set, scorer, force, eval_pretrained=False)
            fileio.write_json(sub / "metrics.json", {**rows[-1], "row": "one-round", "iteration": None})
    else:
        raise UserError(f"--kind: unknown baseline {kind!r}")
    return run.finish()
