"""The loss (core/loss.py): token NLL with the prompt masked equals transformers' loss, and the fused chunked
LM-head + cross-entropy equals the plain one in value and gradients."""

import jax
import numpy as np
import pytest

import hf_fixtures as fx
from selfalign_jax.core import batching, loss
from selfalign_jax.core import checkpoint as C
from selfalign_jax.core import model as M
from hf_fixtures import pairs as _pairs


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fx.llama_base(tmp_path_factory)


def test_loss_equals_transformers_loss_with_prompt_masked(base):
    """Our token-weighted loss == HF's loss with labels -100 on the prompt: prompt tokens add nothing."""
    import torch

    path, tm, tok = base
    cfg, params = C.load(path, dtype="float32")
    enc = batching.encode_pairs(_pairs(4, seed=5), tok, max_length=32)
    b = batching.make_batch(enc, range(4), 1, 4, 32, bucket=32)
    mb = jax.tree.map(lambda x: x[0], b)
    nll, n = jax.jit(loss.token_nll, static_argnums=1)(params, cfg, mb)
    ours = float(nll / n)
    L = max(len(x) for x in enc.ids)
    ids = np.zeros((4, L), np.int64)
    labels = np.full((4, L), -100, np.int64)
    mask = np.zeros((4, L), np.int64)
    for r in range(4):
        k = len(enc.ids[r])
        ids[r, :k] = enc.ids[r]
        mask[r, :k] = 1
        labels[r, :k] = np.where(enc.loss_mask[r], enc.ids[r], -100)
    with torch.no_grad():
        ref = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    assert abs(ours - float(ref)) < 1e-5, (ours, float(ref))
    # changing prompt targets' weights would change the loss: the masked-out part is not negligible
    all_w = dict(mb, weights=(mb["pos"] >= 0).astype(np.float32))
    nll2, n2 = jax.jit(loss.token_nll, static_argnums=1)(params, cfg, all_w)
    assert abs(float(nll2 / n2) - ours) > 1e-2


@pytest.mark.parametrize("pattern", ["scattered", "uneven rows"])
def test_fused_xent_equals_plain_loss_and_grads(pattern):
    """The chunked LM-head + cross-entropy (weighted positions only, full chunks then a tail) gives
    the plain logits path's loss and gradients."""
    cfg = M.Config(family="llama", vocab_size=300, hidden=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                   intermediate=48, max_pos=64)
    p = M.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
    rng = np.random.default_rng(0)
    B = 3
    w = (rng.random((B, 24)) > 0.4).astype(np.float32)
    if pattern == "uneven rows":  # a prompt-only row, a row with loss on its last 5 positions, fractional weights
        w = np.zeros((B, 24), np.float32)
        w[1, 19:] = 1.0
        w[2, 3:17] = 0.5
    b = {"tokens": rng.integers(0, 300, (B, 24)).astype(np.int32),
         "targets": rng.integers(0, 300, (B, 24)).astype(np.int32),
         "pos": np.tile(np.arange(24, dtype=np.int32), (B, 1)), "weights": w}
    ref_l, ref_g = jax.value_and_grad(lambda p: loss.token_nll(p, cfg, b, fused=False)[0])(p)
    for chunk in (512, 48, 24):  # one chunk; 16 positions per chunk + 2-position tail chunks; 8 + 1
        l, g = jax.value_and_grad(lambda p: loss.token_nll(p, cfg, b, chunk_tokens=chunk)[0])(p)
        assert abs(float(l) - float(ref_l)) < 1e-4 * abs(float(ref_l))
        rel = jax.tree.map(lambda a, c: float(np.abs(a - c).max() / (np.abs(c).max() + 1e-30)), g, ref_g)
        assert max(jax.tree.leaves(rel)) < 1e-5, rel
