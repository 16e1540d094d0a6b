"""Parity with transformers for every family: full forward, KV-cache decode, export round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures as fx
from selfalign_jax.core import checkpoint, model as M


@pytest.fixture(scope="module", params=fx.ALL)
def family_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tm = fx.make_model(request.param, path)
    cfg, params = checkpoint.load(path, dtype="float32")
    return request.param, path, tm, cfg, params


def _ours(cfg, params, tokens, valid):
    return np.asarray(jax.jit(M.forward, static_argnums=1)(params, cfg, tokens, M.positions(valid)))


def test_logits_match_transformers(family_model):
    fam, _, tm, cfg, params = family_model
    tokens, valid = fx.left_padded_batch(seed=1)
    ref = fx.torch_logits(tm, tokens, valid)
    ours = _ours(cfg, params, tokens, valid)
    err = np.abs(ours - ref)[valid].max()
    print(f"{fam}: max abs logit diff {err:.2e}")
    assert err <= 1e-4, f"{fam}: max abs diff {err}"
    assert np.abs(ref[valid]).max() > 0.5  # the comparison is not between near-zero logits


def test_config_features(family_model):
    fam, _, _, cfg, _ = family_model
    expect = {
        "llama": dict(rope_type="default", tied=False, n_kv_heads=2),
        "llama3": dict(rope_type="llama3", rope_factor=8.0, rope_theta=500000.0),
        "llama_linear_tied": dict(rope_type="linear", rope_factor=2.0, tied=True),
        "mistral": dict(windows=(4, 4)),
        "qwen2": dict(qkv_bias=True, o_bias=False),
        "gemma": dict(head_dim=32, norm="rms1p", act="gelu_tanh", emb_scale=True, tied=True),
        "qwen3": dict(qk_norm=True, qkv_bias=False, head_dim=24, norm="rms", sandwich_norm=False),
        "gemma2": dict(windows=(4, None), attn_softcap=3.0, final_softcap=5.0, query_pre_attn_scalar=20.0,
                       sandwich_norm=True, qk_norm=False, norm="rms1p", emb_scale=True, act="gelu_tanh"),
        "gemma3": dict(windows=(4, None), attn_softcap=None, final_softcap=None, qk_norm=True, sandwich_norm=True,
                       rope_theta=1e6, rope_type="linear", rope_factor=8.0, local_rope_theta=100.0),
        "opt": dict(pre_norm=True, final_norm=True, rope_theta=None, pos_offset=2, act="relu"),
        "opt350m": dict(pre_norm=False, final_norm=False, embed_dim=32),
    }[fam]
    for k, v in expect.items():
        assert getattr(cfg, k) == v, (fam, k, getattr(cfg, k))


@pytest.mark.parametrize("key_block,chunks,slots", [(128, (7,), 16), (5, (3, 4, 5), 14)])
def test_kv_cache_decode_equals_full_forward(family_model, monkeypatch, key_block, chunks, slots):
    """Prefill in chunks, then one column at a time: the full forward's logits. A prefill chunk attends to
    the filled slots only, in key blocks: 5-key blocks over 14 slots end with a block that overlaps the one
    before it."""
    fam, _, _, cfg, params = family_model
    monkeypatch.setattr(M, "KEY_BLOCK", key_block)
    tokens, valid = fx.left_padded_batch(seed=2, lengths=(12, 9, 6))
    pos = M.positions(valid)
    full = _ours(cfg, params, tokens, valid)
    step = jax.jit(lambda p, t, q, c: (lambda h, c2: (M.logits(p, cfg, h), c2))(*M.apply(p, cfg, t, q, c)))
    cache = M.init_cache(cfg, tokens.shape[0], slots)
    got, T0 = [], 0
    for n in chunks:
        lg, cache = step(params, tokens[:, T0:T0 + n], pos[:, T0:T0 + n], cache)
        got.append(np.asarray(lg))
        T0 += n
    for t in range(T0, tokens.shape[1]):
        lg, cache = step(params, tokens[:, t:t + 1], pos[:, t:t + 1], cache)
        got.append(np.asarray(lg))
    got = np.concatenate(got, axis=1)
    err = np.abs(got - full)[valid].max()
    assert err <= 1e-4, f"{fam}: cache vs full {err}"
    assert int(cache.end) == tokens.shape[1]


def test_scanned_layers_equal_the_layer_loop(family_model):
    """Stacked layers (the train step's form: one layer's code under lax.scan, with a traced window and RoPE base
    where layers differ: mistral, gemma2, gemma3) give the layer loop's loss and gradients, with remat too;
    unstack_layers inverts stack_layers; a KV cache needs per-layer parameters."""
    fam, _, _, cfg, params = family_model
    tokens, valid = fx.left_padded_batch(seed=2)
    pos = M.positions(valid)

    def loss(p, remat):
        lg = M.logits(p, cfg, M.apply(p, cfg, tokens, pos, remat=remat)[0])
        return jnp.where(valid[..., None], jnp.square(lg), 0.0).mean()

    loss_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref, g_ref = loss_grad(params, False)
    stacked = M.stack_layers(params)
    assert isinstance(stacked.layers, M.Layer) and stacked.layers.q.shape[0] == cfg.n_layers
    for remat in (False, True):
        got, g = loss_grad(stacked, remat)
        assert float(got) == pytest.approx(float(ref), rel=1e-5), (fam, remat)
        g = M.unstack_layers(g)
        scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_ref))
        err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(g),
                                                                                     jax.tree.leaves(g_ref)))
        assert scale > 0 and err <= 1e-4 * scale, (fam, remat, err, scale)
    back = M.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    with pytest.raises(ValueError, match="per-layer"):
        M.apply(stacked, cfg, tokens, pos, cache=M.init_cache(cfg, tokens.shape[0], 16))


def test_export_reloads_in_transformers(family_model, tmp_path):
    import torch
    import transformers

    fam, src, _, cfg, params = family_model
    tokens, valid = fx.left_padded_batch(seed=3)
    ours = _ours(cfg, params, tokens, valid)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", None)):
        out = checkpoint.save(tmp_path / dtype, cfg, params, tokenizer_from=src, dtype=dtype,
                              base_config=fx.read_json(src / "config.json"))
        assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
        tm = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                               attn_implementation="eager")
        ref = fx.torch_logits(tm, tokens, valid)
        if tol is None:  # bf16 export: same as our model on the bf16-rounded weights
            p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
            target, tol = _ours(cfg, p16, tokens, valid), 1e-4
        else:
            target = ours
        err = np.abs(ref - target)[valid].max()
        assert err <= tol, f"{fam} {dtype} export: {err}"
        cfg2, _ = checkpoint.load(out, dtype="float32")
        assert cfg2 == cfg


def test_config_round_trip(family_model):
    _, _, _, cfg, _ = family_model
    raw = checkpoint.config_to_hf(cfg)
    assert checkpoint.config_from_hf(raw, cfg.dtype, cfg.eos_ids) == cfg


def test_bf16_forward_close_to_fp32(tmp_path):
    fx.make_model("llama", tmp_path)
    cfg32, p32 = checkpoint.load(tmp_path, dtype="float32")
    cfg16, p16 = checkpoint.load(tmp_path, dtype="bfloat16")
    assert p16.layers[0].q.dtype == jnp.bfloat16
    tokens, valid = fx.left_padded_batch(seed=4)
    a, b = _ours(cfg32, p32, tokens, valid), _ours(cfg16, p16, tokens, valid)
    assert b.dtype == np.float32  # logits in fp32
    rel = np.abs(a - b)[valid].max() / np.abs(a[valid]).max()
    assert rel < 0.05, rel


def test_sharded_checkpoint_loads(tmp_path):
    tm = fx.make_model("qwen2", tmp_path / "src")
    cfg, params = checkpoint.load(tmp_path / "src")
    out = checkpoint.save(tmp_path / "sharded", cfg, params, tokenizer_from=tmp_path / "src",
                          max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 2
    _, p2 = checkpoint.load(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens, valid = fx.left_padded_batch(seed=5)
    np.testing.assert_allclose(_ours(cfg, p2, tokens, valid)[valid],
                               fx.torch_logits(tm, tokens, valid)[valid], atol=1e-4)


def test_init_params_and_shardings_cover_every_array():
    import torch  # noqa: F401  (the transformers models below need it)
    import transformers

    for fam in ("llama", "gemma", "opt350m"):
        hc = fx.hf_config(fam)
        cfg = checkpoint.config_from_hf(hc.to_dict())
        params = M.init_params(cfg, jax.random.key(0))
        tm = transformers.AutoModelForCausalLM.from_config(hc)
        assert M.num_params(params) == sum(p.numel() for p in tm.parameters()), fam
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    sh = M.param_shardings(cfg, mesh)
    assert jax.tree.structure(sh) == jax.tree.structure(params)


def test_logical_axes_to_partition_specs():
    class FakeMesh:
        shape = {"data": 1, "fsdp": 4, "tensor": 2}

    P = jax.sharding.PartitionSpec
    rules = M.ShardingRules()
    assert M.logical_to_pspec(("q_heads", "embed"), (64, 64), FakeMesh, rules) == P("tensor", "fsdp")
    assert M.logical_to_pspec(("vocab", "embed"), (127, 64), FakeMesh, rules) == P(None, "fsdp")
    assert M.logical_to_pspec(("embed",), (6,), FakeMesh, rules) == P(None)
    assert M.logical_to_pspec(("batch", None), (8, 3), FakeMesh, rules) == P(("data", "fsdp"), None)
