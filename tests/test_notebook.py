"""notebooks/kaggle_tpu.ipynb: valid nbformat-4 JSON, code that compiles, settings from SELFALIGN_NB_*.
(Running it end to end headless on the CPU with a tiny model needs selfalign_jax.api: issue 15, phase 2.)"""

import json
from pathlib import Path

import pytest

NB = Path(__file__).resolve().parents[1] / "notebooks" / "kaggle_tpu.ipynb"


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
