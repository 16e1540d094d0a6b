"""SFT trainer: the schedule, the sequence loss norm, streams, loss falls, resume == uninterrupted, NaN stop, LoRA,
export reload, the `selfalign finetune` CLI, and (subprocess) an 8-device step == the 1-device step.

Every full fine-tune here uses the same TrainConfig and run length, so they share one compiled step.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures as fx
from hf_fixtures import pairs as _pairs
from selfalign_jax.core import checkpoint as C
from selfalign_jax.core import model as M
from selfalign_jax.core import batching, train
from selfalign_jax.core import mesh as MS
from selfalign_jax.core import plan as P
from selfalign_jax.core.settings import given_train_fields, pin_split
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.loaded import LoadedModel

# 24 pairs, effective batch 8: 3 steps per epoch, 6 steps in all
FULL = train.TrainConfig(lr=3e-3, batch_size=4, grad_accum=2, epochs=2, warmup_ratio=0.1, max_length=32,
                     checkpoint_every=2)
LORA = train.TrainConfig(lr=1e-2, batch_size=8, grad_accum=1, epochs=4, warmup_ratio=0.0, max_length=32,
                     lora_rank=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fx.llama_base(tmp_path_factory)


@pytest.fixture(scope="module")
def full_run(base, tmp_path_factory):
    """An uninterrupted full fine-tune with checkpoints and export."""
    path, _, tok = base
    root = tmp_path_factory.mktemp("full")
    hist = []
    trained = train.finetune(path, _pairs(), tok, root / "out", FULL, checkpoint_dir=root / "ckpt",
                             progress=False, on_step=lambda s, m: hist.append(m))
    return root, trained.cfg, jax.tree.map(np.asarray, trained.params), hist


def _maxdiff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


# ------------------------------------------------------------------------------------------ data


def test_schedule_warmup_and_cosine():
    tc = train.TrainConfig(lr=1.0, warmup_ratio=0.1)
    f = train.lr_schedule(tc, 100)
    assert train.warmup_steps(tc, 100) == 10
    np.testing.assert_allclose([float(f(s)) for s in (0, 5, 10, 55, 100)], [0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_warmup_is_floor_as_the_authors():
    """safe-rlhf: num_warmup_steps = int(0.03 * total): a 2-step SFT (64 seeds, batch 32) has no warm-up, so its
    updates run at (1.0, 0.5) x peak under cosine (ceil would give (0, 1.0): a wasted lr-0 first step)."""
    tc = train.TrainConfig(lr=2.0, warmup_ratio=0.03)
    assert [train.warmup_steps(tc, n) for n in (2, 12, 33, 34, 100, 101)] == [0, 0, 0, 1, 3, 3]
    f = train.lr_schedule(tc, 2)
    np.testing.assert_allclose([float(f(s)) for s in (0, 1)], [2.0, 1.0], atol=1e-6)
    f = train.lr_schedule(tc, 100)  # 3 warm-up steps, then cosine over the other 97
    np.testing.assert_allclose([float(f(s)) for s in (0, 1, 3)], [0.0, 2 / 3, 2.0], atol=1e-6)
    assert float(f(50)) == pytest.approx(1.0 + np.cos(np.pi * 47 / 97), abs=1e-5)


@pytest.mark.parametrize("streams", [1, 2])
def test_sequence_loss_norm_equals_direct_computation(base, streams):
    """loss_norm="sequence" (safe-rlhf): per row sum(w * nll) / (micro-batch padded length), mean over the micro-batch's
    rows, mean over micro-batches; checked (loss and gradient norm) against a direct computation on plain logits,
    with 11 examples in 2 x 6 rows (one empty row) and both stream counts."""
    path, _, tok = base
    cfg, params = C.load(path, dtype="float32")
    enc = batching.encode_pairs(_pairs(11, seed=4), tok, max_length=32)
    batch = batching.make_batch(enc, np.arange(11), 2, 6, 32, bucket=8)
    tc = train.TrainConfig(lr=1e-3, batch_size=6, grad_accum=2, max_length=32, warmup_ratio=0.0, streams=streams,
                           loss_norm="sequence")

    def direct(p):
        per_mb = []
        for a in range(2):
            mb = jax.tree.map(lambda x: x[a], batch)
            h = M.apply(p, cfg, mb["tokens"], mb["pos"])[0]
            lg = M.logits(p, cfg, h)
            nll = jax.nn.logsumexp(lg, -1) - jax.numpy.take_along_axis(lg, mb["targets"][..., None], -1)[..., 0]
            n = (mb["pos"] >= 0).sum(-1)
            rows = [(nll[r] * mb["weights"][r]).sum() / n.max() for r in range(6) if n[r] > 0]
            per_mb.append(sum(rows) / len(rows))
        return sum(per_mb) / 2

    want, g = jax.value_and_grad(direct)(params)
    tr = train.Trainer(cfg, tc, total_steps=4)
    state, frozen = tr.init_state(params)
    _, m = tr.step(state, frozen, batch)
    assert float(m["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(m["grad_norm"]) == pytest.approx(float(np.sqrt(sum((np.asarray(x) ** 2).sum()
                                                                    for x in jax.tree.leaves(g)))), rel=1e-4)
    tok_mean = train.Trainer(cfg, dataclasses.replace(tc, loss_norm="token"), total_steps=4)
    st2, fr2 = tok_mean.init_state(params)
    assert abs(float(tok_mean.step(st2, fr2, batch)[1]["loss"]) - float(want)) > 1e-3  # the two norms differ


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_step_equals_unpacked_step(tmp_path, family):
    """One optimizer step on a packed batch == on the same examples one per row: loss, gradient norm and the
    updated parameters (gemma2: sliding window and soft-caps inside packed rows)."""
    fx.make_model(family, tmp_path)
    cfg, params = C.load(tmp_path, dtype="float32")
    tok = C.load_tokenizer(tmp_path)
    enc = batching.encode_pairs(_pairs(14, seed=7), tok, max_length=32)
    tc = train.TrainConfig(lr=1e-3, batch_size=4, grad_accum=4, max_length=32, warmup_ratio=0.0)
    out = []
    for pack in (False, True):
        batch = batching.make_batch(enc, np.arange(14), 4, 4, 64, bucket=8, pack=pack)
        tr = train.Trainer(cfg, tc, total_steps=4)
        state, frozen = tr.init_state(jax.tree.map(np.array, params))
        state, m = tr.step(state, frozen, batch)
        out.append((batch["tokens"].shape, {k: float(v) for k, v in m.items()}, jax.tree.map(np.asarray, state.params)))
    (s0, m0, p0), (s1, m1, p1) = out
    assert s1[0] * s1[2] < s0[0] * s0[2], (s0, s1)  # fewer padded tokens per row slot
    assert m1["tokens"] == m0["tokens"] and m1["inputs"] == m0["inputs"]
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-4)
    assert _maxdiff(p0, p1) < 1e-4  # summation order; a flipped Adam sign would move a weight by 2 lr = 2e-3


# ------------------------------------------------------------------------------------ memory fit
def _one_step(cfg, params, enc, tc):
    state, frozen, trainer, hist = train.train(cfg, jax.tree.map(np.array, params), enc, tc, progress=False,
                                               stop_after=1)
    return trainer, hist[0], jax.tree.map(np.asarray, state.params)


def test_micro_batch_split_gives_the_same_step(base):
    """16 packed rows as 16 x 1 and as 4 x 4 (and auto_fit's choice on a CPU, 4 x 4): the same loss, gradient
    norm, tokens and parameters after a step (fp32, up to summation order)."""
    path, _, tok = base
    cfg, params = C.load(path, dtype="float32")
    enc = batching.encode_pairs(_pairs(40, seed=5), tok, max_length=32)
    tc = train.TrainConfig(lr=1e-3, batch_size=16, grad_accum=1, max_length=32, warmup_ratio=0.0, bucket=8,
                           auto_fit=False)
    runs = {name: _one_step(cfg, params, enc, t) for name, t in (
        ("16x1", tc), ("4x4", dataclasses.replace(tc, batch_size=4, grad_accum=4)),
        ("auto", dataclasses.replace(tc, auto_fit=True)))}
    assert (runs["auto"][0].micro_rows, runs["auto"][0].tcfg.grad_accum) == (train.CPU_MICRO_ROWS, 16 // 4)
    # on a CPU: remat, and the backward scan adds the layers' gradient into the running sum (model._scan_into)
    assert runs["auto"][0].tcfg.remat and runs["auto"][0].fns.into and not runs["4x4"][0].fns.into
    ref = runs["16x1"][1]
    for name in ("4x4", "auto"):
        _, m, p = runs[name]
        assert m["tokens"] == ref["tokens"] and m["inputs"] == ref["inputs"]
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert _maxdiff(p, runs["16x1"][2]) < 1e-5
    # a different split of the examples (another effective batch) does change the step
    other = _one_step(cfg, params, enc, dataclasses.replace(tc, batch_size=8))[1]
    assert abs(other["loss"] - ref["loss"]) > 1e-4


@pytest.mark.parametrize("tc", [dataclasses.replace(FULL, remat=True, auto_fit=False), LORA], ids=["full", "lora"])
def test_compile_before_the_state_leaves_the_step_nothing_to_compile(base, tc, caplog):
    """Trainer.compile (abstract inputs, before any state exists, as train() runs it) compiles what the first step
    calls: the step itself then compiles nothing, where without it the step compiles its functions."""
    path, _, tok = base
    cfg, params = C.load(path, dtype="float32")
    enc = batching.encode_pairs(_pairs(), tok, max_length=32)
    batch = batching.make_batch(enc, batching.plan_epoch(enc.lengths, tc.effective_batch, 0, 0)[0], tc.grad_accum,
                                tc.batch_size, tc.max_length, tc.bucket)

    def compiles_in_step(precompile: bool) -> list[str]:
        # a weight decay of this test's own: a step no other test has compiled, no cache cleared
        trainer = train.Trainer(cfg, dataclasses.replace(tc, weight_decay=1e-3 * (3 + precompile)), total_steps=2)
        if precompile:
            trainer.compile([batch, batch])
        state, frozen = trainer.init_state(jax.tree.map(np.array, params))
        caplog.clear()
        with jax.log_compiles():
            state, m = trainer.step(state, frozen, batch)
            jax.block_until_ready(m)
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]

    assert compiles_in_step(True) == []
    assert len(compiles_in_step(False)) >= 2  # the gradient and the update


def test_fit_memory_splits_to_the_budget_and_keeps_what_is_pinned(base):
    path, _, _ = base
    cfg, _ = C.load(path, dtype="float32")
    mesh = MS.make_mesh(None)
    tc = train.TrainConfig(batch_size=4, grad_accum=2, max_length=32)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    need = {b: P.train_bytes(cfg, P.TrainSettings(batch_size=b, max_length=32, dtype="float32", grad_accum=8 // b,
                                                  remat=True), sizes)["total"] for b in (4, 2, 1)}  # a CPU: remat on
    assert need[4] > need[2] > need[1]
    budget = (need[2] + need[4]) / 2 / P.HEADROOM / P.GIB  # 2 rows fit, 4 do not
    got, line = train.fit_memory(cfg, dataclasses.replace(tc, memory_gib=budget), mesh)
    assert (got.batch_size, got.grad_accum, got.remat) == (2, 4, True)
    assert "micro-batch 2 x 4 (of 4 x 2, effective batch 8), remat on" in line and "--memory-gib" in line
    got, line = train.fit_memory(cfg, dataclasses.replace(tc, memory_gib=1e-6), mesh)  # nothing fits
    assert (got.batch_size, got.grad_accum) == (1, 8) and "does not fit" in line
    seq = dataclasses.replace(tc, memory_gib=budget, loss_norm="sequence")  # the split is part of that loss
    assert train.fit_memory(cfg, seq, mesh)[0].batch_size == 4
    assert train.fit_memory(cfg, dataclasses.replace(tc, memory_gib=budget, auto_fit=False), mesh) == (
        dataclasses.replace(tc, memory_gib=budget, auto_fit=False), None)
    assert not pin_split(tc, {"grad_accum"}).auto_fit and pin_split(tc, {"lr"}).auto_fit


def test_command_line_flags_pin_the_split():
    """`finetune --batch-size 4` / `run --sft.grad-accum 2` / `--no-remat` name fields auto_fit leaves alone; `run
    --batch-size` is the generation batch, not the trainer's."""
    assert given_train_fields(["finetune", "--batch-size", "4", "--lr=1e-3", "--no-remat"]) == {"batch_size", "lr",
                                                                                               "remat"}
    assert given_train_fields(["run", "--sft.grad-accum", "2", "--batch-size", "8"], "sft.") == {"grad_accum"}
    assert given_train_fields(None) == set()
    tc = train.TrainConfig()
    assert not pin_split(tc, given_train_fields(["--sft.remat"], "sft.")).auto_fit
    assert pin_split(tc, given_train_fields(["--sft.lr", "1e-4"], "sft.")).auto_fit


# ------------------------------------------------------------------------------------------ loss


def test_remat_shrinks_the_scanned_steps_temporaries():
    """The train state holds the layers stacked (the step scans one layer), and remat cuts the compiled step's
    temporaries (XLA's memory_analysis, no run) to a fraction: the backward recomputes one layer at a time and
    adds its gradient into the running sum."""
    cfg = M.Config(family="llama", vocab_size=256, hidden=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                   intermediate=384, max_pos=512)
    temps = {}
    for remat in (False, True):
        tr = train.Trainer(cfg, train.TrainConfig(batch_size=4, grad_accum=2, max_length=256, remat=remat,
                                                  auto_fit=False), total_steps=1)
        assert isinstance(tr.fns.train_abstract.layers, M.Layer) and tr.fns.into == remat
        assert tr.fns.train_abstract.layers.q.shape == (4, 128, 128)
        mb = {k: jax.ShapeDtypeStruct((4, 256), jnp.float32 if k == "weights" else jnp.int32) for k in train.BATCH_KEYS}
        acc = (jax.ShapeDtypeStruct((), jnp.float32), tr.fns.train_abstract)
        temps[remat] = tr.fns.accum.lower(tr.fns.train_abstract, None, mb, acc).compile().memory_analysis() \
            .temp_size_in_bytes
    assert temps[True] < 0.4 * temps[False], temps


def test_streams_split_the_batch_without_changing_the_step(base):
    """streams = independent row slices of a micro-batch in one graph: the same step."""
    path, _, tok = base
    cfg, params = C.load(path, dtype="float32")
    enc = batching.encode_pairs(_pairs(16), tok, max_length=32)
    tc = train.TrainConfig(lr=1e-3, batch_size=8, grad_accum=2, max_length=32, warmup_ratio=0.0)
    batch = batching.make_batch(enc, np.arange(16), 2, 8, 32)
    out = {}
    for n in (1, 2, 4):
        tr = train.Trainer(cfg, dataclasses.replace(tc, streams=n), total_steps=4)
        state, frozen = tr.init_state(params)
        state, m = tr.step(state, frozen, batch)
        out[tr.streams] = (float(m["loss"]), float(m["grad_norm"]), jax.tree.map(np.asarray, state.params))
    assert sorted(out) == [1, 2, 4]
    for n in (2, 4):
        assert abs(out[n][0] - out[1][0]) < 1e-5 * abs(out[1][0])
        assert abs(out[n][1] - out[1][1]) < 1e-5 * abs(out[1][1])
        assert _maxdiff(out[n][2], out[1][2]) < 1e-5  # Adam's first step is ~lr * sign(g): 1e-3 here
    with pytest.raises(UserError, match="streams 3 must divide"):
        train.Trainer(cfg, dataclasses.replace(tc, streams=3), total_steps=4)


# ---------------------------------------------------------------------------------- full fine-tune
def test_loss_falls_and_export_reloads_in_transformers(full_run, base):
    import torch
    import transformers

    root, cfg, params, hist = full_run
    assert len(hist) == 6 and all(np.isfinite(m["loss"]) for m in hist)
    assert np.mean([m["loss"] for m in hist[3:]]) < np.mean([m["loss"] for m in hist[:3]]) - 0.3, \
        [m["loss"] for m in hist]
    # floor(0.1 * 6) = 0 warm-up steps (the authors' rule): cosine from the peak
    assert hist[0]["lr"] == pytest.approx(3e-3) and all(a["lr"] > b["lr"] for a, b in zip(hist, hist[1:]))
    out = root / "out"
    summary = json.loads((out / "selfalign_train.json").read_text())
    assert summary["steps"] == 6 and len(summary["history"]) == 6
    m = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    tokens, valid = fx.left_padded_batch(seed=4, lengths=(9, 5))
    ref = fx.torch_logits(m, tokens, valid)
    ours = np.asarray(jax.jit(M.forward, static_argnums=1)(params, cfg, tokens, M.positions(valid)))
    assert np.abs(ours - ref)[valid].max() < 1e-4
    base_logits = fx.torch_logits(base[1], tokens, valid)
    assert np.abs(base_logits - ref)[valid].max() > 1e-2  # training changed the model
    assert C.load_tokenizer(out)("the a")["input_ids"] == base[2]("the a")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor(tokens, dtype=torch.long)).logits).all()


