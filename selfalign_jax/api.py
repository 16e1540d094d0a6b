"""The Python API: the `selfalign` verbs as functions (the CLI commands are thin layers over these).

For notebooks (a kernel holds the TPU, so a `!selfalign ...` subprocess cannot open it) and scripts:

    from selfalign_jax import api
    api.plan(model="/kaggle/input/gemma", config="tpu-v5e-8")
    res = api.run(model="/kaggle/input/gemma", seeds="seeds.jsonl", run_dir="/kaggle/tmp/run",
                  config="tpu-v5e-8", iterations=1, sft={"lora_rank": 16})
    res.final_model  # the last iteration's HF directory

Options are the CLI's (same names, underscores); run / baseline also take any `IsaraConfig` field as a
keyword (nested dicts for question_gen / answer_gen / sft), finetune any `TrainConfig` field. Progress is
printed as by the CLI; bad input raises `UserError` (one line, the same checks and words as the CLI, which
prints it and exits 2) instead of exiting. Arguments and outputs are checked before any work starts. A
`.gguf` model is converted once to an HF directory in a cache beside the output (`<run_dir>.models/<name>`).

Before anything compiles, run / finetune / generate check the memory plan (`selfalign_jax.core.plan`) when the
device's memory is known (an accelerator, or `hbm_gib=`) and raise `UserError` with the smallest change
when the run cannot fit. `distributed=True` (or JAX_COORDINATOR_ADDRESS in the environment) calls
`jax.distributed.initialize()` before any device is used; only process 0 writes files.

Importing this module imports JAX but starts no backend (so `jax.distributed.initialize()` can still run)."""

from __future__ import annotations

import contextlib
import dataclasses
import json as _json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jax

from selfalign_jax.core import checkpoint, fileio, gguf_import, train
from selfalign_jax.core import generate as G
from selfalign_jax.core.generate import prompts as gen_prompts
from selfalign_jax.app import isara, rundir, runlock
from selfalign_jax.app import config as settings
from selfalign_jax.app import data as dataset
from selfalign_jax.core import mesh as MS
from selfalign_jax.core import plan as P
from selfalign_jax.app.config import IsaraConfig
from selfalign_jax.core.settings import FINETUNE_DEFAULT, GENERATE_DEFAULT, GenConfig, TrainConfig
from selfalign_jax.core.errors import UserError
from selfalign_jax.app.evaluate import get_scorer, precheck
from selfalign_jax.core.loaded import LoadedModel
from selfalign_jax.app.report import table
from selfalign_jax.core.template import MARKERS, Template

__all__ = ["run", "baseline", "generate", "finetune", "evaluate", "eval", "data", "convert", "plan",
           "RunResult", "UserError"]


# ------------------------------------------------------------------------------------- shared helpers
def start(distributed: bool = False) -> None:
    """jax.distributed.initialize() when asked or when JAX_COORDINATOR_ADDRESS is set (before any device use)."""
    MS.initialize_distributed(True if distributed else None)


def models_cache(out) -> Path:
    """Where a .gguf model given for `out` is converted: `<out>.models` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".models")


def hf_model(model, cache: Path) -> Path:
    """`model` itself when it is an HF directory; a .gguf is converted once into cache/<stem>."""
    model = Path(model)
    if not (model.suffix.lower() == ".gguf" or model.is_file()):
        return model
    dest = Path(cache) / model.stem
    if (dest / "config.json").is_file():
        return dest
    dtype = MS.compute_dtype("auto")
    print(f"converting {model} to {dest} ({dtype}, once)", flush=True)
    MS.writer_only("gguf", lambda: gguf_import.convert(model, dest, dtype=dtype, overwrite=True, progress=True))
    return dest


def check_model(model: Path) -> None:
    """A missing or wrong --model directory is named before any other work (a .gguf is read when converted)."""
    if not (model.suffix.lower() == ".gguf" or model.is_file()):
        checkpoint.read_config(model)


def _at_least(**flags) -> None:
    """UserError for the first `--flag` whose value (None: not given) is below 1."""
    for name, v in flags.items():
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")


def accelerator_hbm() -> tuple[float, str] | None:
    """(GiB, source) of the first device's memory limit on an accelerator; None on the CPU or when unknown."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] / (1 << 30), f"{dev.device_kind} memory limit"
    return None


