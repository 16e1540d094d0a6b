"""scripts/device_check.sh --cpu: the GPU check's steps at toy sizes on the CPU, ending with one JSON line that
names every step, each run to completion with its result parsed from its log."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_cpu_runs_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE_CHECK_BUDGET": "600"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--cpu"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["env", "decode", "train", "workload", "demo", "pytest"], steps
    assert summary["mode"] == "cpu" and summary["device"] == "cpu:cpu" and summary["ok"], r.stdout[-3000:]
    assert steps["env"]["result"]["out_of_range"] == {}  # this environment is inside pyproject.toml's ranges
    toy = steps["decode"]["result"]["models"]["toy"]
    assert toy["ours"]["2"]["prefill_tok_s"] > 0 and toy["ref"]["2"]["prefill_tok_s"] > 0
    assert steps["train"]["result"]["mfu"] > 0 and steps["train"]["result"]["model"] == "toy"
    work = steps["workload"]["result"]
    assert work["workload_ours_tok_s"] > 0 and work["workload_ref_tok_s"] > 0
    assert steps["demo"]["result"]["lines"] > 0
    assert "collected" in steps["pytest"]["result"] or "tests" in steps["pytest"]["result"]
    for name in steps:
        assert (tmp_path / f"{name}.log").is_file()
