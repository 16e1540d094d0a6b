"""qwen3 / gemma2 / gemma3 through the trainer: one SFT step's loss equals transformers' loss on the
same batch, the fused LM-head loss (with gemma2's final soft-cap) equals the plain one in value and
gradients, and (subprocess) the 8-device step equals the 1-device step.

Forward / cache / export / greedy parity for these families run with every family in test_model.py
and test_sampling.py (hf_fixtures.ALL)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import hf_fixtures as fx
from selfalign_jax.core import checkpoint as C
from selfalign_jax.core import batching
from selfalign_jax.core import loss as loss_lib

NEW = ("qwen3", "gemma2", "gemma3")
WORDS = fx.WORDS[4:100]


def _pairs(n, seed):
    rng = np.random.default_rng(seed)
    return [(" ".join(rng.choice(WORDS, rng.integers(3, 8))), " ".join(rng.choice(WORDS, rng.integers(4, 12))))
            for _ in range(n)]


@pytest.fixture(scope="module", params=NEW)
def fam(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tm = fx.make_model(request.param, path)
    return request.param, path, tm


def test_sft_loss_equals_transformers_loss(fam):
    import torch

    name, path, tm = fam
    cfg, params = C.load(path, dtype="float32")
    tok = C.load_tokenizer(path)
    enc = batching.encode_pairs(_pairs(4, seed=5), tok, max_length=32)
    mb = jax.tree.map(lambda x: x[0], batching.make_batch(enc, range(4), 1, 4, 32, bucket=32))
    L = max(len(x) for x in enc.ids)
    ids, labels, mask = (np.zeros((4, L), np.int64), np.full((4, L), -100, np.int64), np.zeros((4, L), np.int64))
    for r in range(4):
        k = len(enc.ids[r])
        ids[r, :k], mask[r, :k] = enc.ids[r], 1
        labels[r, :k] = np.where(enc.loss_mask[r], enc.ids[r], -100)
    with torch.no_grad():
        ref = float(tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       labels=torch.tensor(labels)).loss)

    def loss(p, fused):
        nll, n = loss_lib.token_nll(p, cfg, mb, fused=fused, chunk_tokens=32)
        return nll / n

    (lf, gf), (lp, gp) = [jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, f) for f in (True, False)]
    print(f"{name}: ours {float(lf):.6f} transformers {ref:.6f}")
    assert abs(float(lf) - ref) < 1e-5 and abs(float(lp) - ref) < 1e-5, (name, float(lf), float(lp), ref)
    gd = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), gf, gp)))
    assert gd < 1e-5, (name, gd)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(gf)) > 1e-3


def test_eight_device_step_equals_single_device(tmp_path):
    """fsdp=4 x tensor=2: parameters after one full fine-tune step equal the 1-device step (all three
    families in one subprocess, --quick: the 6-mesh sweep runs for llama in test_train.py)."""
    dirs = []
    for name in NEW:
        fx.make_model(name, tmp_path / name, tokenizer=True)
        dirs.append(str(tmp_path / name))
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
    helper = Path(__file__).with_name("_multidevice_step.py")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(helper), "--quick", *dirs], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.strip().splitlines() if x.startswith("{")]
    assert len(lines) == len(NEW)
    for name, res in zip(NEW, lines):
        assert list(res["diff"]) == ["full fsdp=4,tensor=2"], res["diff"]
        assert res["diff"]["full fsdp=4,tensor=2"] < 1e-5, (name, res["diff"])
        assert res["moved"]["full"] > 1e-4 and res["moved"]["lora"] > 1e-4
        assert res["sharding"]["full fsdp=4,tensor=2"] == ["P(None, 'tensor', 'fsdp')"] * 2