def _check_hbm(hbm_gib: float | None) -> None:
    if hbm_gib is not None and hbm_gib <= 0:
        raise UserError("--hbm-gib must be > 0")


def check_fits(model_dir, mesh: str | None, hbm_gib: float | None, ts=None, gs=None) -> None:
    """UserError with plan's one line when an SFT step (ts) or generation batch (gs) cannot fit the device
    memory; nothing is checked on a CPU without hbm_gib."""
    _check_hbm(hbm_gib)
    if hbm_gib is None:
        known = accelerator_hbm()
        if known is None:
            return
        hbm_gib = known[0]
    sizes = MS.parse_mesh(mesh)
    dtype = (ts or gs).dtype
    cfg = checkpoint.config_from_hf(checkpoint.read_config(model_dir), dtype)
    for advice in ((P.train_advice(cfg, ts, sizes, hbm_gib) if ts else None),
                   (P.gen_advice(cfg, gs, sizes, hbm_gib) if gs and gs.batch_size else None)):
        if advice:
            raise UserError(advice)


def _train_settings(t: TrainConfig, dtype: str) -> P.TrainSettings:
    return P.TrainSettings(batch_size=t.batch_size, max_length=t.max_length, dtype=dtype, lora_rank=t.lora_rank,
                           lora_targets=tuple(t.lora_targets), remat=t.remat, grad_accum=t.grad_accum,
                           loss_chunk=t.loss_chunk)


def _gen_settings(c: IsaraConfig, dtype: str) -> P.GenSettings:
    new = max(c.question_gen.max_new_tokens, c.answer_gen.max_new_tokens, c.eval_max_new_tokens)
    return P.GenSettings(batch_size=c.batch_size or 0, prompt_len=c.context_budget, max_new_tokens=new, dtype=dtype)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def isara_config(config=None, cfg: IsaraConfig | None = None, max_new_tokens: int | None = None,
                 mesh: str | None = None, **overrides) -> IsaraConfig:
    """The run's config: the preset, then `cfg` (the CLI's parsed flags: those named on the `selfalign`
    command line override the preset even when equal to the built-in default; from Python, the fields that
    differ from the default), keyword overrides, --max-new-tokens, --mesh."""
    given = rundir.given_fields(settings.COMMAND_LINE) if cfg is not None else None
    c = rundir.resolve(cfg or IsaraConfig(), str(config) if config is not None else None, max_new_tokens, given)
    if overrides:
        c = rundir.from_dict(_merge(dataclasses.asdict(c), overrides), "overrides")
    if mesh is not None:
        c = dataclasses.replace(c, mesh=mesh)
    return c


def _scorer_needs_eval(eval, scorer) -> None:  # noqa: A002
    if eval and not scorer:
        raise UserError("--eval needs --scorer (see `selfalign eval --help`)")
    if scorer and not eval:
        raise UserError("--scorer needs --eval PROMPTS (there is nothing to score without them)")


# ------------------------------------------------------------------------------------------- verbs
@dataclasses.dataclass(frozen=True)
class RunResult:
    run_dir: Path
    rows: list[dict]  # the metrics rows (metrics.jsonl)
    final_model: Path  # the last iteration's HF directory
    report: Path


def run(model, seeds, run_dir, eval=None, scorer: str | None = None, config=None,  # noqa: A002
        max_new_tokens: int | None = None, force: bool = False, mesh: str | None = None,
        hbm_gib: float | None = None, distributed: bool = False, cfg: IsaraConfig | None = None,
        **overrides) -> RunResult:
    """The ISARA loop into run_dir (resumed when it holds an unfinished run of the same config)."""
    _scorer_needs_eval(eval, scorer)
    _check_hbm(hbm_gib)
    c = isara_config(config, cfg, max_new_tokens, mesh, **overrides)
    run_dir = Path(run_dir)
    rundir.check_run_dir(run_dir)
    seed_rows = dataset.read_seeds(Path(seeds))
    eval_rows = dataset.read_eval(Path(eval)) if eval else None
    start(distributed)
    model = hf_model(model, models_cache(run_dir))
    dtype = MS.compute_dtype(c.dtype)
    check_fits(model, c.mesh or c.sft.mesh, hbm_gib, ts=_train_settings(c.sft, dtype), gs=_gen_settings(c, dtype))
    sc = get_scorer(scorer, model=model) if eval_rows is not None else None
    precheck(sc, eval_rows)
    rows = rundir.run(model, seed_rows, run_dir, c, eval_rows, sc, force)
    print(table(rows))
    print(f"report: {run_dir / 'report.md'}")
    return RunResult(run_dir, rows, run_dir / f"iter_{c.iterations}" / "model", run_dir / "report.md")


