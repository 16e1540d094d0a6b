"""notebooks/kaggle_tpu.ipynb: valid nbformat-4 JSON, code that compiles, settings from SELFALIGN_NB_*, and
every code cell run in order, headless on the CPU, with a tiny model (IPython.display replaced by a stub that
prints what would be shown: IPython is not a dependency)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import hf_fixtures as fx

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks" / "kaggle_tpu.ipynb"
TINY = {"iterations": 1, "generate": 4, "demos": 2, "context_budget": 300, "embedder": "hashing", "batch_size": 4,
        "question_gen": {"max_new_tokens": 8}, "answer_gen": {"max_new_tokens": 8}, "eval_max_new_tokens": 8,
        "sft": {"lr": 1e-3, "batch_size": 4, "max_length": 64, "epochs": 1}}
DISPLAY_STUB = """
def display(obj):
    print("DISPLAY", type(obj).__name__, getattr(obj, "data", None) or getattr(obj, "filename", None))
class Markdown:
    def __init__(self, data):
        self.data = data
class Image:
    def __init__(self, filename):
        self.filename = filename
"""


def cells():
    nb = json.loads(NB.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
    for c in nb["cells"]:
        assert c["cell_type"] in ("markdown", "code") and isinstance(c["source"], list) and c["id"]
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_cells_compile_and_use_the_api():
    code = cells()
    for i, src in enumerate(code):
        compile(src, f"{NB.name}[code {i}]", "exec")
    text = "\n".join(code)
    assert "api.run(model=MODEL, seeds=SEEDS, run_dir=RUN_DIR, config=CONFIG" in text
    assert "/kaggle/tmp" in text and "/kaggle/working" in text and "fell back to the CPU" in text


def test_settings_cell_reads_the_environment(tmp_path, monkeypatch):
    settings = cells()[0]
    (tmp_path / "seeds.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    for k, v in {"MODEL": str(tmp_path / "tiny"), "SEEDS": str(tmp_path / "seeds.jsonl"), "CONFIG": "fast",
                 "SCRATCH": str(tmp_path / "scratch"), "EXPORT": str(tmp_path / "out"), "EXPECT": "cpu",
                 "INSTALL": "0", "OVERRIDES": '{"iterations": 1}'}.items():
        monkeypatch.setenv(f"SELFALIGN_NB_{k}", v)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    ns = {}
    exec(settings, ns)  # noqa: S102 - the notebook cell itself
    assert ns["MODEL"] == str(tmp_path / "tiny") and ns["CONFIG"] == "fast" and ns["EXPECT"] == "cpu"
    assert ns["RUN_DIR"] == tmp_path / "scratch" / "run" and (tmp_path / "scratch").is_dir()
    assert ns["OVERRIDES"] == {"iterations": 1} and ns["INSTALL"] is False
    monkeypatch.delenv("SELFALIGN_NB_MODEL")
    if not Path("/kaggle/input").exists():
        with pytest.raises(SystemExit, match="no model"):
            exec(settings, {})  # noqa: S102


def test_notebook_runs_headless_on_cpu_with_a_tiny_model(tmp_path):
    fx.make_model("llama", tmp_path / "tiny", max_position_embeddings=512)
    rng = random.Random(0)
    sent = lambda n: " ".join(rng.choice(fx.WORDS[4:120]) for _ in range(n))  # noqa: E731
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps({"question": sent(8), "answer": sent(9)}) + "\n"
                                                  for _ in range(6)))
    stub = tmp_path / "stub" / "IPython"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "display.py").write_text(DISPLAY_STUB)
    script = tmp_path / "nb.py"
    script.write_text("\n\n".join(cells()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path / "stub")]), "JAX_PLATFORMS": "cpu",
           "SELFALIGN_HUGEPAGES": "0"}
    env.update({f"SELFALIGN_NB_{k}": v for k, v in {
        "MODEL": str(tmp_path / "tiny"), "SEEDS": str(tmp_path / "seeds.jsonl"), "CONFIG": "fast",
        "SCRATCH": str(tmp_path / "scratch"), "EXPORT": str(tmp_path / "working" / "aligned"), "EXPECT": "cpu",
        "INSTALL": "0", "OVERRIDES": json.dumps(TINY), "SEED": "1"}.items()})
    r = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "(cpu)" in out and "DISPLAY Markdown" in out and "DISPLAY Image" in out, out[-3000:]
    export = tmp_path / "working" / "aligned"
    assert (export / "config.json").is_file() and (export / "isara_report.md").is_file()
    assert any(export.glob("*.safetensors"))
    cfg = json.loads((tmp_path / "scratch" / "run" / "config.json").read_text())["isara"]
    assert cfg["seed"] == 1 and cfg["generate"] == 4 and cfg["sft"]["max_length"] == 64  # preset + overrides


def test_device_check_says_when_jax_fell_back_to_the_cpu(tmp_path):
    code = cells()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "SELFALIGN_NB_MODEL": "m",
           "SELFALIGN_NB_SEEDS": "s", "SELFALIGN_NB_SCRATCH": str(tmp_path), "SELFALIGN_NB_INSTALL": "0",
           "SELFALIGN_NB_EXPECT": "tpu"}
    script = tmp_path / "nb.py"
    script.write_text("\n\n".join(code[:3]))
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "fell back to the CPU" in r.stderr + r.stdout, r.stderr[-2000:]


def install_cell(tmp_path, monkeypatch):
    """The settings and install cells run with INSTALL=0: the install cell's names (install_plan, JAX_RANGE)."""
    for k, v in {"MODEL": "m", "SEEDS": "s", "SCRATCH": str(tmp_path), "INSTALL": "0"}.items():
        monkeypatch.setenv(f"SELFALIGN_NB_{k}", v)
    ns = {}
    exec("\n\n".join(cells()[:2]), ns)  # noqa: S102 - the notebook cells themselves
    return ns


