"""Checkpoints whose model has exactly as many embedding rows as the tokenizer files define ids, while
transformers' tokenizer class of the family adds tokens of its own past them (Qwen2Tokenizer / GPT2Tokenizer
<|endoftext|>, LlamaTokenizer <unk>, GemmaTokenizer <unk> and <mask>): they load with those tokens dropped (one
note), `generate` equals transformers' greedy and `convert` round-trips on every family, and `finetune` and `run`
work on a family of each tokenizer class.
A tokenizer whose own files define ids past the rows is refused, and so is encoded text holding such an id."""

import json
import shutil

import numpy as np
import pytest

import hf_fixtures as fx
from selfalign_jax import api
from selfalign_jax.commands.inspect_model import summary
from selfalign_jax.core import batching, checkpoint
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.loaded import LoadedModel

V = fx.EXACT_VOCAB  # embedding rows = ids the tokenizer files define
PROMPTS = ["the water of people", "a man can write", "what is the time"]
NEW = 6  # greedy tokens per prompt
# one family per tokenizer class that adds tokens (the train step compiles per family: finetune and run on these)
BY_CLASS = ("llama", "qwen2", "gemma", "opt")
SFT = {"bucket": 64, "auto_fit": False, "streams": 1}  # one small train step shape, shared by finetune and run


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """family -> (checkpoint dir with an exact-vocab family tokenizer, transformers model), built once."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family) / "model"
            cache[family] = d, fx.make_model(family, d, exact_vocab=True, max_position_embeddings=256)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    fileio_rows(d / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    rng = np.random.default_rng(0)
    words = fx.WORDS[4:80]
    pairs = [{"question": " ".join(rng.choice(words, 3)), "answer": " ".join(rng.choice(words, 4))} for _ in range(8)]
    fileio_rows(d / "pairs.jsonl", pairs)
    return d


def fileio_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _transformers_tokenizer(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def _greedy(m, tok, prompt: str) -> str:
    """transformers' greedy completion of `prompt` (NEW tokens or to EOS), decoded as `selfalign generate`
    does: the text after the prompt's."""
    import torch

    ids = tok(prompt).input_ids
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NEW, do_sample=False, eos_token_id=2, pad_token_id=0)
    gen = [t for t in out[0, len(ids):].tolist()]
    gen = gen[:gen.index(2)] if 2 in gen else gen
    full, head = tok.decode(ids + gen, skip_special_tokens=True), tok.decode(ids, skip_special_tokens=True)
    return full[len(head):]


