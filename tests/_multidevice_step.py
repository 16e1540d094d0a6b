"""Subprocess helper for tests/test_train.py: one train step on 8 CPU devices vs one device.

usage: python tests/_multidevice_step.py [--quick] MODEL_DIR...
Prints one JSON line per MODEL_DIR: max abs parameter difference after the step for each mesh (full
fine-tune with gradient accumulation, and LoRA), the losses, and the shardings used. --quick: only
the full fine-tune on fsdp=4 x tensor=2 and LoRA on one device (against the single-device step).
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from selfalign_jax.core import checkpoint as C  # noqa: E402
from selfalign_jax.core import mesh as MS  # noqa: E402
from selfalign_jax.core import batching  # noqa: E402
from selfalign_jax.core import model as M  # noqa: E402
from selfalign_jax.core import train  # noqa: E402


def main(model_dir: str, quick: bool = False) -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg, params = C.load(model_dir, dtype="float32")
    tok = C.load_tokenizer(model_dir)
    words = "the a of to and in is it you that he was for on are as with his they at be this have".split()
    rng = np.random.default_rng(0)
    pairs = [(" ".join(rng.choice(words, rng.integers(3, 9))), " ".join(rng.choice(words, rng.integers(4, 14))))
             for _ in range(16)]
    enc = batching.encode_pairs(pairs, tok, max_length=32)
    host = jax.tree.map(np.asarray, params)
    out = {"diff": {}, "loss": {}, "moved": {}, "sharding": {}}
    # eps = 1 makes AdamW's first update smooth in the gradient (with the default 1e-8 it is
    # lr * sign(g), which turns float-rounding noise in near-zero gradients into +-lr jumps)
    runs = [("full", "single", 8, 2, {}), ("full", "fsdp=4,tensor=2", 8, 2, {}), ("full", "data=8", 8, 2, {}),
            ("full", "single-noaccum", 16, 1, {}), ("lora", "single", 8, 2, {"lora_rank": 4}),
            ("lora", "fsdp=4,tensor=2", 8, 2, {"lora_rank": 4})]
    if quick:
        keep = {("full", "single"), ("full", "fsdp=4,tensor=2"), ("lora", "single")}
        runs = [r for r in runs if (r[0], r[1]) in keep]
    res = {}
    for name, spec, bs, ga, extra in runs:
        tcfg = train.TrainConfig(lr=1e-2, eps=1.0, batch_size=bs, grad_accum=ga, warmup_ratio=0.0, max_length=32,
                             bucket=32, **extra)
        batch = batching.make_batch(enc, list(range(16)), ga, bs, tcfg.max_length, tcfg.bucket)
        mesh = MS.make_mesh("data=1" if spec.startswith("single") else spec,
                            jax.devices()[:1] if spec.startswith("single") else None)
        tr = train.Trainer(cfg, tcfg, total_steps=10, mesh=mesh)
        state, frozen = tr.init_state(jax.tree.map(np.asarray, host))
        state, m = tr.step(state, frozen, batch)
        res[name, spec] = jax.tree.map(np.asarray, state.params)
        out["loss"][f"{name} {spec}"] = float(m["loss"])
        if not spec.startswith("single"):
            leaf = state.params.layers.q if name == "full" else state.params[0]["q"]["b"]  # full: stacked [L, ...]
            mu = state.opt_state[1][0].mu
            mu_leaf = mu.layers.q if name == "full" else mu[0]["q"]["b"]
            out["sharding"][f"{name} {spec}"] = [str(leaf.sharding.spec), str(mu_leaf.sharding.spec)]

    def maxdiff(a, b):
        return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))

    for name, spec, *_ in runs:
        if spec != "single" and (name, "single") in res:
            out["diff"][f"{name} {spec}"] = maxdiff(res[name, spec], res[name, "single"])
    out["moved"]["full"] = maxdiff(res["full", "single"], M.stack_layers(host))
    out["moved"]["lora"] = max(float(np.abs(d["b"]).max()) for layer in res["lora", "single"] for d in layer.values())
    print(json.dumps(out))


if __name__ == "__main__":
    args = sys.argv[1:]
    for d in [a for a in args if a != "--quick"]:
        main(d, quick="--quick" in args)
