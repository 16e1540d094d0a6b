import json

import pytest

from selfalign_jax.core import fileio
from selfalign_jax.core.errors import UserError


def test_atomic_write_keeps_old_file_and_no_temp_on_error(tmp_path):
    p = tmp_path / "out.jsonl"
    fileio.write_jsonl(p, [{"a": 1}, {"b": "é"}])
    assert fileio.read_jsonl(p) == [{"a": 1}, {"b": "é"}]

    def rows():
        yield {"a": 2}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fileio.write_jsonl(p, rows())
    assert fileio.read_jsonl(p) == [{"a": 1}, {"b": "é"}]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.jsonl"]


def test_atomic_directory_replaces_existing(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "old.txt").write_text("x")
    with fileio.atomic(d, directory=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert [x.name for x in d.iterdir()] == ["new.txt"]
    with pytest.raises(ValueError):
        with fileio.atomic(d, directory=True) as tmp:
            (tmp / "half.txt").write_text("z")
            raise ValueError
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model"]
    assert [x.name for x in d.iterdir()] == ["new.txt"]


def test_records_name_file_and_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n\n[1]\n')
    with pytest.raises(UserError, match=r"r\.jsonl:3: expected a JSON object"):
        fileio.read_jsonl(p)
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(UserError, match=r"r\.jsonl:2: malformed JSON"):
        fileio.read_jsonl(p)
    q = tmp_path / "r.json"
    q.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert [w.split(": ")[-1] for w, _ in fileio.records(q)] == ["item 1", "item 2"]
    fileio.write_json(tmp_path / "m.json", {"k": [1]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"k": [1]}


def test_default_cache_dir_honours_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path))
    assert fileio.default_cache_dir() == tmp_path
    monkeypatch.delenv("SELFALIGN_CACHE")
    assert fileio.default_cache_dir().parts[-2:] == (".cache", "selfalign-jax")