def baseline(kind: str, model, seeds, run_dir, eval, scorer: str, config=None,  # noqa: A002
             max_new_tokens: int | None = None, force: bool = False, mesh: str | None = None,
             distributed: bool = False, cfg: IsaraConfig | None = None, **overrides) -> list[dict]:
    """One of the paper's baselines into run_dir/baselines/kind; returns the run's metrics rows."""
    c = isara_config(config, cfg, max_new_tokens, mesh, **overrides)
    run_dir = Path(run_dir)
    rundir.check_run_dir(run_dir)
    seed_rows, eval_rows = dataset.read_seeds(Path(seeds)), dataset.read_eval(Path(eval))
    start(distributed)
    model = hf_model(model, models_cache(run_dir))
    sc = get_scorer(scorer, model=model)
    precheck(sc, eval_rows)
    rows = rundir.baseline(kind, model, seed_rows, run_dir, c, eval_rows, sc, force)
    print(table(rows))
    return rows


def read_prompts(path: Path) -> tuple[list[dict], list[str]]:
    """The objects of a JSONL file, each with a string "prompt" (blank lines skipped), and where each
    came from ("file:line"); errors name the line."""
    if not path.is_file():
        raise UserError(f"{path}: is a directory; a prompts file is wanted" if path.is_dir()
                        else f"prompts file not found: {path}")
    rows, where = [], []
    for w, obj in fileio.records(path):
        if not isinstance(obj.get("prompt"), str):
            what = "no \"prompt\" key" if "prompt" not in obj else f"\"prompt\" is {type(obj['prompt']).__name__}"
            raise UserError(f"{w}: {what} (need a string)")
        rows.append(obj)
        where.append(w)
    if not rows:
        raise UserError(f"{path}: no prompts (the file is empty or blank)")
    return rows, where


@contextlib.contextmanager
def _prompt_lines(where, noun: str = "prompt"):
    """A message about "<noun> N" (1-based: "prompt N" from the sampler, "pair N" from the trainer's encoding)
    names its file and line instead; `where`: the "file:line" of each, or a function returning them."""
    try:
        yield
    except UserError as e:
        m = re.match(rf"{noun} (\d+): (.*)", str(e))
        where = where() if callable(where) else where
        if m is None or not 1 <= int(m.group(1)) <= len(where):
            raise
        raise UserError(f"{where[int(m.group(1)) - 1]}: {m.group(2)}") from None


def generate(model, prompts, out, gen: GenConfig | None = None, seed: int = 0, batch_size: int | None = None,
             stop: tuple[str, ...] = MARKERS, no_stop: bool = False, chat_template: bool = False,
             truncate: str = "left", dtype: str = "auto", mesh: str | None = None, hbm_gib: float | None = None,
             distributed: bool = False, **gen_overrides) -> list[dict]:
    """Complete every {"prompt": ...} line of `prompts`; writes (process 0) and returns the rows with "completion".
    `gen` (default GENERATE_DEFAULT: greedy) with GenConfig fields in `gen_overrides` replaced."""
    model, prompts, out = Path(model), Path(prompts), Path(out)
    if "early_stopping" in gen_overrides:  # the command line spells it false / true / never
        es = gen_overrides["early_stopping"]
        gen_overrides["early_stopping"] = {"false": False, "true": True}.get(es, es)
    try:
        gen = dataclasses.replace(gen or GENERATE_DEFAULT, **gen_overrides)
    except TypeError as e:
        raise UserError(f"generate: {e}") from None
    fileio.check_output(out, inputs={"--prompts": prompts, "--model": model})
    _at_least(batch_size=batch_size)
    _check_hbm(hbm_gib)
    rows, where = read_prompts(prompts)
    print(f"read {len(rows)} prompts from {prompts}")
    start(distributed)
    model = hf_model(model, models_cache(out))
    if batch_size:
        check_fits(model, mesh, hbm_gib, gs=P.GenSettings(batch_size=batch_size, prompt_len=2048,
                                                          max_new_tokens=gen.max_new_tokens,
                                                          dtype=MS.compute_dtype(dtype)))
    lm = LoadedModel.load(model, dtype)
    ids = gen_prompts.tokenize(lm.tokenizer, [r["prompt"] for r in rows], chat_template)
    checkpoint.check_ids(ids, lm.cfg.vocab_size, where, lm.tokenizer)
    t0 = time.perf_counter()
    with _prompt_lines(where):
        res = G.generate(lm.params, lm.cfg, lm.tokenizer, ids, gen,
                         stop=() if no_stop else stop, seed=seed, batch_size=batch_size, truncate=truncate,
                         progress=True, mesh=MS.make_mesh(mesh) if mesh else None)
    dt = time.perf_counter() - t0
    done = [{**row, "completion": r.text} for row, r in zip(rows, res)]
    if MS.is_writer():
        fileio.write_jsonl(out, done)
    n_tok = sum(len(r.token_ids) for r in res)
    reasons = Counter(r.finish_reason for r in res)
    cut = sum(r.truncated > 0 for r in res)
    print(f"wrote {len(res)} completions to {out}: {n_tok} tokens in {dt:.1f}s ({n_tok / max(dt, 1e-9):.0f} tok/s, "
          f"compile included); finish: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
          + (f"; {cut} prompts truncated from the left" if cut else ""))
    return done


