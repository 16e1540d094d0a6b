"""Hostile inputs and faults (issue 18): each is one line naming the file / tensor / field, a non-zero
exit, and nothing already written lost."""

import json
import shutil
import struct
import subprocess
import sys

import pytest

import hf_fixtures as fx
from selfalign_jax import checkpoint
from selfalign_jax.errors import UserError


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    p = tmp_path_factory.mktemp("llama")
    fx.make_model("llama", p)
    return p


def _copy(src, tmp_path, name="m"):
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def _one_line(fn, match):
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "selfalign_jax.cli", *args], capture_output=True, text=True,
                          env=env)


def _rewrite_header(path, edit):
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    edit(h)
    hb = json.dumps(h).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b[8 + n:])


# ------------------------------------------------------------------------------ checkpoint integrity
def test_truncated_safetensors_refused(src, tmp_path):
    d = _copy(src, tmp_path)
    st = d / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size - 1000)
    msg = _one_line(lambda: checkpoint.load(d), r"model\.safetensors: tensor .*: data ends at byte \d+ but the file")
    assert str(st) in msg


def test_offsets_past_end_refused(src, tmp_path):
    d = _copy(src, tmp_path)

    def edit(h):
        e = h["model.norm.weight"]
        size = e["data_offsets"][1] - e["data_offsets"][0]
        e["data_offsets"] = [10 ** 7, 10 ** 7 + size]
    _rewrite_header(d / "model.safetensors", edit)
    _one_line(lambda: checkpoint.load(d), r"tensor model\.norm\.weight: data ends at byte 10000\d+")


def test_short_read_refused(src, tmp_path, monkeypatch):
    """The file shrinks after its header was checked: the bytes actually read are counted."""
    d = _copy(src, tmp_path)
    real = checkpoint._read_header
    monkeypatch.setattr(checkpoint, "_read_header", lambda p: (real(p), p.write_bytes(p.read_bytes()[:4000]))[0])
    _one_line(lambda: checkpoint.load(d), r"model\.safetensors: tensor .*: read \d+ of \d+ bytes")


@pytest.mark.parametrize("case,match", [
    ("zero", r"not a safetensors file \(0 bytes"),
    ("short", r"header length \d+ is past the end of the file \(100 bytes\)"),
    ("absurd", r"header length 1152921504606846976 is past the end"),
    ("badjson", r"safetensors header is not valid JSON"),
    ("f8", r"tensor lm_head\.weight: unsupported dtype 'F8_E4M3'"),
    ("shape", r"tensor lm_head\.weight: data_offsets .* hold \d+ bytes, shape"),
])
def test_bad_safetensors_one_line(src, tmp_path, case, match):
    d = _copy(src, tmp_path)
    st = d / "model.safetensors"
    b = st.read_bytes()
    if case == "zero":
        st.write_bytes(b"")
    elif case == "short":
        st.write_bytes(b[:100])
    elif case == "absurd":
        st.write_bytes(struct.pack("<Q", 1 << 60) + b[8:])
    elif case == "badjson":
        st.write_bytes(b[:8] + b"{" * 8 + b[16:])
    elif case == "f8":
        _rewrite_header(st, lambda h: h["lm_head.weight"].update(dtype="F8_E4M3"))
    else:
        _rewrite_header(st, lambda h: h["lm_head.weight"].update(shape=[3, 3]))
    assert str(st) in _one_line(lambda: checkpoint.load(d), match)


@pytest.mark.parametrize("index,match", [
    ("{not json", "not valid JSON"), ('{"weight_map": [1, 2]}', "field 'weight_map' must be"),
    ('[]', "field 'weight_map' must be"), ('{"weight_map": {"a": "../x.safetensors"}}', "bad shard file name"),
    ('{"weight_map": {"a": "x.safetensors"}}', "shard x.safetensors is missing")])
def test_bad_shard_index_one_line(src, tmp_path, index, match):
    d = _copy(src, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(index)
    assert "model.safetensors.index.json" in _one_line(lambda: checkpoint.load(d), match)


@pytest.mark.parametrize("name,text", [("config.json", "[1, 2]"), ("config.json", '"llama"'),
                                       ("generation_config.json", "3"),
                                       ("generation_config.json", '{"eos_token_id": "x"}')])
def test_config_not_an_object(src, tmp_path, name, text):
    d = _copy(src, tmp_path)
    (d / name).write_text(text)
    assert name in _one_line(lambda: checkpoint.load(d), "expected a JSON object|eos_token_id")


def test_tokenizer_past_vocab_refused(tmp_path):
    d = tmp_path / "small"
    fx.make_model("llama", d, vocab_size=100)  # the fixture tokenizer has 128 ids
    msg = _one_line(lambda: checkpoint.load_tokenizer(d), "the tokenizer has 128 token ids but the model has "
                    "vocab_size 100")
    assert str(d) in msg
    from selfalign_jax.commands.inspect_model import summary
    assert summary(d)["tokenizer"] == "128 ids (MORE than vocab_size 100: refused at load)"


def test_remote_code_entries_not_exported(src, tmp_path):
    d = _copy(src, tmp_path)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "auto_map": {"AutoModelForCausalLM": "x.Model"},
                                               "trust_remote_code": True}))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**tc, "auto_map": {"AutoTokenizer": ["t.Tok", None]}}))
    cfg, params = checkpoint.load(d)
    out = checkpoint.save(tmp_path / "out", cfg, params, tokenizer_from=d,
                          base_config=json.loads((d / "config.json").read_text()))
    for f in ("config.json", "tokenizer_config.json"):
        got = json.loads((out / f).read_text())
        assert "auto_map" not in got and "trust_remote_code" not in got
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == tc["eos_token"]
