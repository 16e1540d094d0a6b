"""Sharded generation on 8 CPU devices (a fresh process with jax_num_cpu_devices=8): meshes data=8,
data=2 x tensor=4 and tensor=8 on a model with 2 KV heads give one device's greedy tokens (log-probs within
1e-5) for static and continuous batching, beam search and beam-sample."""

import json
import os
import subprocess
import sys
from pathlib import Path

import hf_fixtures as fx

HERE = Path(__file__).parent


def test_sharded_generation_equals_one_device(tmp_path):
    fx.make_model("llama", tmp_path)  # 4 query heads, 2 KV heads (< tensor=4, 8: replicated)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(HERE / "_multidevice_generate.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_kv_heads"] == 2
    runs = out["runs"]
    assert len(runs) == 11
    assert out["shrinks"] == [False, True], out["shrinks"]  # the one-device and the mesh run both shrank once
    for name, r in runs.items():
        assert r["same"], (name, r)
        assert r.get("logp", 0.0) <= 1e-5, (name, r)
    assert "data" in out["cache_sharding"] and "tensor" not in out["cache_sharding"]  # 2 KV heads, tensor=4
    assert out["param_sharding"]["q"].startswith("P('tensor'")  # 4 query heads over tensor=4
    assert out["param_sharding"]["k"].startswith("P(None")  # KV heads replicated
