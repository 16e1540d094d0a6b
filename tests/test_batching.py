"""Training batches (core/batching.py): answer and EOS masking, truncation, epoch plans and their composition,
packing several examples per row, the pairs file's errors."""

import numpy as np
import pytest

import hf_fixtures as fx
from selfalign_jax.app.data import read_pairs
from selfalign_jax.core import batching
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.template import Template
from hf_fixtures import pairs as _pairs


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fx.llama_base(tmp_path_factory)


def test_encode_marks_answer_and_eos_only(base):
    _, _, tok = base
    pairs = [("you that he", "was for on are"), ("the a of", "to and in is it")]
    enc = batching.encode_pairs(pairs, tok, max_length=64)
    for (q, a), ids, t in zip(pairs, enc.ids, enc.loss_mask):
        assert ids[0] == 1 and ids[-1] == 2  # BOS ... EOS
        assert tok.convert_ids_to_tokens(ids[t].tolist()) == a.split() + ["</s>"]
        prompt, _ = Template().train_pair(q, a)
        assert len(ids) - t.sum() == len(tok(prompt)["input_ids"])


def test_truncation_and_dropped_examples(base):
    _, _, tok = base
    long = ("the a of", " ".join(["water"] * 40))
    enc = batching.encode_pairs([long, (" ".join(["people"] * 40), "it is")], tok, max_length=16)
    assert enc.truncated == 2 and enc.dropped == 1 and len(enc) == 1
    assert len(enc.ids[0]) == 17 and enc.loss_mask[0][-1]  # the cut answer keeps its weights


def test_load_pairs_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "q1", "answer": "a1"}\n\n{"question": "q2"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:3: missing field 'answer'"):
        read_pairs(p)
    p.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2", "answer": ""}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: field 'answer' is empty"):
        read_pairs(p)
    p.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2", "answer": "a2"\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: malformed JSON"):
        read_pairs(p)
    p.write_text('{"question": "q1", "answer": "a1"}\n')
    assert read_pairs(p) == [("q1", "a1")]


def test_plan_and_batches(base):
    _, _, tok = base
    enc = batching.encode_pairs(_pairs(40), tok, max_length=32)
    p0 = batching.plan_epoch(enc.lengths, 8, seed=3, epoch=0)
    assert [x.tolist() for x in p0] == [x.tolist() for x in batching.plan_epoch(enc.lengths, 8, seed=3, epoch=0)]
    assert sorted(np.concatenate(p0).tolist()) == list(range(40)) and len(p0) == 5
    p1 = batching.plan_epoch(enc.lengths, 8, seed=3, epoch=1)
    assert [x.tolist() for x in p1] != [x.tolist() for x in p0]
    b = batching.make_batch(enc, p0[0][:7], 2, 4, 32, bucket=16)  # 7 examples in 2 x 4 rows: one empty row
    assert b["tokens"].shape == (2, 4, batching.bucket_len(max(enc.lengths[p0[0][:7]]), 16, 32))
    assert int((b["pos"][..., 0] == 0).sum()) == 7
    assert b["weights"].sum() == sum(enc.loss_mask[i][1:].sum() for i in p0[0][:7])
    # every filled row is one example: inputs, next-token targets, weights on answer tokens only
    for a in range(2):
        for r in range(4):
            n = int((b["pos"][a, r] >= 0).sum())
            if n == 0:
                continue
            i = next(i for i in p0[0][:7] if len(enc.ids[i]) == n + 1
                     and (enc.ids[i][:-1] == b["tokens"][a, r, :n]).all())
            np.testing.assert_array_equal(b["pos"][a, r, :n], np.arange(n))
            np.testing.assert_array_equal(b["targets"][a, r, :n], enc.ids[i][1:])
            np.testing.assert_array_equal(b["weights"][a, r, :n], enc.loss_mask[i][1:])
            assert b["weights"][a, r, n:].sum() == 0


def test_plan_epoch_random_composition_and_opt_in_grouping():
    """Default: uniformly random rows per step (seeds and generated pairs mix); group_lengths: length-sorted steps."""
    lengths = np.array([10] * 64 + [100] * 64)
    rand = batching.plan_epoch(lengths, 32, seed=1, epoch=0)
    grouped = batching.plan_epoch(lengths, 32, seed=1, epoch=0, group_lengths=True)
    for plan in (rand, grouped):
        assert sorted(np.concatenate(plan).tolist()) == list(range(128)) and len(plan) == 4
    assert all(len(set(lengths[b])) == 1 for b in grouped)
    long_per_step = [int((lengths[b] == 100).sum()) for b in rand]
    assert all(5 < n < 27 for n in long_per_step), long_per_step  # binomial(32, 1/2) mixes, p(fail) < 1e-3
    assert [x.tolist() for x in rand] == [x.tolist() for x in batching.plan_epoch(lengths, 32, seed=1, epoch=0)]


def test_pack_rows_places_every_example_once_with_less_padding(base):
    """Packing: each example in exactly one row, whole; rows within T; positions restart at 0 per example; the
    same tokens, targets and weights as the unpacked batch; fewer padded tokens."""
    _, _, tok = base
    enc = batching.encode_pairs(_pairs(24, seed=6), tok, max_length=32)
    idx = list(range(3, 19))
    plain = batching.make_batch(enc, idx, 4, 4, 64, bucket=8)
    packed = batching.make_batch(enc, idx, 4, 4, 64, bucket=8, pack=True)
    assert packed["tokens"].size < plain["tokens"].size
    got, want = [], []
    for b in (plain, packed):
        pos, out = b["pos"].reshape(-1, b["pos"].shape[-1]), []
        for r in range(pos.shape[0]):
            starts = list(np.flatnonzero(pos[r] == 0)) + [int((pos[r] >= 0).sum())]
            for a, e in zip(starts, starts[1:]):
                assert (pos[r, a:e] == np.arange(e - a)).all()
                out.append(tuple(repr(b[k].reshape(pos.shape)[r, a:e].tolist())
                                 for k in ("tokens", "targets", "weights")))
        (want if b is plain else got).append(sorted(out))
    assert got == want and len(got[0]) == len(idx)