def finetune(model, data, out, template: str = "plain", checkpoint_dir=None, resume: bool = True,
             export_dtype: str = "auto", overwrite: bool = False, distributed: bool = False,
             hbm_gib: float | None = None, cfg: TrainConfig | None = None, **train_overrides) -> Path:
    """Fine-tune `model` on the (question, answer) pairs of `data`, export the HF checkpoint to `out`."""
    model, data, out = Path(model), Path(data), Path(out)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    try:
        tcfg = dataclasses.replace(cfg or FINETUNE_DEFAULT, **train_overrides)
    except TypeError as e:
        raise UserError(f"finetune: {e}") from None
    _check_hbm(hbm_gib)
    fileio.check_output(out, inputs={"--model": model, "--data": data}, directory=True, overwrite=overwrite)
    if checkpoint_dir is not None:
        fileio.check_output(checkpoint_dir, "--checkpoint-dir", inputs={"--model": model, "--out": out},
                            directory=True, overwrite=True)
    fileio.check_step_dirs(checkpoint_dir or out.with_name(out.name + ".ckpt"), "--checkpoint-dir", ("meta", "state"))
    check_model(model)
    pairs = dataset.read_pairs(data)
    start(distributed)
    locks = [(out, "--out")] + ([(checkpoint_dir, "--checkpoint-dir")] if checkpoint_dir is not None else [])
    with runlock.outputs(*(locks if MS.is_writer() else [])):  # one finetune per output at a time
        tcfg = dataclasses.replace(tcfg, dtype=MS.compute_dtype(tcfg.dtype))
        model = hf_model(model, models_cache(out))
        tok = checkpoint.load_tokenizer(model)
        check_fits(model, tcfg.mesh, hbm_gib, ts=_train_settings(tcfg, tcfg.dtype))
        mesh_obj = MS.make_mesh(tcfg.mesh)
        if MS.is_writer():
            shape = ", ".join(f"{k}={v}" for k, v in mesh_obj.shape.items())
            kind = f"LoRA rank {tcfg.lora_rank}" if tcfg.lora_rank else "full"
            print(f"finetune {model} on {len(pairs)} pairs from {data}: mesh {shape}, effective batch "
                  f"{tcfg.effective_batch}, lr {tcfg.lr}, {kind}, {tcfg.dtype}")
        tmpl = Template(kind=template, tokenizer=tok if template == "chat" else None)
        with _prompt_lines(lambda: [w for w, _ in fileio.records(data)], "pair"):
            train.finetune(model, pairs, tok, out, tcfg, tmpl, checkpoint_dir=checkpoint_dir, resume=resume,
                           mesh=mesh_obj, export_dtype=None if export_dtype == "auto" else export_dtype,
                           overwrite=overwrite)
    if MS.is_writer():
        print(f"wrote {out}")
    return out