def _logits(d, tokens_BxT):
    """Our fp32 logits of the checkpoint at d."""
    from selfalign_jax.core import model as M

    lm = LoadedModel.load(d, "float32")
    pos = np.broadcast_to(np.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    return np.asarray(M.forward(lm.params, lm.cfg, tokens_BxT, pos))


@pytest.mark.parametrize("family", fx.ALL)
def test_class_added_tokens_dropped_with_one_note(family, exact, capsys, monkeypatch):
    d, _ = exact(family)
    monkeypatch.setattr(checkpoint, "_NOTED", set())
    capsys.readouterr()
    ref = _transformers_tokenizer(d)
    added = {i: t for t, i in ref.get_vocab().items() if i >= V}
    own = json.loads((d / "tokenizer.json").read_text())
    assert not set(added.values()) & (set(own["model"]["vocab"]) | {t["content"] for t in own["added_tokens"]})
    tok = checkpoint.load_tokenizer(d)
    checkpoint.load_tokenizer(d)  # a second load: no second note
    err = capsys.readouterr().err.strip().splitlines()
    assert checkpoint.tokenizer_size(tok) == V and not set(added.values()) & set(tok.get_vocab())
    for text in PROMPTS + ["people"]:
        assert tok(text).input_ids == ref(text).input_ids
    assert tok.decode(ref("the water").input_ids) == ref.decode(ref("the water").input_ids)
    s = summary(d)["tokenizer"]
    if type(ref).__name__ == "TokenizersBackend":  # transformers maps mistral to the files' tokenizer as is
        assert family == "mistral" and not added and not err and s == f"{V} ids"
        return
    assert added and type(ref).__name__ == fx.TOKENIZER_CLASS[family]
    assert len(err) == 1 and err[0].startswith(f"{d}: the tokenizer drops ")
    assert all(f"{t!r} (id {i})" in err[0] for i, t in added.items()) and fx.TOKENIZER_CLASS[family] in err[0]
    assert s.startswith(f"{V} ids ({V + len(added)} as transformers builds it; loading drops ")
    assert all(f"{t!r} (id {i})" in s for i, t in added.items())


@pytest.mark.parametrize("family", fx.ALL)
def test_generate_equals_transformers_greedy(family, exact, inputs, tmp_path):
    d, m = exact(family)
    rows = api.generate(d, inputs / "prompts.jsonl", tmp_path / "out.jsonl", max_new_tokens=NEW, no_stop=True)
    ref = _transformers_tokenizer(d)
    assert [r["completion"] for r in rows] == [_greedy(m, ref, p) for p in PROMPTS]
    assert any(r["completion"] for r in rows)


@pytest.mark.parametrize("family", fx.ALL)
def test_convert_round_trip(family, exact, tmp_path):
    d, m = exact(family)
    out = api.convert(d, tmp_path / "conv")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (d / f).read_bytes()
    cfg0, p0 = checkpoint.load(d, "float32")
    cfg1, p1 = checkpoint.load(out, "float32")
    assert cfg0 == cfg1
    for a, b in zip(_leaves(p0), _leaves(p1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tok = checkpoint.load_tokenizer(out)
    assert checkpoint.tokenizer_size(tok) == V
    tokens, valid = fx.left_padded_batch(1, (5, 5))
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    np.testing.assert_allclose(fx.torch_logits(back, tokens, valid), fx.torch_logits(m, tokens, valid), atol=1e-5)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.parametrize("family", BY_CLASS)
def test_finetune_exports_what_transformers_runs(family, exact, inputs, tmp_path):
    d, _ = exact(family)
    out = api.finetune(d, inputs / "pairs.jsonl", tmp_path / "ft", batch_size=4, grad_accum=1, max_length=64,
                       lr=1e-2, **SFT)
    assert (out / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    import transformers

    tokens, valid = fx.left_padded_batch(2, (6, 6))
    tuned = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    ours = _logits(out, tokens)
    np.testing.assert_allclose(ours, fx.torch_logits(tuned, tokens, valid), atol=2e-4, rtol=1e-4)
    assert not np.allclose(ours, _logits(d, tokens), atol=1e-3)  # it trained


@pytest.mark.parametrize("family", BY_CLASS)
def test_tiny_run(family, exact, inputs, tmp_path):
    d, _ = exact(family)
    gen = {"max_new_tokens": 4, "temperature": 1.0}
    res = api.run(d, inputs / "pairs.jsonl", tmp_path / "run", config="fast", iterations=1, generate=2, demos=2,
                  context_budget=200, embedder="hashing", min_words=1, batch_size=2, question_gen=gen, answer_gen=gen,
                  sft={"batch_size": 4, "grad_accum": 1, "max_length": 64, **SFT})
    assert (res.final_model / "config.json").is_file()
    assert checkpoint.tokenizer_size(checkpoint.load_tokenizer(res.final_model)) == V


# ------------------------------------------------------------------------------------------ refusals
def test_files_defining_ids_past_the_rows_refused(exact, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(exact("qwen2")[0], d)
    raw = json.loads((d / "tokenizer.json").read_text())
    raw["added_tokens"].append({"id": V, "content": "<|im_end|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=rf"^{d}: the tokenizer has {V + 2} tokens but the model's "
                                        rf"vocab_size is {V}: the tokenizer files define id {V} "
                                        r"\('<\|im_end\|>'\), past the embedding rows"):
        checkpoint.load_tokenizer(d)
    assert summary(d)["tokenizer"] == f"{V + 2} ids (MORE than vocab_size {V}: refused at load)"


def _unchecked(monkeypatch):
    """load_tokenizer as when nothing fits the tokenizer to the model (a tokenizer given in memory)."""
    orig = checkpoint.load_tokenizer
    monkeypatch.setattr(checkpoint, "load_tokenizer", lambda d, check=True: orig(d, check=False))


def test_encoded_id_past_the_rows_names_the_file_and_line(tmp_path, monkeypatch):
    d = tmp_path / "small"
    fx.make_model("llama", d, vocab_size=100)  # the fixture tokenizer has 128 ids
    word = fx.WORDS[100 - len(fx.SPECIALS)]  # id 100: past the rows
    assert checkpoint.load_tokenizer(d, check=False).convert_tokens_to_ids(word) == 100
    _unchecked(monkeypatch)
    (tmp_path / "p.jsonl").write_text(f'{{"prompt": "the water"}}\n\n{{"prompt": "the {word}"}}\n')
    with pytest.raises(UserError, match=rf"^{tmp_path / 'p.jsonl'}:3: the text encodes to id 100 \('{word}'\), "
                                        "past the model's 100 embedding rows"):
        api.generate(d, tmp_path / "p.jsonl", tmp_path / "o.jsonl", max_new_tokens=2)
    assert not (tmp_path / "o.jsonl").exists()
    rows = [{"question": "the water", "answer": "of it"}] * 3 + [{"question": "what", "answer": f"a {word}"}]
    fileio_rows(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(UserError, match=rf"^{tmp_path / 'pairs.jsonl'}:4: the text encodes to id 100"):
        api.finetune(d, tmp_path / "pairs.jsonl", tmp_path / "ft", max_length=32)
    assert not (tmp_path / "ft").exists()
    cfg = checkpoint.config_from_hf(checkpoint.read_config(d), "float32")
    tok = checkpoint.load_tokenizer(d)
    with pytest.raises(UserError, match=r"^pair 2: the text encodes to id 100"):
        batching.encode_pairs([("the water", "of it"), (word, "of it")], tok, max_length=16, cfg=cfg)
    assert len(batching.encode_pairs([("the water", "of it")], tok, max_length=16, cfg=cfg)) == 1


def test_tokenizer_of_another_model_refused(tmp_path):
    """A tokenizer whose own vocabulary is larger than the embedding rows (128 ids, 100 rows) does not belong."""
    d = tmp_path / "small"
    fx.make_model("llama", d, vocab_size=100)
    with pytest.raises(UserError, match="the tokenizer has 128 tokens but the model's vocab_size is 100") as e:
        checkpoint.load_tokenizer(d)
    assert str(d) in str(e.value) and "\n" not in str(e.value)
    assert summary(d)["tokenizer"] == "128 ids (MORE than vocab_size 100: refused at load)"
