"""The memory planner: exact figures against materialised arrays, per-device figures against shard
shapes (AbstractMesh, and real arrays on 8 CPU devices in a fresh process), the fit search, the
one-line advice and `selfalign plan`'s exit 2."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType

from selfalign_jax.core import lora as L
from selfalign_jax.core import mesh as MS
from selfalign_jax.core import model as M
from selfalign_jax.core import plan as P

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "llama": M.Config(family="llama", vocab_size=96, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      intermediate=48, max_pos=64),
    "qwen2_tied": M.Config(family="qwen2", vocab_size=80, hidden=24, n_layers=3, n_heads=6, n_kv_heads=2,
                           head_dim=4, intermediate=40, max_pos=64, qkv_bias=True, tied=True),
    "opt": M.Config(family="opt", vocab_size=72, hidden=16, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=4,
                    intermediate=32, max_pos=40, norm="layernorm", act="relu", glu=False, rope_theta=None,
                    qkv_bias=True, o_bias=True, mlp_bias=True, embed_dim=8, pos_offset=2, tied=True),
}


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def amesh(d, f, t):
    return AbstractMesh((d, f, t), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def shard_bytes(shardings, specs, dtype) -> int:
    isz = jnp.dtype(dtype).itemsize
    return sum(math.prod(sh.shard_shape(s.shape)) * isz
               for sh, s in zip(jax.tree.leaves(shardings), jax.tree.leaves(specs, is_leaf=M.is_spec)))


def opt_bytes(state) -> tuple[int, int]:
    """(bytes of the moment arrays, bytes of the scalar counters) of an optax state."""
    leaves = jax.tree.leaves(state)
    return nbytes([x for x in leaves if x.ndim]), nbytes([x for x in leaves if not x.ndim])


def sft_optimizer():  # clip -> AdamW with a schedule: the moments train.make_optimizer's state holds
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-4, 2, 10), b1=0.9, b2=0.95))


@pytest.mark.parametrize("name", list(TINY))
def test_params_optimizer_lora_kv_exact_on_one_device(name):
    cfg = TINY[name]
    for dt in ("float32", "bfloat16"):
        c = dataclasses.replace(cfg, dtype=dt)
        assert P.spec_bytes(M.param_specs(c), dt) == nbytes(M.init_params(c, jax.random.PRNGKey(0)))
    ts = P.TrainSettings(batch_size=2, max_length=16, dtype="float32")
    tb = P.train_bytes(cfg, ts, {})
    params = M.init_params(cfg, jax.random.PRNGKey(0))  # fp32 masters
    assert tb["params"] == nbytes(params)
    moments, scalars = opt_bytes(sft_optimizer().init(params))
    assert tb["optimizer"] - P.OPT_SCALARS == moments == 2 * nbytes(params) and scalars <= P.OPT_SCALARS
    assert tb["gradients"] == nbytes(params)
    # LoRA: fp32 adapters, their Adam moments, the frozen base in the compute dtype
    lt = dataclasses.replace(ts, lora_rank=4, lora_targets=("q", "v", "down"), dtype="bfloat16")
    lb = P.train_bytes(cfg, lt, {})
    ad = L.init_lora(cfg, jax.random.PRNGKey(1), 4, ("q", "v", "down"))
    moments, scalars = opt_bytes(sft_optimizer().init(ad))
    assert lb["lora"] == nbytes(ad) and lb["optimizer"] - P.OPT_SCALARS == moments and scalars <= P.OPT_SCALARS
    assert lb["params"] == nbytes(M.init_params(dataclasses.replace(cfg, dtype="bfloat16"), jax.random.PRNGKey(0)))
    # KV cache: per batch and per sequence
    for dt in ("float32", "bfloat16"):
        for B, S in ((1, 24), (3, 40)):
            assert P.kv_bytes(cfg, B, S, dt) == nbytes(M.init_cache(cfg, B, S, dt))
        assert P.kv_bytes_per_seq(cfg, 24, dt) == (nbytes(M.init_cache(cfg, 5, 24, dt)) - 4) // 5  # end: 4 bytes


@pytest.mark.parametrize("sizes", [(1, 8, 1), (2, 2, 2), (1, 1, 4), (1, 4, 2), (4, 1, 2)])
def test_per_device_figures_match_shard_shapes(sizes):
    d, f, t = sizes
    am = amesh(d, f, t)
    mesh = {"data": d, "fsdp": f, "tensor": t}
    for cfg in TINY.values():
        specs = M.param_specs(cfg)
        assert P.spec_bytes(specs, "float32", mesh) == shard_bytes(M.param_shardings(cfg, am), specs, "float32")
        lspecs = L.lora_specs(cfg, 4)
        assert P.train_bytes(cfg, P.TrainSettings(lora_rank=4), mesh)["lora"] == \
            shard_bytes(L.lora_shardings(cfg, am, 4), lspecs, "float32")


def test_per_device_figures_on_eight_cpu_devices(tmp_path):
    """Real sharded arrays (params, AdamW state placed like the trainer's, LoRA, a batch-sharded cache)."""
    script = textwrap.dedent("""
        import json, sys
        import jax
        jax.config.update("jax_num_cpu_devices", 8)
        import jax.numpy as jnp, optax
        from jax.sharding import NamedSharding, PartitionSpec as PS
        from selfalign_jax.core import lora as L, mesh as MS, model as M, plan as P
        cfg = M.Config(family="llama", vocab_size=96, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=8, intermediate=48, max_pos=64)
        out = []
        for spec in ("data=2,fsdp=2,tensor=2", "fsdp=8", "fsdp=4,tensor=2"):
            mesh = MS.make_mesh(spec)
            sizes = MS.parse_mesh(spec, 8)
            dev0 = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
            sh = M.param_shardings(cfg, mesh)
            params = jax.jit(lambda k: M.init_params(cfg, k), out_shardings=sh)(jax.random.PRNGKey(0))
            state = optax.adamw(1e-3).init(params)  # moments: zeros_like, the parameters' shardings
            assert all(a.sharding == b for a, b in zip(jax.tree.leaves(state[0].mu), jax.tree.leaves(sh)))
            ad = jax.jit(lambda k: L.init_lora(cfg, k, 4), out_shardings=L.lora_shardings(cfg, mesh, 4))(
                jax.random.PRNGKey(1))
            cache_sh = M.Cache(k=[NamedSharding(mesh, PS(("data", "fsdp"), "tensor"))] * cfg.n_layers,
                               v=[NamedSharding(mesh, PS(("data", "fsdp"), "tensor"))] * cfg.n_layers,
                               pos_BxS=NamedSharding(mesh, PS(("data", "fsdp"))), end=NamedSharding(mesh, PS()))
            cache = jax.jit(lambda: M.init_cache(cfg, 8, 24), out_shardings=cache_sh)()
            tb = P.train_bytes(cfg, P.TrainSettings(batch_size=8, max_length=16, dtype="float32"), sizes)
            lb = P.train_bytes(cfg, P.TrainSettings(batch_size=8, max_length=16, lora_rank=4), sizes)
            out.append(dict(spec=spec, params=(tb["params"], dev0(params)), lora=(lb["lora"], dev0(ad)),
                            adam=(tb["optimizer"] - P.OPT_SCALARS, dev0([x for x in jax.tree.leaves(state) if x.ndim])),
                            kv=(P.kv_bytes(cfg, 8, 24, "float32", sizes), dev0(cache))))
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 3
    for row in rows:
        for k in ("params", "lora", "adam", "kv"):
            want, got = row[k]
            assert want == got, (row["spec"], k, want, got)


def test_activations_remat_and_batch_search():
    cfg = M.Config(family="llama", vocab_size=32000, hidden=1024, n_layers=8, n_heads=16, n_kv_heads=4,
                   head_dim=64, intermediate=4096, max_pos=4096, dtype="bfloat16")
    mesh = {"data": 1, "fsdp": 4, "tensor": 1}
    ts = P.TrainSettings(batch_size=8, max_length=512)
    a = P.train_bytes(cfg, ts, mesh)
    assert a["activations_remat"] < a["activations_no_remat"] / 4
    b = P.train_bytes(cfg, dataclasses.replace(ts, batch_size=16), mesh)
    assert b["activations_no_remat"] == 2 * a["activations_no_remat"]  # 2 rows per device instead of 4 / 4
    assert b["params"] == a["params"] and b["optimizer"] == a["optimizer"]
    best = P.max_train_batch(cfg, ts, mesh, 4.0)
    assert best > 0 and best % 4 == 0
    def fits(n):
        return P.train_bytes(cfg, dataclasses.replace(ts, batch_size=n), mesh)["total"] <= P.usable(4.0)
    assert fits(best) and not fits(best + 4)
    gs = P.GenSettings(batch_size=8, prompt_len=256, max_new_tokens=64)
    g = P.max_gen_batch(cfg, gs, mesh, 4.0)
    def gfits(n):
        return P.gen_bytes(cfg, dataclasses.replace(gs, batch_size=n), mesh)["total"] <= P.usable(4.0)
    assert g > 0 and gfits(g) and not gfits(g + 4)


LLAMA_1B = M.Config(family="llama", vocab_size=128256, hidden=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                    head_dim=64, intermediate=8192, max_pos=131072, tied=True, dtype="bfloat16")


def test_advice_names_the_smallest_change():
    ts = P.TrainSettings(batch_size=8, max_length=512)
    # full fine-tuning of 1.2B replicated on 16 GiB chips: ~20 GB of masters + moments + grads
    line = P.train_advice(LLAMA_1B, ts, {"data": 8}, 16)
    assert line and "\n" not in line and line.startswith("training does not fit")
    assert "smallest change that fits: --mesh fsdp=8 (" in line
    assert P.train_advice(LLAMA_1B, ts, {"fsdp": 8}, 16) is None
    # one 8 GiB device: the mesh cannot help; LoRA is the only way
    line = P.train_advice(LLAMA_1B, ts, {"data": 1}, 8)
    assert "--lora-rank 16" in line and "--mesh" not in line
    # activations only: a smaller micro-batch (with the effective batch kept) or remat
    big = dataclasses.replace(ts, batch_size=512)
    line = P.train_advice(LLAMA_1B, big, {"fsdp": 8}, 16)
    assert "--remat" in line or "--batch-size" in line
    assert "--lora" not in line
    # generation: too large a batch for one chip
    gl = P.gen_advice(LLAMA_1B, P.GenSettings(batch_size=4096, prompt_len=2000, max_new_tokens=200), {"data": 1}, 16)
    assert gl.startswith("generation does not fit") and "generation batch" in gl
    sm = P.suggest_mesh(LLAMA_1B, 8, 16, ts)
    assert sm["train"] == {"data": 1, "fsdp": 8, "tensor": 1}


def _tiny_model_dir(tmp_path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 512, "eos_token_id": 2}))
    return d


def test_command_prints_json_and_exits_2_when_it_cannot_fit(tmp_path, capsys):
    from selfalign_jax import cli

    d = _tiny_model_dir(tmp_path)
    cli.main(["plan", "--model", str(d), "--hbm-gib", "1", "--mesh", "fsdp=2", "--batch-size", "4",
              "--max-length", "64", "--gen-batch", "4", "--prompt-len", "32", "--max-new-tokens", "16"])
    out = capsys.readouterr().out.strip().splitlines()
    p = json.loads(out[-1])
    assert p["fits"] and p["devices"] == 2 and p["train"]["params"] > 0 and "KV cache" in "\n".join(out)
    cfg = M.Config(family="llama", vocab_size=256, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   intermediate=128, max_pos=512)
    assert p["train"]["params"] == P.spec_bytes(M.param_specs(cfg), "float32", {"fsdp": 2})
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", str(d), "--hbm-gib", "0.001", "--devices", "1", "--batch-size", "64"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0]


def test_presets_fit_their_machines():
    """The shipped presets: the 1B-like model fits a v5e-8 and an 80 GB GPU with their settings."""
    from selfalign_jax.app import rundir

    for name, mesh, hbm in (("tpu-v5e-8", {"fsdp": 8}, 16), ("gpu-80gb", {"data": 1}, 80)):
        pre = rundir.load_config(ROOT / "configs" / f"{name}.json")
        s = pre.sft
        ts = P.TrainSettings(batch_size=s.batch_size // s.grad_accum, max_length=s.max_length, dtype="bfloat16",
                             lora_rank=s.lora_rank, remat=s.remat, grad_accum=s.grad_accum)
        gs = P.GenSettings(batch_size=pre.batch_size, prompt_len=pre.context_budget,
                           max_new_tokens=max(pre.question_gen.max_new_tokens, pre.answer_gen.max_new_tokens))
        assert P.train_advice(LLAMA_1B, ts, mesh, hbm) is None, name
        assert P.gen_advice(LLAMA_1B, gs, mesh, hbm) is None, name
        n = 1
        for v in mesh.values():
            n *= v
        assert {k: v for k, v in MS.parse_mesh(pre.mesh, n).items() if v > 1 or k in mesh} == mesh, name


def test_fit_train_keeps_the_effective_batch_and_prefers_no_remat():
    cfg = M.Config(family="llama", vocab_size=8192, hidden=512, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64,
                   intermediate=1536, max_pos=1024)
    ts = P.TrainSettings(batch_size=16, max_length=256, dtype="float32", grad_accum=2)
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    total = {(b, r): P.train_bytes(cfg, dataclasses.replace(ts, batch_size=b, grad_accum=32 // b, remat=r),
                                   one)["total"] for b in (16, 8, 4, 2, 1) for r in (False, True)}
    assert P.fit_train(cfg, ts, one, 1 << 50) == ts  # fits: unchanged
    got = P.fit_train(cfg, ts, one, total[(4, False)])  # the largest divisor that fits
    assert (got.batch_size, got.grad_accum, got.remat) == (4, 8, False)
    got = P.fit_train(cfg, ts, one, total[(16, False)], max_rows=8)
    assert (got.batch_size, got.grad_accum) == (8, 4)
    tight = total[(1, False)] - 1  # no micro-batch fits without remat: remat, the largest micro-batch that fits
    best = max(b for b in (16, 8, 4, 2, 1) if total[(b, True)] <= tight)
    got = P.fit_train(cfg, ts, one, tight)
    assert (got.batch_size, got.grad_accum, got.remat) == (best, 32 // best, True)
    got = P.fit_train(cfg, ts, one, tight, remat=False)  # remat not allowed: the smallest split, over budget
    assert (got.batch_size, got.grad_accum, got.remat) == (1, 32, False)
    assert P.fit_train(cfg, ts, one, total[(4, False)], split=False).batch_size == 16
    got = P.fit_train(cfg, ts, {"data": 4, "fsdp": 1, "tensor": 1}, 1)  # multiples of the mesh rows only
    assert got.batch_size == 4 and got.grad_accum == 8