def evaluate(model, data, scorer: str, out=None, max_new_tokens: int = 200, template: str = "plain",
             batch_size: int | None = None, seed: int = 0, mesh: str | None = None,
             distributed: bool = False) -> dict:
    """Greedy zero-shot answers to `data`'s questions, scored; writes items / metrics to `out` when given."""
    model, data = Path(model), Path(data)
    out = Path(out) if out is not None else None
    _at_least(batch_size=batch_size, max_new_tokens=max_new_tokens)
    if out is not None:
        fileio.check_output(out, inputs={"--data": data, "--model": model})
        fileio.check_output(Path(str(out) + ".metrics.json"), "--out (metrics)", inputs={"--data": data})
    rows = dataset.read_eval(data)
    start(distributed)
    model = hf_model(model, models_cache(out) if out is not None else fileio.default_cache_dir() / "models")
    sc = get_scorer(scorer, model=model)
    precheck(sc, rows)
    m = LoadedModel.load(model)
    cfg = IsaraConfig(eval_max_new_tokens=max_new_tokens, template=template, batch_size=batch_size, seed=seed,
                      mesh=mesh)
    items, metrics = isara.evaluate(m, rows, sc, cfg)
    if out is not None and MS.is_writer():
        fileio.write_jsonl(out, items)
        fileio.write_json(Path(str(out) + ".metrics.json"), metrics)
    for k, v in metrics.items():
        print(f"{k:>28}: {v:.4f}" if isinstance(v, float) else f"{k:>28}: {v}")
    print(_json.dumps(metrics))
    return metrics


eval = evaluate  # noqa: A001 - the CLI's name for it


def data(input, out, format: str = "auto", category: tuple[str, ...] = (),  # noqa: A002
         seeds: int | None = None, eval_out=None, seed: int = 0) -> list:
    """Convert a dataset file to plain JSONL (optionally drawing `seeds` rows); returns the rows written to out."""
    input, out = Path(input), Path(out)  # noqa: A001
    eval_out = Path(eval_out) if eval_out is not None else None
    if eval_out is not None and seeds is None:
        raise UserError("--eval-out needs --seeds N")
    paths = [p.resolve() for p in (input, out, eval_out) if p is not None]
    if len(set(paths)) != len(paths):
        raise UserError("--input, --out and --eval-out must be different files")
    fileio.check_output(out)
    if eval_out is not None:
        fileio.check_output(eval_out, "--eval-out")
    _at_least(seeds=seeds)
    loaded = dataset.load(input, format)
    rows = loaded.samples
    print(f"read {len(rows)} rows from {input} (format {loaded.format})")
    for why, n in sorted(loaded.skipped.items()):
        print(f"  skipped {n} rows: {why}")
    if category:
        rows = dataset.filter_categories(rows, category, input)
        print(f"kept {len(rows)} rows in categories {', '.join(category)}")
    if seeds is None:
        fileio.write_jsonl(out, rows)
        print(f"wrote {len(rows)} rows to {out}")
        _per_category(rows)
        return rows
    if seeds > len(rows):
        raise UserError(f"{input}: --seeds {seeds} but only {len(rows)} rows (after filtering)")
    seed_rows, rest = dataset.split_seeds(rows, seeds, seed)
    empty = sum(1 for s in seed_rows if not s.answer.strip())
    if empty:
        raise UserError(f"{input}: {empty} of the {seeds} seeds have no answer (format {loaded.format}); "
                        f"seeds need answers")
    fileio.write_jsonl(out, seed_rows)
    print(f"wrote {len(seed_rows)} seeds to {out} (seed {seed})")
    if eval_out is not None:
        fileio.write_jsonl(eval_out, rest)
        print(f"wrote {len(rest)} eval rows to {eval_out}")
    else:
        print(f"{len(rest)} rows not drawn as seeds were not written (no --eval-out)")
    _per_category(seed_rows)
    return seed_rows


def _per_category(rows) -> None:
    counts = Counter(s.category for s in rows if s.category)
    if 1 < len(counts) <= 15:
        for c, n in sorted(counts.items()):
            print(f"  {n:6d}  {c}")


def convert(model, out, dtype: str = "float32", overwrite: bool = False) -> Path:
    """A checkpoint (HF directory or .gguf) exported as an HF directory at `out`."""
    model, out = Path(model), Path(out)
    fileio.check_output(out, inputs={"--model": model}, directory=True, overwrite=overwrite)
    if model.suffix.lower() == ".gguf" or model.is_file():
        cfg = gguf_import.convert(model, out, dtype=dtype, overwrite=overwrite, progress=sys.stderr.isatty())
        print(f"wrote {out} ({cfg.family}, {dtype}, from GGUF {model.name})")
        return out
    checkpoint.load_tokenizer(model)  # fail early if there is none
    cfg, params = checkpoint.load(model, dtype="float32")
    base = checkpoint.read_config(model)
    checkpoint.save(out, cfg, params, tokenizer_from=model, dtype=dtype, base_config=base, overwrite=overwrite)
    print(f"wrote {out} ({cfg.family}, {dtype})")
    return out


