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
import gc
import hashlib
import json
import numbers
import shutil
import time
import types
import typing
from pathlib import Path

from selfalign_jax.core import checkpoint, embed, fileio, hostmem
from selfalign_jax.app import isara, report, retrieval, runlock
from selfalign_jax.app.config import IsaraConfig
from selfalign_jax.core.settings import GenConfig, RESULT_NEUTRAL, SettingError, TrainConfig
from selfalign_jax.core.errors import UserError
from selfalign_jax.app.isara import log
from selfalign_jax.core.loaded import LoadedModel
from selfalign_jax.core.mesh import make_mesh, writer_only

ROW_ORDER = ["pretrained", "sft", "icl-knn", "icl-random", "one-round"]
# an iteration's outputs in the order they are made (redoing one redoes those after it)
STAGE_FILES = ["questions.jsonl", "answers.jsonl", "filter.json", "kept.jsonl", "model", "eval.jsonl",
               "metrics.json"]


# --------------------------------------------------------------------------------------- presets
def load_config(path) -> IsaraConfig:
    """An IsaraConfig from a JSON preset (nested dicts for question_gen / answer_gen / sft)."""
    p = Path(path)
    for d in (Path("configs"), Path(__file__).resolve().parents[2] / "configs"):
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
    (`sft.lr_decay`, which the machine presets hold in their sft section, is read as the top-level
    `lr_decay`.)"""
    sub = {"question_gen": GenConfig, "answer_gen": GenConfig, "sft": TrainConfig}
    names = {f.name for f in dataclasses.fields(IsaraConfig)}
    if not isinstance(d, dict):
        raise UserError(f"{where}: a preset is a JSON object of fields, got {type(d).__name__}")
    kw = {}
    for k, v in d.items():
        if k not in names:
            raise UserError(f"{where}: unknown field {k!r}")
        if k in sub and not isinstance(v, dict):
            raise UserError(f"{where}: field {k!r} must be an object of {sub[k].__name__} fields, got {_shown(v)}")
        if k not in sub:
            _check_type(IsaraConfig, k, v, where)
        if k in sub:
            v = dict(v)
            if k == "sft" and "lr_decay" in v:
                kw.setdefault("lr_decay", v.pop("lr_decay"))
            fields = {f.name for f in dataclasses.fields(sub[k])}
            bad = set(v) - fields
            if bad:
                raise UserError(f"{where}: unknown field {k}.{sorted(bad)[0]}")
            for name, x in v.items():
                _check_type(sub[k], name, x, where, f"{k}.")
            for name in ("lora_targets", "exponential_decay_length_penalty"):  # JSON lists -> tuples
                if isinstance(v.get(name), list):
                    v[name] = tuple(v[name])
            try:
                v = sub[k](**{**_defaults(k), **v})
            except SettingError as e:
                raise UserError(f"{where}: {k}.{e.field} {e.rule}") from None
        kw[k] = v
    try:
        return IsaraConfig(**kw)
    except SettingError as e:
        raise UserError(f"{where}: {e.field} {e.rule}") from None


def _shown(v) -> str:
    return json.dumps(v) if isinstance(v, (str, int, float, bool, type(None), list, dict)) else repr(v)


def _check_type(cls, name: str, value, where: str, prefix: str = "") -> None:
    """UserError naming `prefix + name` when `value` does not have the type of field `name` of dataclass
    `cls` (a preset's "generate": "many" is named here, not failed on inside the dataclass)."""
    hint = typing.get_type_hints(cls)[name]
    if not _has_type(value, hint):
        raise UserError(f"{where}: field {prefix + name!r} must be {_describe(hint)}, got {_shown(value)}")


def _has_type(v, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(v, a) for a in args)
    if origin is typing.Literal:
        return any(v == a and type(v) is type(a) for a in args)
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(x, args[0]) for x in v)
        return len(v) == len(args) and all(_has_type(x, a) for x, a in zip(v, args))
    if hint is type(None):
        return v is None
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)
    return isinstance(v, hint)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list [{', '.join(_describe(a) for a in args)}]"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _defaults(section: str) -> dict:
    """The section's defaults within IsaraConfig (a preset's sft section starts from the run's SFT
    defaults, e.g. batch 32 without accumulation, not the bare trainer's)."""
    return dataclasses.asdict(getattr(IsaraConfig(), section)) if section == "sft" else {}