def test_resume_equals_uninterrupted(full_run, base, tmp_path):
    path, _, tok = base
    _, cfg, final, _ = full_run
    enc = batching.encode_pairs(_pairs(), tok, max_length=FULL.max_length)
    cfg0, params0 = C.load(path, dtype="float32")
    # "crash" after step 3: the checkpoint at step 2 survives
    train.train(cfg0, params0, enc, FULL, checkpoint_dir=tmp_path / "ck", progress=False, stop_after=3)
    assert sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == [2]
    seen = []
    state, frozen, trainer, hist = train.train(cfg0, None, enc, FULL, checkpoint_dir=tmp_path / "ck", progress=False,
                                           on_step=lambda s, m: seen.append(s),
                                           params_loader=lambda sh, dt: pytest.fail("full resume must not reload"))
    assert seen == [3, 4, 5, 6]
    assert _maxdiff(trainer.merged(state, frozen), final) == 0.0
    # a different data set does not resume silently
    enc2 = batching.encode_pairs(_pairs(seed=9), tok, max_length=FULL.max_length)
    with pytest.raises(UserError, match="different run"):
        train.train(cfg0, params0, enc2, FULL, checkpoint_dir=tmp_path / "ck", progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(base, tmp_path):
    path, _, tok = base
    cfg, params = C.load(path, dtype="float32")
    pairs = _pairs()
    enc = batching.encode_pairs(pairs, tok, max_length=FULL.max_length)
    plan = batching.plan_epoch(enc.lengths, FULL.effective_batch, FULL.seed, 0)
    bad = int(plan[2][0])  # an example of the third step gets a word nobody else uses ...
    rare = fx.WORDS[110]
    assert all(rare not in (q + " " + a).split() for q, a in pairs)
    q, a = pairs[bad]
    pairs[bad] = (q, " ".join([rare] + a.split()[1:]))
    rid = tok.convert_tokens_to_ids(rare)
    params = jax.tree.map(np.asarray, params)
    params.embed = params.embed.copy()
    params.embed[rid] = np.nan  # ... whose embedding is NaN: step 3's loss is NaN
    ck = tmp_path / "ck"
    with pytest.raises(train.TrainingDiverged, match=r"step 3 of 6.*last good checkpoint: .*ck/2"):
        train.finetune(LoadedModel(cfg, params, tok), pairs, tok, tmp_path / "out", FULL, checkpoint_dir=ck,
                       progress=False)
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [2]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_merge_is_exact(base, tmp_path):
    import transformers

    path, _, tok = base
    cfg, params = C.load(path, dtype="float32")
    host = jax.tree.map(np.asarray, params)
    enc = batching.encode_pairs(_pairs(16, seed=2), tok, max_length=LORA.max_length)
    state, frozen, trainer, hist = train.train(cfg, params, enc, LORA, progress=False)
    losses = [m["loss"] for m in hist]
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses
    # the trainable state is the adapters only, on every attention and MLP projection
    assert isinstance(state.params, list) and len(state.params) == cfg.n_layers
    assert set(state.params[0]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(np.abs(np.asarray(d["b"])).max() > 0 for d in state.params[0].values())
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_adapter < 0.5 * M.num_params(params)
    assert _maxdiff(frozen, host) == 0.0  # the base is untouched
    # interrupted + resumed (adapters and Adam state from the checkpoint, base reloaded) == uninterrupted
    lc = dataclasses.replace(LORA, checkpoint_every=2)
    train.train(cfg, params, enc, lc, checkpoint_dir=tmp_path / "ck", progress=False, stop_after=5)
    st2, fr2, _, h2 = train.train(cfg, None, enc, lc, checkpoint_dir=tmp_path / "ck", progress=False,
                              params_loader=lambda sh, dt: C.load(path, dtype=dt, shardings=sh)[1])
    assert [m["step"] for m in h2] == [5, 6, 7, 8]
    assert _maxdiff(st2.params, state.params) == 0.0
    # merged model == adapter model
    tokens, valid = fx.left_padded_batch(seed=6, lengths=(10, 6))
    pos = M.positions(valid)
    fwd = jax.jit(lambda a, f: M.forward(trainer.model_params(a, f), trainer.compute_cfg, tokens, pos))
    adapter_logits = np.asarray(fwd(state.params, frozen))
    merged = trainer.merged(state, frozen)
    merged_logits = np.asarray(jax.jit(M.forward, static_argnums=1)(merged, cfg, tokens, pos))
    assert np.abs(adapter_logits - merged_logits)[valid].max() < 1e-5
    assert np.abs(merged_logits - np.asarray(M.forward(params, cfg, tokens, pos)))[valid].max() > 1e-3
    # export: transformers loads the merged weights
    train.export(tmp_path / "out", cfg, merged, tokenizer_from=path)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
    assert np.abs(fx.torch_logits(m, tokens, valid) - merged_logits)[valid].max() < 1e-4


# -------------------------------------------------------------------------------------------- CLI
def test_cli_finetune(base, full_run, tmp_path, capsys):
    from selfalign_jax import cli

    path, _, _ = base
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in _pairs()))
    out = tmp_path / "out"
    args = ["finetune", "--model", str(path), "--data", str(data), "--out", str(out), "--lr", "3e-3",
            "--epochs", "2", "--batch-size", "4", "--grad-accum", "2", "--max-length", "32", "--warmup-ratio", "0.1",
            "--checkpoint-every", "0", "--dtype", "float32", "--remat"]  # as the fixture runs on a CPU
    cli.main(args)
    assert "wrote" in capsys.readouterr().out
    cfg, params = C.load(out, dtype="float32")
    assert _maxdiff(params, full_run[2]) < 1e-6  # same recipe as the full_run fixture
    assert (tmp_path / "out.ckpt").is_dir()
    with pytest.raises(SystemExit) as e:  # existing --out
        cli.main(args)
    assert e.value.code == 2
    assert "not empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ multi-device
def test_eight_device_step_equals_single_device(base):
    """fsdp=4 x tensor=2 and data=8 (and grad accumulation 2 x 8 vs one batch of 16, and LoRA on
    fsdp x tensor): parameters after one step equal the single-device step within 1e-5."""
    path, _, _ = base
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
    helper = Path(__file__).with_name("_multidevice_step.py")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(helper), str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for k, d in res["diff"].items():
        assert d < 1e-5, (k, d)
    assert res["moved"]["full"] > 1e-4 and res["moved"]["lora"] > 1e-4  # the step did something
    losses = list(res["loss"].values())
    assert max(losses) - min(losses) < 1e-5
    assert res["sharding"]["full fsdp=4,tensor=2"] == ["P(None, 'tensor', 'fsdp')"] * 2  # params and Adam moments