def plan(model, mesh: str | None = None, devices: int | None = None, hbm_gib: float | None = None, config=None,
         batch_size: int | None = None, grad_accum: int | None = None, max_length: int | None = None,
         lora_rank: int | None = None, remat: bool | None = None, dtype: str | None = None,
         gen_batch: int | None = None, prompt_len: int | None = None, max_new_tokens: int | None = None,
         json: bool = False, overrides: dict | None = None, **more: Any) -> dict:
    """The memory plan (printed as a table unless json, then as one JSON line); UserError with the smallest
    change when it does not fit. `overrides` (a dict, as its keys may collide with this function's own
    options, e.g. batch_size) and `more`: IsaraConfig fields laid over the preset (as `run` takes them)."""
    model = Path(model)
    _check_hbm(hbm_gib)
    if model.suffix.lower() == ".gguf" or model.is_file():
        _, cfg_gguf, _ = gguf_import.read(model)
        raw = None
    else:
        raw = checkpoint.read_config(model)
    overrides = {**(overrides or {}), **more}
    pre = isara_config(config, None, None, None, **overrides) if (config is not None or overrides) else None
    mesh = mesh if mesh is not None else (pre.mesh or pre.sft.mesh if pre else None)
    s = pre.sft if pre else None
    hbm_note = "given"
    if hbm_gib is None:
        hbm_gib, hbm_note = accelerator_hbm() or (16.0, "assumed (a TPU v5e chip; pass --hbm-gib)")
    if dtype is None:
        dtype = pre.dtype if pre else "auto"
    if dtype == "auto":
        cpu = jax.default_backend() == "cpu"
        dtype = "float32" if cpu and hbm_note != "given" else "bfloat16"
    if devices is None and mesh and "-1" not in mesh:
        devices = _product(mesh)
    n = devices or jax.device_count()
    if n < 1:
        raise UserError("--devices must be >= 1")
    sizes = MS.parse_mesh(mesh, n)
    accum = grad_accum or (s.grad_accum if s else 1)
    ts = P.TrainSettings(
        batch_size=batch_size or (max(1, s.batch_size // s.grad_accum) if s else 8),
        max_length=max_length or (s.max_length if s else 512), dtype=dtype,
        lora_rank=lora_rank if lora_rank is not None else (s.lora_rank if s else 0),
        remat=remat if remat is not None else (s.remat if s else False), grad_accum=accum)
    new = max_new_tokens or (max(pre.question_gen.max_new_tokens, pre.answer_gen.max_new_tokens,
                                 pre.eval_max_new_tokens) if pre else 200)
    gs = P.GenSettings(batch_size=gen_batch or (pre.batch_size if pre and pre.batch_size else 32),
                       prompt_len=prompt_len or (pre.context_budget if pre else 2000), max_new_tokens=new,
                       dtype=dtype)
    _at_least(batch_size=ts.batch_size, max_length=ts.max_length, gen_batch=gs.batch_size,
              prompt_len=gs.prompt_len, max_new_tokens=gs.max_new_tokens, grad_accum=ts.grad_accum)
    if ts.lora_rank < 0:
        raise UserError("--lora-rank must be >= 0")
    cfg = checkpoint.config_from_hf(raw, dtype) if raw is not None else dataclasses.replace(cfg_gguf, dtype=dtype)
    p = P.plan(cfg, sizes, hbm_gib, ts, gs)
    p["hbm_source"] = hbm_note
    if not json:
        print(P.table(p))
    print(_json.dumps(p))
    if not p["fits"]:
        raise UserError(p["advice"][0])
    return p


def _product(mesh: str) -> int:
    """data*fsdp*tensor of a mesh string with no -1 axis (bad entries are reported by parse_mesh)."""
    n = 1
    for part in mesh.split(","):
        _, _, v = part.partition("=")
        try:
            n *= max(1, int(v))
        except ValueError:
            return 1
    return n