def given_fields(argv) -> set[str] | None:
    """The IsaraConfig fields (dotted: `answer_gen.temperature`) named by flags in a command line
    (`--answer-gen.temperature 1.0`, `--seed=0`, `--sft.no-remat`); None for no command line."""
    if argv is None:
        return None
    sections = {"question_gen": GenConfig, "answer_gen": GenConfig, "sft": TrainConfig}
    known, got = set(), set()
    for f in dataclasses.fields(IsaraConfig):
        sub = sections.get(f.name)
        known |= {f"{f.name}.{g.name}" for g in dataclasses.fields(sub)} if sub else {f.name}
    for a in argv:
        if not a.startswith("--"):
            continue
        name = a[2:].split("=", 1)[0].replace("-", "_")
        head, _, leaf = name.rpartition(".")
        for cand in (name, f"{head}.{leaf[3:]}" if head else leaf[3:]):  # --no-x / --sft.no-x (booleans)
            if cand in known:
                got.add(cand)
                break
    return got


def resolve(cli: IsaraConfig, preset: str | None, max_new_tokens: int | None = None,
            given: set[str] | None = None) -> IsaraConfig:
    """The preset (if any) with the command line's fields laid over it: those in `given` (dotted names
    from `given_fields(argv)`: a value equal to the built-in default still overrides the preset), or,
    when `given` is None, every field that differs from the default. --max-new-tokens sets both question
    and answer generation lengths."""
    def overlay(base, cl, default, pre=""):
        kw = {}
        for f in dataclasses.fields(cl):
            g, d = getattr(cl, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(g):
                kw[f.name] = overlay(getattr(base, f.name), g, d, f"{f.name}.")
            else:
                use = (pre + f.name) in given if given is not None else g != d
                kw[f.name] = g if use else getattr(base, f.name)
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
    if len(seeds) < cfg.k_icl:
        raise UserError(f"{where}: {len(seeds)} seeds is fewer than --icl-demos {cfg.k_icl}")
    return [{"question": s["question"], "answer": s["answer"], "source": "D_0", "iteration": 0}
            for s in seeds]


class LazyModel:
    """A model directory, loaded on first use of `.model` (a resumed run may never need it)."""

    def __init__(self, path, dtype: str = "auto"):
        self.path, self.dtype = Path(path), dtype

    @functools.cached_property
    def model(self) -> LoadedModel:
        return LoadedModel.load(self.path, self.dtype)

    def release(self) -> Path:
        """Drop the loaded copy (a later `.model` reads the directory again) and return the directory."""
        self.__dict__.pop("model", None)
        return self.path


def with_defaults(d: dict, default: dict) -> dict:
    """d with the keys it lacks taken from `default` (nested): a field a run directory's config.json
    lacks reads as its default, the value that run was made with."""
    out = {k: with_defaults(d[k], v) if isinstance(v, dict) and isinstance(d.get(k), dict) else d.get(k, v)
           for k, v in default.items()}
    return {**d, **out}


def without_layout(d: dict) -> dict:
    """A config dict without the settings that do not change results (config.RESULT_NEUTRAL: mesh,
    sft.mesh, sft.packing, ...): a run resumes across them."""
    return {k: (without_layout(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in RESULT_NEUTRAL}


class RunDir:
    def __init__(self, root: Path, cfg, model_dir, seeds, eval_set=None, force=False, note=None):
        self.root, self.cfg, self.model_dir = Path(root), cfg, Path(model_dir)
        self.seeds = check_seeds(seeds, cfg)
        self.eval_set = eval_set
        self.base = LazyModel(self.model_dir, cfg.dtype)
        open_run_dir(self.root)
        ident = {"isara": without_layout(dataclasses.asdict(cfg)), "model": str(self.model_dir.resolve()),
                 "seeds": sha(self.seeds), "eval": sha(eval_set) if eval_set is not None else None,
                 **(note or {})}
        ident = json.loads(json.dumps(ident))  # as config.json holds it (tuples become lists)
        p = self.root / "config.json"
        on_disk = read_run_config(p) if p.is_file() else None
        if on_disk is not None:
            old = without_layout(on_disk)  # (a config.json may hold sft.mesh: null and lack sft.packing)
            if isinstance(old.get("isara"), dict):
                old["isara"] = with_defaults(old["isara"], json.loads(json.dumps(
                    without_layout(dataclasses.asdict(IsaraConfig())))))
            if old.get("eval") is None or ident["eval"] is None:  # adding eval prompts later is fine
                old["eval"] = ident["eval"] = ident["eval"] or old.get("eval")
            # more iterations continue a run: iterations 1..T_old are the same whatever T is
            o_it, n_it = old.get("isara", {}).get("iterations"), ident["isara"]["iterations"]
            if isinstance(o_it, int) and o_it < n_it:
                old["isara"] = {**old["isara"], "iterations": n_it}
                log(f"iterations {o_it} -> {n_it}: continuing the run with iterations {o_it + 1}..{n_it}")
            if old != ident:
                diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
                if k := next((k for k in diff if k == "isara"), None):
                    sub = sorted(f for f in set(old[k]) | set(ident[k]) if old[k].get(f) != ident[k].get(f))
                    diff = [f"isara.{f}" for f in sub] + [d for d in diff if d != "isara"]
                if not force:
                    raise UserError(f"{self.root}: made with a different config ({', '.join(diff)}); "
                                    "use --force to start over (old results are moved aside)")
                self._supersede()
                on_disk = None
        if on_disk != ident:  # a finished run on a read-only filesystem is reported without writing
            writer_only("config", lambda: fileio.write_json(p, ident))
        if not (self.root / "seeds.jsonl").is_file():
            writer_only("seeds", lambda: fileio.write_jsonl(self.root / "seeds.jsonl", self.seeds))

    def _supersede(self):
        n = 1 + len(list(self.root.glob("superseded-*")))
        dst = self.root / f"superseded-{n}"

        def move():
            dst.mkdir()
            for p in list(self.root.iterdir()):
                if not p.name.startswith("superseded-") and p.name != ".lock":
                    shutil.move(str(p), dst / p.name)
        writer_only("supersede", move)
        log(f"config changed: previous results moved to {dst}")

    # ------------------------------------------------------------------------- models, indexes
    @functools.cached_property
    def embedder(self):
        c, base = self.cfg, self.base
        if c.embedder == "lm":  # (the reload holds the base's path, not this RunDir: no reference cycle)
            return embed.LMEmbedder(base.model, mesh=make_mesh(c.mesh) if c.mesh else None, layers=c.lm_layers,
                                    reload=lambda: LoadedModel.load(base.path, base.dtype))
        if c.embedder == "encoder" and not c.encoder:
            raise UserError("--embedder encoder (the paper preset's default) needs --encoder DIR (a local "
                            "sentence-encoder directory, e.g. all-MiniLM-L6-v2), or choose --embedder lm|hashing")
        return embed.get_embedder(c.embedder, model=c.encoder)

    def sft_source(self, m: LazyModel) -> Path:
        """What SFT starts from: the model's directory, read straight into the train state, with the loaded
        copies dropped first: `m`'s, the base model's and the LM embedder's share of it (each loads again on its
        next use; the embedder keeps only its layers of the base model then), so that no model but the one
        training is in memory."""
        emb = self.__dict__.get("embedder")  # (built only if the run uses it)
        if isinstance(emb, embed.LMEmbedder):
            emb.release()
        self.base.release()
        return m.release()

    def index(self, j: int, pool: list[dict], embedder):
        """Pool set D_j's index (built once, saved under index/D_j, reloaded memory-mapped)."""
        d, name = self.root / "index", f"D_{j}"
        if not (d / f"{name}.json").is_file():
            vecs = embedder.embed([p["question"] for p in pool])  # (every process: a sharded embedder)
            writer_only("index", lambda: retrieval.PoolIndex.build(vecs, seed=self.cfg.seed).save(d, name))
        return retrieval.PoolIndex.load(d, name)

    # ---------------------------------------------------------------------------------- stages
    def iter_dir(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def _redo(self, path: Path, why: str) -> None:
        """An unusable stage output: say so, and remove it with the outputs made from it (the later
        stages of its iteration)."""
        log(f"{path.relative_to(self.root)}: {why}; redoing it")
        later = STAGE_FILES[STAGE_FILES.index(path.name):] if path.name in STAGE_FILES else [path.name]

        def remove():
            for name in later:
                q = path.parent / name
                if q.is_dir() and not q.is_symlink():
                    shutil.rmtree(q)
                elif q.exists():
                    q.unlink()
        writer_only("redo", remove)

    def _reusable_rows(self, path: Path, nonempty: bool = True) -> list[dict] | None:
        """The rows of a finished JSONL stage output, or None (absent, or unusable and removed)."""
        if not path.is_file():
            return None
        try:
            rows = fileio.read_jsonl(path)
        except UserError as e:
            self._redo(path, f"unreadable ({e})")
            return None
        if nonempty and not rows:
            self._redo(path, "empty")
            return None
        return rows

    def _reusable_json(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._redo(path, f"not valid JSON ({e})")
            return None
        if not isinstance(obj, dict):
            self._redo(path, "not a JSON object")
            return None
        return obj

    def stage(self, path: Path, fn, expect: int | None = None) -> list[dict]:
        """The rows of a JSONL stage output, made by fn() unless done; `expect`: the row count the config
        asks for (a file cut at a row boundary, or made for another count, is redone)."""
        rows = self._reusable_rows(path)
        if rows is not None and expect is not None and len(rows) != expect:
            self._redo(path, f"{len(rows)} rows, the run asks for {expect}")
            rows = None
        if rows is not None:
            log(f"{path.relative_to(self.root)}: done, reusing")
            return rows
        t0 = time.time()
        rows = fn()
        writer_only("stage", lambda: fileio.write_jsonl(path, rows))
        log(f"{path.relative_to(self.root)}: {len(rows)} rows in {time.time() - t0:.1f}s ({isara.memory_note()})")
        return rows

    def filter_stage(self, it: Path, fn) -> list[dict]:
        f = self._reusable_json(it / "filter.json")
        if f is not None:
            kept = self._reusable_rows(it / "kept.jsonl", nonempty=False)
            n = len(fileio.read_jsonl(it / "answers.jsonl"))
            if kept is not None and f.get("kept") == len(kept) and f.get("candidates") == n:
                return kept
            self._redo(it / "filter.json", f"does not match kept.jsonl and answers.jsonl ({f.get('kept')} kept "
                                           f"of {f.get('candidates')}; {n} answers)")
        kept, drops = fn()
        n = len(fileio.read_jsonl(it / "answers.jsonl"))

        def write():
            fileio.write_json(it / "filter.json", {"candidates": n, "kept": len(kept), "dropped": drops})
            fileio.write_jsonl(it / "kept.jsonl", kept)
        writer_only("filter", write)
        log(f"{it.name}: kept {len(kept)} of {n} (dropped: "
            + (", ".join(f"{k} {v}" for k, v in drops.items() if v) or "none") + ")")
        return kept

    def model_stage(self, path: Path, fn) -> LazyModel:
        """The model in `path` (loaded on first use), training it with fn(path) if not there yet.
        The model is always read back from the exported directory, so a resumed run (which can only
        read it) uses exactly the same weights as an uninterrupted one."""
        if path.exists():
            try:
                checkpoint.tensor_shapes(path)
                checkpoint.read_config(path)
                reuse = True
            except UserError as e:
                self._redo(path, f"unusable ({e})")
                reuse = False
        else:
            reuse = False
        if reuse:
            log(f"{path.relative_to(self.root)}: done, reusing")
        else:
            t0 = time.time()
            fn(path)
            log(f"{path.relative_to(self.root)}: fine-tuned in {time.time() - t0:.1f}s ({isara.memory_note()})")
        return LazyModel(path, self.cfg.dtype)

    def eval_stage(self, name: str, model, scorer, row: str, iteration=None, demos_for=None, rounds=None) -> dict:
        """Evaluate `model` into name/ (skipped when done; `rounds`: the SFT baseline's round count, a
        result for another count is redone)."""
        d = self.root / name
        made_for = {"scorer": scorer_tag(scorer), **({"rounds": rounds} if rounds is not None else {})}
        m = self._reusable_json(d / "metrics.json")
        if m is not None and m.get("made_for") == made_for:
            return m
        if m is not None:
            log(f"{name}: scored for {m.get('made_for')}, this run wants {made_for}; evaluating again")
        t0 = time.time()
        rows, metrics = isara.evaluate(model.model, self.eval_set, scorer, self.cfg, demos_for)
        out = {"row": row, "iteration": iteration, "made_for": made_for, **metrics}

        def write():
            fileio.write_jsonl(d / "eval.jsonl", rows)
            fileio.write_json(d / "metrics.json", out)
        writer_only("eval", write)
        log(f"{name}: evaluated in {time.time() - t0:.1f}s ({isara.memory_note()}): "
                  + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        return out

    # ---------------------------------------------------------------------------------- report
    def finish(self) -> list[dict]:
        rows = collect_rows(self.root, len(self.seeds))
        m = self.root / "metrics.jsonl"
        done = m.is_file() and (self.root / "report.md").is_file() and json.loads(json.dumps(rows)) == _rows(m)
        if not done:  # nothing new: a finished run is reported without writing (read-only filesystems)
            writer_only("report", lambda: (fileio.write_jsonl(m, rows), report.write(self.root, rows)))
        return rows


def _rows(path: Path) -> list[dict] | None:
    try:
        return fileio.read_jsonl(path)
    except UserError:
        return None


def check_run_dir(root) -> None:
    """Refuse (before any work) a run directory that is a file, holds files but no run config, or
    holds a config.json that is not a run's."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--run-dir: {root} is a file, not a directory")
    if root.is_dir() and not (root / "config.json").is_file() \
            and any(not p.name.startswith(".") for p in root.iterdir()):
        raise UserError(f"--run-dir: {root} holds other files and no run config.json; "
                        "choose an empty or new directory")
    if (root / "config.json").is_file():
        read_run_config(root / "config.json")


def open_run_dir(root: Path) -> None:
    """Check, create and lock a run directory (for the life of the process). With several processes,
    process 0 creates, locks and writes it (`writer_only`); the others read what it wrote."""
    check_run_dir(root)

    def create():
        try:
            if not root.is_dir():
                root.mkdir(parents=True)
        except OSError as e:
            raise fileio.disk_error(e, root) or UserError(f"--run-dir: cannot create {root} ({e.strerror})") from None
        runlock.acquire(root)
        fileio.remove_stale_temps(root)  # a killed run's half-written outputs
    writer_only("open_run_dir", create)


def read_run_config(p: Path) -> dict:
    """A run directory's config.json; anything else there (a model's config, garbage) is refused."""
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e}); not a selfalign run directory") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("isara"), dict) or "model" not in raw:
        raise UserError(f"{p}: not a selfalign run config (no 'isara' and 'model' fields): this is not a "
                        "run directory; choose another --run-dir")
    return raw


def run_and_baselines(model_dir, seeds, run_dir, cfg, eval_set, scorer, baselines, force: bool = False,
                      note: dict | None = None) -> list[dict]:
    """ISARA (`run`), then each baseline kind of `baselines` (`baseline`), in one run directory; the metrics rows."""
    rows = run(model_dir, seeds, run_dir, cfg, eval_set, scorer, force=force, argv_note=note)
    for kind in baselines:
        gc.collect()  # what the previous part held (its models, its embedder) is gone before the next one loads
        hostmem.release()
        log(f"baseline: {kind}")
        rows = baseline(kind, model_dir, seeds, run_dir, cfg, eval_set, scorer, note=note)
    return rows


def scorer_tag(scorer) -> str:
    """What a stage's metrics were computed by: the scorer's name and version (a scorer whose rules change raises
    its `version`, so metrics from the older rules are computed again)."""
    return f"{scorer.name}/{getattr(scorer, 'version', 1)}"


def collect_rows(root: Path, n_seeds: int) -> list[dict]:
    """Every metrics row in the run directory, in the paper's table order."""
    rows = []
    for name in ROW_ORDER:
        for p in ([root / "pretrained" / "metrics.json"] if name == "pretrained"
                  else [root / "baselines" / name / "metrics.json"]):
            if p.is_file():
                rows.append({k: v for k, v in json.loads(p.read_text()).items() if k != "made_for"})
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
                      if k not in ("row", "iteration", "made_for")})
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
        # the authors' `64_0/T`: the ISARA loop without generated data, T sequential SFT rounds on the
        # seeds with ISARA's schedule (round t: lr * decay^(t-1), from the round t-1 model)
        m = base
        for t in range(1, cfg.iterations + 1):
            lr = cfg.sft.lr * cfg.lr_decay ** (t - 1)
            m = rd.model_stage(rd.root / name / f"round_{t}",
                               lambda out, m=m, t=t, lr=lr: isara.sft(rd.sft_source(m), rd.seeds, out, lr, cfg, t))
        rd.eval_stage(name, m, scorer, row="sft", rounds=cfg.iterations)
    elif kind == "icl-knn":
        emb = rd.embedder
        ids = rd.index(0, rd.seeds, emb).query(emb.embed([r["question"] for r in eval_set]), cfg.k_icl)
        pick = lambda i, q: [(rd.seeds[j]["question"], rd.seeds[j]["answer"]) for j in ids[i] if j >= 0]  # noqa: E731
        rd.eval_stage(name, base, scorer, row="icl-knn", demos_for=pick)
    elif kind == "icl-random":
        rng = isara.stage_rng(cfg.seed, 0, "icl")
        ids = [rng.choice(len(rd.seeds), cfg.k_icl, replace=False) for _ in eval_set]
        pick = lambda i, q: [(rd.seeds[j]["question"], rd.seeds[j]["answer"]) for j in ids[i]]  # noqa: E731
        rd.eval_stage(name, base, scorer, row="icl-random", demos_for=pick)
    elif kind == "one-round":
        # shares iteration 1's random streams (stage keys of (seed, t=1)): see docs/fidelity.md
        sub = rd.root / name
        one = dataclasses.replace(cfg, iterations=1, generate=cfg.iterations * cfg.generate)
        done = sub / "metrics.json"
        made_for = {"generate": one.generate, "scorer": scorer_tag(scorer)}
        if not done.is_file() or json.loads(done.read_text()).get("made_for") != made_for:
            # (a run extended to more iterations needs a new one-round run of T x N samples; the sub-run's own
            # stages are reused where they still hold)
            rows = run(model_dir, seeds, sub, one, eval_set, scorer, force or done.is_file(), eval_pretrained=False)
            writer_only("one_round", lambda: fileio.write_json(done, {
                **rows[-1], "row": "one-round", "iteration": None, "made_for": made_for}))
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
        questions = rd.stage(it / "questions.jsonl", lambda: isara.write_questions(model.model, pools, t, cfg),
                             expect=cfg.generate)
        answers = rd.stage(it / "answers.jsonl",
                           lambda: isara.write_answers(model.model, pools, indexes, embedder, questions, t, cfg),
                           expect=len(questions))
        kept = rd.filter_stage(it, lambda: isara.filter_answers(answers, pools, t, cfg))
        lr = cfg.sft.lr * cfg.lr_decay ** (t - 1)
        model = rd.model_stage(it / "model", lambda out: isara.sft(rd.sft_source(model), rd.seeds + kept, out, lr,
                                                                   cfg, t))
        if eval_set is not None:
            rd.eval_stage(f"iter_{t}", model, scorer, row=f"isara_it{t}", iteration=t)
        pools.append(kept)
        indexes.append(rd.index(t, kept, embedder))
    return rd.finish()
