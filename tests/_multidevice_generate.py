"""Subprocess helper for tests/test_sampling_mesh.py: generate on 8 CPU devices (meshes data=8, data=2 x tensor=4,
tensor=8) vs one device, static and continuous batching, greedy and beam search.

usage: python tests/_multidevice_generate.py MODEL_DIR
Prints one JSON line: per (mesh, mode) whether the tokens equal one device's, the max log-prob difference, and the
sharding of a cache array.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from selfalign_jax.core import checkpoint, mesh as MS  # noqa: E402
from selfalign_jax.core.generate import continuous, cache as gen_cache  # noqa: E402
from gen_call import generate as gen  # noqa: E402


def main(model_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg, params = checkpoint.load(model_dir, dtype="float32")
    tok = checkpoint.load_tokenizer(model_dir)
    rng = np.random.default_rng(0)
    words = "the a of to and in is it you that he was for on are as with his they at be this have".split()
    prompts = [" ".join(rng.choice(words, int(rng.integers(2, 14)))) for _ in range(12)]
    lim = [int(x) for x in rng.choice([2, 5, 9, 12], len(prompts))]
    mixed = [" ".join(rng.choice(words, 30)) for _ in range(2)] + prompts[:6]  # long prompts, then short ones
    shrinks = []

    def shrinking(m):  # continuous batching that shrinks its cache once the long prompts are done
        shrink_from, orig = continuous.SHRINK_FROM, continuous.shrink
        continuous.SHRINK_FROM, continuous.shrink = 32, lambda st, **k: shrinks.append(m) or orig(st, **k)
        try:
            return gen(params, cfg, tok, mixed, max_new_tokens=lim[:8], stop=(), batch_size=2, mesh=m,
                              continuous=True)
        finally:
            continuous.SHRINK_FROM, continuous.shrink = shrink_from, orig
    out = {"n_kv_heads": cfg.n_kv_heads, "runs": {}}
    modes = {
        "static": lambda m: gen(params, cfg, tok, prompts, max_new_tokens=lim, stop=(), batch_size=8, mesh=m),
        "continuous": lambda m: gen(params, cfg, tok, prompts, max_new_tokens=lim, stop=(), batch_size=8,
                                           mesh=m, continuous=True),
        "continuous_shrink": shrinking,
        "beam": lambda m: gen(params, cfg, tok, prompts[:4], max_new_tokens=8, stop=(), num_beams=4,
                                        length_penalty=0.5, batch_size=4, mesh=m),
        "beam_sample": lambda m: gen(params, cfg, tok, prompts[:4], max_new_tokens=8, stop=(),
                                               num_beams=3, do_sample=True, top_k=20, seed=3, batch_size=4, mesh=m),
    }
    for mode, fn in modes.items():
        ref = fn(None)
        one = mode in ("beam_sample", "continuous_shrink")
        for spec in ("data=2,tensor=4",) if one else ("data=8", "data=2,tensor=4", "tensor=8"):
            res = fn(MS.make_mesh(spec))
            out["runs"][f"{mode} {spec}"] = dict(
                same=[r.token_ids for r in res] == [r.token_ids for r in ref],
                logp=max(float(np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max(initial=0))
                         for a, b in zip(res, ref)))
    out["shrinks"] = [m is not None for m in shrinks]
    cache = gen_cache.init_cache(cfg=cfg, B=8, S=32, place=gen_cache.placement(cfg, MS.make_mesh("data=2,tensor=4")))
    out["cache_sharding"] = str(cache.k[0].sharding.spec)
    pl = gen_cache.place_params(params, cfg, MS.make_mesh("data=2,tensor=4"))
    out["param_sharding"] = {"q": str(pl.layers[0].q.sharding.spec), "k": str(pl.layers[0].k.sharding.spec),
                             "up": str(pl.layers[0].up.sharding.spec)}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