def test_install_keeps_the_images_jax_when_in_range(tmp_path, monkeypatch):
    ns = install_cell(tmp_path, monkeypatch)
    args, pins = ns["install_plan"]("selfalign-jax[tpu]", {"jax": "0.11.2", "jaxlib": "0.11.2", "libtpu": "0.0.40"})
    assert args == ["install", "-q", "selfalign-jax"]  # no [tpu] extra: the image's libtpu stays too
    assert pins.splitlines() == ["jax==0.11.2", "jaxlib==0.11.2", "libtpu==0.0.40"]
    args, pins = ns["install_plan"]("selfalign-jax[tpu]", {"jax": "0.10.0", "jaxlib": "0.10.0", "libtpu": None})
    assert args[-1] == "selfalign-jax" and pins.splitlines() == ["jax==0.10.0", "jaxlib==0.10.0"]


def test_install_takes_the_extra_when_jax_is_missing_or_out_of_range(tmp_path, monkeypatch):
    ns = install_cell(tmp_path, monkeypatch)
    for installed in ({"jax": None, "jaxlib": None, "libtpu": None}, {"jax": "0.9.2", "jaxlib": "0.9.2"},
                      {"jax": "0.12.0", "jaxlib": "0.12.0"}, {"jax": "0.10.2", "jaxlib": None}):
        assert ns["install_plan"]("selfalign-jax[tpu]", installed) == (["install", "-q", "selfalign-jax[tpu]"], None)


def test_install_range_is_pyprojects():
    import tomllib
    from packaging.requirements import Requirement

    deps = {r.name: str(r.specifier) for r in map(Requirement, tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["dependencies"])}
    ns = {}
    src = cells()[1]
    exec(src[:src.index("KEEP =")], ns)  # noqa: S102 - the imports and JAX_RANGE
    from packaging.specifiers import SpecifierSet
    assert SpecifierSet(ns["JAX_RANGE"]) == SpecifierSet(deps["jax"]) == SpecifierSet(deps["jaxlib"])
