"""Loader errors (one line, naming the problem) and the inspect / convert commands."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_fixtures as fx
from selfalign_jax.core import checkpoint
from selfalign_jax.core.errors import UserError


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    p = tmp_path_factory.mktemp("llama")
    fx.make_model("llama", p)
    return p


def _copy(src, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(src, d)
    return d


def _err(path, match):
    with pytest.raises(UserError, match=match) as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_directory(tmp_path):
    _err(tmp_path / "nope", "model directory not found")


def test_missing_config(src, tmp_path):
    d = _copy(src, tmp_path)
    (d / "config.json").unlink()
    _err(d, "no config.json")


def test_unsupported_model_type(src, tmp_path):
    d = _copy(src, tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["model_type"] = "bloom"
    (d / "config.json").write_text(json.dumps(c))
    _err(d, "unsupported model_type 'bloom'")


def test_pickle_checkpoint_refused(src, tmp_path):
    d = _copy(src, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    _err(d, "pickle.*safetensors only")


def _edit_tensors(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_named(src, tmp_path):
    d = _copy(src, tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _err(d, r"missing tensor: model\.layers\.1\.mlp\.up_proj\.weight")


def test_unexpected_tensor_named(src, tmp_path):
    d = _copy(src, tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    _err(d, r"unexpected tensor: model\.extra\.weight")


def test_misshaped_tensor_named(src, tmp_path):
    d = _copy(src, tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.norm.weight": np.zeros(5, np.float32)}))
    _err(d, r"mis-shaped tensor: model\.norm\.weight \(5,\) != expected \(64,\)")


def test_no_tokenizer(src, tmp_path):
    d = _copy(src, tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer"):
        checkpoint.load_tokenizer(d)
    assert checkpoint.load_tokenizer(src)("the water").input_ids[0] == 1  # BOS as the tokenizer adds it


def test_save_refuses_nonempty_out(src, tmp_path):
    cfg, params = checkpoint.load(src)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        checkpoint.save(tmp_path / "out", cfg, params)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "selfalign_jax.cli", *args], capture_output=True, text=True)


def test_cli_inspect_convert_and_errors(src, tmp_path):
    r = _cli("--help")
    assert r.returncode == 0 and "inspect" in r.stdout and "convert" in r.stdout
    r = _cli("inspect", "--model", str(src), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["family"] == "llama" and s["vocabulary"] == fx.VOCAB and s["tied_embeddings"] is False
    assert s["context_length"] == 64 and s["dtype"] == "F32"
    import transformers
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    assert s["parameters"] == sum(p.numel() for p in tm.parameters())
    r = _cli("convert", "--model", str(src), "--out", str(tmp_path / "bf"), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert json.loads(_cli("inspect", "--model", str(tmp_path / "bf"), "--json").stdout)["dtype"] == "BF16"
    r = _cli("convert", "--model", str(src), "--out", str(tmp_path / "bf"))
    assert r.returncode == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("inspect", "--model", str(tmp_path / "absent"))
    assert r.returncode == 2 and r.stderr.startswith("selfalign: error: model directory not found")


# ------------------------------------------------------------------------------ integrity (issue 18)
def _safetensors_bytes(d):
    return (d / "model.safetensors").read_bytes()


def _header_of(b):
    import struct
    n = struct.unpack("<Q", b[:8])[0]
    return n, json.loads(b[8:8 + n])


def _with_header(b, header):
    import struct
    n, _ = _header_of(b)
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + b[8 + n:]


@pytest.mark.parametrize("case", ["truncated", "offsets_past_end", "zero_bytes", "short_header", "absurd_header",
                                  "bad_json_header", "unknown_dtype", "wrong_extent"])
def test_corrupt_safetensors_one_line(src, tmp_path, case):
    import struct
    d = _copy(src, tmp_path)
    b = _safetensors_bytes(d)
    n, h = _header_of(b)
    name = "model.layers.1.mlp.down_proj.weight"
    if case == "truncated":
        b, match = b[:-100], "(data_offsets .* outside|cut short)"
    elif case == "offsets_past_end":
        a, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [a + 10**6, e + 10**6]
        b, match = _with_header(b, h), rf"tensor {name}: data_offsets .* outside"
    elif case == "zero_bytes":
        b, match = b"", r"not a safetensors file \(0 bytes\)"
    elif case == "short_header":
        b, match = b[:8 + n // 2], "header length .* does not fit"
    elif case == "absurd_header":
        b, match = struct.pack("<Q", 1 << 60) + b[8:], "header length .* does not fit"
    elif case == "bad_json_header":
        b, match = struct.pack("<Q", n) + b"{" * n + b[8 + n:], "header is not valid JSON"
    elif case == "unknown_dtype":
        h[name]["dtype"] = "F8_E4M3"
        b, match = _with_header(b, h), rf"tensor {name}: unsupported dtype 'F8_E4M3'"
    else:
        h[name]["shape"] = [3, 3]
        b, match = _with_header(b, h), rf"tensor {name}: \d+ bytes for shape \(3, 3\)"
    (d / "model.safetensors").write_bytes(b)
    msg = _err(d, match)
    assert "model.safetensors" in msg


def test_short_read_names_tensor(src, tmp_path, monkeypatch):
    """A file that shrinks after its header was checked (or a short read) is caught per tensor."""
    d = _copy(src, tmp_path)
    real = checkpoint._read_header

    def lying_header(path):
        h, start = real(path)
        (d / "model.safetensors").write_bytes(_safetensors_bytes(d)[:start + 1000])
        return h, start

    monkeypatch.setattr(checkpoint, "_read_header", lying_header)
    _err(d, r"model\.safetensors: tensor .*: read \d+ of \d+ bytes")


@pytest.mark.parametrize("index,match", [
    ("{not json", "not a valid shard index .not valid JSON"), ('{"weight_map": [1, 2]}', "it needs"),
    ('[]', "it needs"), ('{"weight_map": {"a": "../x.safetensors"}}', "bad shard file name"),
    ('{"weight_map": {"a": "x.safetensors"}}', "shard x.safetensors is missing")])
def test_bad_shard_index_one_line(src, tmp_path, index, match):
    d = _copy(src, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(index)
    assert "model.safetensors.index.json" in _err(d, match)


@pytest.mark.parametrize("name,text", [("config.json", "[1, 2]"), ("config.json", '"llama"'),
                                       ("generation_config.json", "3"),
                                       ("generation_config.json", '{"eos_token_id": "x"}')])
def test_config_not_an_object(src, tmp_path, name, text):
    d = _copy(src, tmp_path)
    (d / name).write_text(text)
    assert name in _err(d, "not a JSON object|eos_token_id")


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
