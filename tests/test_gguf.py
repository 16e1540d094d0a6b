"""GGUF import: files written here with gguf.GGUFWriter (as llama.cpp's converter lays them out,
quantized) give, through `selfalign convert`, the logits transformers' own GGUF loader gives."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import hf_fixtures as fx
from selfalign_jax.core import checkpoint, gguf_import, model as M
from selfalign_jax.core.errors import UserError

# tensor name fragment -> GGUF type (first match); the rest F32
QTYPES = {"attn_q.": "Q8_0", "attn_k.": "Q4_0", "attn_v.": "Q5_0", "ffn_": "Q4_1", "token_embd": "F16",
          "output.weight": "Q8_0"}
# transformers' GGUF config reader takes head_dim from Qwen3Config's default (128), and Gemma's
# query_pre_attn_scalar (256) and Gemma 2's soft-caps (50, 30) from the defaults: the test models use those
CASES = {
    "llama": dict(),
    "qwen3": dict(head_dim=128),
    "qwen2": dict(),
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3": dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6, layer_types=None,
                   rope_parameters=None, sliding_window=4),
}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "selfalign_jax.cli", *args], capture_output=True, text=True)


def _transformers_gguf(path):
    """transformers' GGUF loader: from_pretrained(gguf_file=...) (needs accelerate); else the function it
    calls for these architectures, load_gguf_checkpoint, into a model of the config it reads."""
    import torch
    import transformers

    try:
        import accelerate  # noqa: F401
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        conf = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        conf._attn_implementation = "eager"
        m = transformers.AutoModelForCausalLM.from_config(conf).float().eval()
        sd = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=m)["tensors"]
        missing, _ = m.load_state_dict(sd, strict=False)
        assert set(missing) <= {"lm_head.weight"}, missing
        if conf.tie_word_embeddings:
            m.tie_weights()
        return m
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=list(CASES))
def gguf_file(request, tmp_path_factory):
    fam = request.param
    root = tmp_path_factory.mktemp(f"gguf_{fam}")
    tm = fx.make_model(fam, root / "hf", tokenizer=False, **CASES[fam])
    return fam, tm, fx.write_gguf(tm, root / f"{fam}.gguf", fam, QTYPES)


def test_convert_gives_transformers_gguf_logits(gguf_file, tmp_path):
    fam, orig, path = gguf_file
    r = _cli("convert", "--model", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    cfg, params = checkpoint.load(tmp_path / "out", dtype="float32")
    assert cfg.family == {"gemma3": "gemma3_text"}.get(fam, fam)
    tokens, valid = fx.left_padded_batch(seed=7)
    ours = np.asarray(jax.jit(M.forward, static_argnums=1)(params, cfg, tokens, M.positions(valid)))
    ref = fx.torch_logits(_transformers_gguf(path), tokens, valid)
    err = np.abs(ours - ref)[valid].max()
    print(f"{fam}: GGUF import vs transformers' GGUF loader max abs logit diff {err:.2e}")
    assert err <= 1e-4, (fam, err)
    # quantized, so not the original weights, but near them: measured 0.24 of the logit range for llama
    # (4-bit MLP on random weights), and 1.05 with llama's Q/K rows left permuted
    orig_logits = fx.torch_logits(orig, tokens, valid)
    rel = np.abs(ours - orig_logits)[valid].max() / np.abs(orig_logits[valid]).max()
    assert 0 < rel < 0.5, (fam, rel)
    # the tokenizer is transformers' GGUF conversion, chat template included
    from transformers import AutoTokenizer
    tok = checkpoint.load_tokenizer(tmp_path / "out")
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "the water was there"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"] and len(tok(text)["input_ids"]) >= 4
    assert tok.chat_template == fx.CHAT_TEMPLATE
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_unpermute_and_norm_shift_are_needed(gguf_file):
    """The corrections are exercised: without them the tensors differ from the originals."""
    fam, orig, path = gguf_file
    _, cfg, lazy = gguf_import.read(path)
    sd = {k: v.detach().numpy() for k, v in orig.state_dict().items()}
    q = "model.layers.0.self_attn.q_proj.weight"
    got = np.asarray(lazy[q])
    assert np.abs(got - sd[q]).max() < 0.02  # Q8_0 of weights ~0.15
    raw = np.asarray(gguf_import.LazyTensor(lazy[q].tensor, lazy[q].shape))
    assert (np.abs(raw - sd[q]).max() > 0.1) == (fam == "llama")
    n = "model.layers.0.input_layernorm.weight"
    np.testing.assert_allclose(np.asarray(lazy[n]), sd[n], atol=1e-6)


def test_inspect_gguf(gguf_file):
    fam, orig, path = gguf_file
    r = _cli("inspect", "--model", str(path), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["parameters"] == sum(p.numel() for p in orig.parameters())
    assert s["dtype"] == ("F16,F32,Q4_0,Q4_1,Q5_0,Q8_0")
    assert s["layers"] == orig.config.num_hidden_layers


def test_unsupported_quant_type_and_architecture(tmp_path):
    import gguf

    tm = fx.make_model("llama", tmp_path / "hf", tokenizer=False)
    path = fx.write_gguf(tm, tmp_path / "m.gguf", "llama")
    # one tensor rewritten as Q8_1 (a type the reader cannot dequantize): same file, other type id
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(path.read_bytes())
    # the tensor-info record: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    rec = data.index(b"blk.1.ffn_up.weight") + len("blk.1.ffn_up.weight")
    type_at = rec + 4 + 8 * len(t.shape)
    assert int.from_bytes(data[type_at:type_at + 4], "little") == int(gguf.GGMLQuantizationType.F32)
    bad = tmp_path / "bad.gguf"
    data[type_at:type_at + 4] = int(gguf.GGMLQuantizationType.Q8_1).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    r = _cli("convert", "--model", str(bad), "--out", str(out))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Q8_1" in r.stderr and str(bad) in r.stderr and "blk.1.ffn_up.weight" in r.stderr
    assert not out.exists()
    # an architecture we do not read
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = _cli("convert", "--model", str(tmp_path / "phi.gguf"), "--out", str(out))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "'phi2'" in r.stderr and "phi.gguf" in r.stderr
    assert not out.exists()
    with pytest.raises(UserError, match="not found"):
        gguf_import.read(tmp_path / "absent.gguf")


def test_llama3_rope_from_rope_freqs(tmp_path):
    """llama.cpp stores Llama 3's RoPE scaling only as the rope_freqs tensor: the import recovers the
    llama3 rope parameters from it (transformers' GGUF loader ignores it), giving the original logits."""
    tm = fx.make_model("llama3", tmp_path / "hf", tokenizer=False)
    path = fx.write_gguf(tm, tmp_path / "l3.gguf", "llama")
    raw, cfg, _ = gguf_import.read(path)
    ref_cfg = checkpoint.config_from_hf(fx.read_json(tmp_path / "hf" / "config.json"))
    assert cfg.rope_type == "llama3"
    for k in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_pos"):
        assert getattr(cfg, k) == pytest.approx(getattr(ref_cfg, k), rel=1e-4), k
    r = _cli("convert", "--model", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    cfg2, params = checkpoint.load(tmp_path / "out", dtype="float32")
    tokens, valid = fx.left_padded_batch(seed=8)
    ours = np.asarray(jax.jit(M.forward, static_argnums=1)(params, cfg2, tokens, M.positions(valid)))
    err = np.abs(ours - fx.torch_logits(tm, tokens, valid))[valid].max()
    assert err <= 1e-4, err
