"""Embedders: the JAX BERT encoder against transformers' BertModel + mean pooling, hashing, and lm."""

import json

import numpy as np
import pytest

from selfalign_jax.core import embed as E
from selfalign_jax.core import encoder as ENC
from selfalign_jax.core.errors import UserError

WORDS = ("the a of to and in is it you that he was for on are as with his they at be this have from or one "
         "had by word but not what all were we when your can said there use an each which she do how their "
         "if will up other about out many then them these so some her would make like him into time has look "
         "two more write go see number no way could people my than first water been call who oil its now").split()
TEXTS = ["The water is cold.", "how do you make people look at the first number?", "",
         "Unknownword zzz, the the the!", "a " * 40, "oil"]


def make_bert_dir(path, seed=0, prefix=False, **over):
    """Tiny random BertModel + WordPiece tokenizer saved (safetensors) to path; returns the torch model."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##s", "##ing", "z", "##z"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                          cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(path))
    kw = dict(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=96, max_position_embeddings=64, hidden_act="gelu", pad_token_id=0)
    kw.update(over)
    torch.manual_seed(seed)
    m = transformers.BertModel(transformers.BertConfig(**kw), add_pooling_layer=False).eval()
    with torch.no_grad():  # O(0.1) random weights: tiny default init would make parity trivial
        for name, p in m.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    m.save_pretrained(str(path), safe_serialization=True)
    if prefix:  # the BertForMaskedLM-style layout: every key under "bert."
        from safetensors.numpy import load_file, save_file
        f = path / "model.safetensors"
        save_file({"bert." + k: v for k, v in load_file(str(f)).items()}, str(f))
    return m, fast


def torch_ref(m, tok, texts, max_len=64, pooling="mean"):
    import torch

    b = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        h = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    if pooling == "cls":
        e = h[:, 0]
    else:
        mask = b["attention_mask"].unsqueeze(-1).float()
        e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, dim=-1).numpy()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    m, tok = make_bert_dir(d)
    return d, m, tok


def test_encoder_parity(bert_dir):
    d, m, tok = bert_dir
    emb = E.get_embedder("encoder", model=d, batch_size=4)
    got = emb.embed(TEXTS)
    want = torch_ref(m, tok, TEXTS)
    assert got.shape == (len(TEXTS), 64) and got.dtype == np.float32 and emb.dim == 64
    # 1e-4 is the requirement; fp32 lands near 1e-7, and tanh-GELU would already miss 2e-5
    assert np.abs(got - want).max() <= 2e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # batch composition and order do not matter (length buckets, padding)
    one = np.stack([emb.embed([t])[0] for t in TEXTS[:3]])
    assert np.abs(one - got[:3]).max() <= 1e-5


def test_encoder_prefix_cls_pooling_and_bin(tmp_path):
    d = tmp_path / "p"
    m, tok = make_bert_dir(d, seed=1, prefix=True, hidden_act="gelu_new")
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                             "pooling_mode_mean_tokens": False}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    emb = E.get_embedder("encoder", model=d)
    assert emb.cfg.pooling == "cls" and emb.max_len == 8
    got = emb.embed(TEXTS)
    assert np.abs(got - torch_ref(m, tok, TEXTS, max_len=8, pooling="cls")).max() <= 1e-4
    b = tmp_path / "bin"
    b.mkdir()
    (b / "config.json").write_text((d / "config.json").read_text())
    (b / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UserError, match="refusing to unpickle"):
        ENC.load(b)
    (b / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(UserError, match="not a BERT encoder"):
        ENC.load(b)


def test_hashing_embedder():
    emb = E.get_embedder("hashing", dim=256)
    x = emb.embed(["How do I bake bread?", "how do i bake BREAD", "Stock market crash causes", "", "  "])
    assert x.shape == (5, 256) and x.dtype == np.float32 and emb.dim == 256
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
    assert x[0] @ x[1] > 0.9 and abs(x[0] @ x[2]) < 0.5
    assert np.array_equal(x[3], x[4])  # empty texts share one fixed unit vector
    assert np.array_equal(emb.embed(["How do I bake bread?"])[0], x[0])  # stable (crc32, not hash())
    with pytest.raises(UserError, match="unknown embedder"):
        E.get_embedder("openai")
    with pytest.raises(UserError, match="needs --model"):
        E.get_embedder("encoder")


def test_lm_embedder(tmp_path):
    """Mean of the decoder's final normed hidden states over valid tokens, vs transformers."""
    import torch

    hf = pytest.importorskip("hf_fixtures", reason="tests/hf_fixtures.py (tiny HF checkpoints) not present")
    pytest.importorskip("selfalign_jax.core.model", reason="selfalign_jax/core/model.py not present")
    m = hf.make_model("llama", tmp_path)
    emb = E.get_embedder("lm", model=tmp_path, batch_size=2)
    texts = ["the water is cold", "how do you make people look at the first number", "oil"]
    got = emb.embed(texts)
    assert got.shape == (3, emb.dim) and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    tok = emb.tok
    want = []
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            h = m(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        e = h.mean(0)
        want.append((e / e.norm()).numpy())
    assert np.abs(got - np.stack(want)).max() <= 1e-4
    # layers=0.5: the hidden states after the first half of the layers, with the final norm
    half = E.get_embedder("lm", model=tmp_path, batch_size=2, lm_layers=0.5)
    k = E.lm_depth(m.config.num_hidden_layers, 0.5)
    assert half.cfg.n_layers == k < m.config.num_hidden_layers
    want = []
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            e = m.model.norm(m(input_ids=ids, output_hidden_states=True).hidden_states[k][0]).mean(0)
        want.append((e / e.norm()).numpy())
    assert np.abs(half.embed(texts) - np.stack(want)).max() <= 1e-4


def test_lm_embedder_sharded_equals_unsharded(tmp_path):
    """The lm embedder with its parameters sharded over 8 CPU devices (fsdp=4 x tensor=2) equals one device."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    hf = pytest.importorskip("hf_fixtures", reason="tests/hf_fixtures.py (tiny HF checkpoints) not present")
    hf.make_model("llama", tmp_path)
    code = (f"import numpy as np; from selfalign_jax.core import embed, mesh as MS; "
            f"from selfalign_jax.core.loaded import LoadedModel; m = LoadedModel.load({str(tmp_path)!r}); "
            f"t = ['the water is cold', 'oil', 'a b c d e']; "
            f"a = embed.LMEmbedder(m, batch_size=2).embed(t); "
            f"b = embed.LMEmbedder(m, batch_size=2, mesh=MS.make_mesh('fsdp=4,tensor=2')).embed(t); "
            f"print('maxdiff', float(np.abs(a - b).max()))")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split("maxdiff")[-1]) <= 1e-5, r.stdout
