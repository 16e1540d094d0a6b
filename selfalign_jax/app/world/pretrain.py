"""The world's tiny base model: pretrain a small Llama on the synthetic corpus, on CPU, and cache it.

`pretrain(out_dir, seed)` generates the world corpus, trains the byte-level BPE tokenizer, builds a tiny
Llama with `selfalign_jax.core.model`, trains it with a next-token loss on whole documents packed into rows
(each row starts with a document; a document is `<s> text </s>`, never split; the rest of a row is
padding), and saves a standard Hugging Face directory (config.json, model.safetensors, tokenizer files,
generation_config.json) plus `selfalign_world.json` (the cache key, settings and training record).

`ensure_base_model(cache_dir, seed)` returns `<cache_dir>/world-base-<key>` if it already holds a model
with the same key (a hash of the world's source, the settings and the seed); otherwise it pretrains into
a temporary directory next to it and renames it into place (a file lock keeps concurrent callers from
training twice). The default cache is `$SELFALIGN_CACHE` or `~/.cache/selfalign-jax`.

`decode` is a small greedy/temperature sampler (jitted prefill + cached decode loop) used by the
learnability probe and the tests; the pipeline uses `selfalign_jax.core.generate`.

Why its own loop and sampler, not `train.Trainer` and `sampling`: pretraining is next-token loss on every
token of rows of whole documents from random init, a loss and data layout the SFT trainer (answer-token
loss on (question, answer) pairs, HF export, resumable Orbax state) does not have; and `decode` works on
the raw `tokenizers.Tokenizer` pretraining builds (before any HF directory exists), which
`core.generate.generate` (text through a transformers tokenizer) does not take. Folding either in would add
modes to the trainer and the sampler that only this synthetic world uses.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from selfalign_jax.core import checkpoint, fileio
from selfalign_jax.core import model as M
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.template import MARKERS, cut
from selfalign_jax.app.world import corpus
from selfalign_jax.app.world.tokenizer import save_tokenizer, train_tokenizer

PRETRAIN_VERSION = 1
META = "selfalign_world.json"
_WORLD_SOURCES = ("language.py", "corpus.py", "tokenizer.py", "pretrain.py")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines the base model (with the seed and the world's source)."""

    # corpus
    n_docs: int = 6000
    aligned_frac: float = 0.2
    focus: float = 0.8  # share of single-topic documents: teaches "continue the demonstrations' topic"
    aside_prob: float = 0.6  # share of answers naming an object of their topic: held-out ones too, so a
    # model knows which topic a held-out object belongs to (at 0.3 aligned models refused unseen cooking objects)
    min_conv: int = 3
    max_conv: int = 6
    tokenizer_docs: int = 2000
    # model (llama)
    hidden: int = 128
    n_layers: int = 3
    n_heads: int = 4
    intermediate: int = 384
    max_pos: int = 2048
    # training
    seq_len: int = 512
    batch: int = 8  # rows of seq_len tokens (~2 documents each)
    steps: int = 400
    lr: float = 3e-3
    warmup: float = 0.05
    final_lr_frac: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    init_std: float = 0.02

    def to_dict(self):
        return dataclasses.asdict(self)


DEFAULT = Settings()
# A few-second version for tests.
MICRO = Settings(n_docs=120, tokenizer_docs=120, hidden=32, n_layers=1, n_heads=2, intermediate=64,
                 seq_len=384, batch=4, steps=12, lr=3e-3)

calls = {"pretrain": 0}  # how often pretrain() ran in this process (tests check cache reuse)


# ------------------------------------------------------------------------------------------- cache
def world_fingerprint() -> str:
    """Hash of the world's source files (a change of the language/corpus/tokenizer/trainer retrains)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _WORLD_SOURCES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()


def cache_key(seed: int = 0, settings: Settings = DEFAULT) -> str:
    blob = json.dumps({"version": PRETRAIN_VERSION, "seed": int(seed), "settings": settings.to_dict(),
                       "world": world_fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_meta(model_dir) -> dict | None:
    p = Path(model_dir) / META
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _valid(model_dir: Path, key: str) -> bool:
    m = read_meta(model_dir)
    return bool(m) and m.get("key") == key and (model_dir / "model.safetensors").is_file() \
        and (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_base_model(cache_dir=None, seed: int = 0, settings: Settings = DEFAULT, progress: bool = True,
                      log=print) -> Path:
    """The cached base model directory for (seed, settings), pretraining it first if needed."""
    cache = Path(cache_dir) if cache_dir is not None else fileio.default_cache_dir()
    key = cache_key(seed, settings)
    out = cache / f"world-base-{key}"
    if _valid(out, key):
        return out
    with _lock(cache / f".world-base-{key}.lock"):
        if _valid(out, key):  # another process finished it while we waited
            return out
        if log:
            log(f"pretraining the world base model into {out} (one time; cached afterwards)")
        with fileio.atomic(out, directory=True) as tmp:
            pretrain(tmp, seed=seed, settings=settings, progress=progress, key=key, log=log)
    return out


# -------------------------------------------------------------------------------------------- data
def model_config(settings: Settings, vocab_size: int) -> M.Config:
    s = settings
    if s.hidden % s.n_heads:
        raise UserError(f"hidden {s.hidden} is not a multiple of n_heads {s.n_heads}")
    return M.Config(family="llama", vocab_size=vocab_size, hidden=s.hidden, n_layers=s.n_layers,
                    n_heads=s.n_heads, n_kv_heads=s.n_heads, head_dim=s.hidden // s.n_heads,
                    intermediate=s.intermediate, max_pos=s.max_pos, norm_eps=1e-5, bos_id=1, eos_ids=(2,),
                    pad_id=0)


def pack(docs_ids, seq_len: int, pad_id: int = 0) -> np.ndarray:
    """Whole documents (token id lists, each already `<s> ... </s>`) packed best-fit into rows of
    `seq_len` (a document goes to the fullest row it still fits in, rows keep the documents' order);
    a document longer than a row is truncated. Returns int32 [rows, seq_len], padded with `pad_id`."""
    rows, free = [], []  # free: sorted (remaining, row index)
    for ids in docs_ids:
        ids = list(ids)[:seq_len]
        j = bisect.bisect_left(free, (len(ids), -1))
        if j < len(free):
            rem, r = free.pop(j)
        else:
            rem, r = seq_len, len(rows)
            rows.append([])
        rows[r] += ids
        if rem - len(ids) > 0:
            bisect.insort(free, (rem - len(ids), r))
    out = np.full((len(rows), seq_len), pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def build_data(seed: int, settings: Settings):
    """(tokenizers.Tokenizer, packed rows int32 [R, seq_len], corpus stats)."""

    s = settings
    docs = corpus.pretraining_documents(s.n_docs, seed=seed, aligned_frac=s.aligned_frac, focus=s.focus,
                                   min_conv=s.min_conv, max_conv=s.max_conv, aside_prob=s.aside_prob)
    texts = [d["text"] for d in docs]
    tok = train_tokenizer(texts[: s.tokenizer_docs])
    eos = tok.token_to_id("</s>")
    ids = [e.ids + [eos] for e in tok.encode_batch(texts)]
    rows = pack(ids, s.seq_len, tok.token_to_id("<pad>"))
    lens = [len(i) for i in ids]
    stats = {"documents": len(docs), "rows": int(rows.shape[0]), "tokens": int(sum(lens)),
             "mean_doc_tokens": float(np.mean(lens)), "max_doc_tokens": int(max(lens)),
             "truncated_docs": int(sum(n > s.seq_len for n in lens)),
             "fill": float((rows != 0).mean()), "aligned_share": float(np.mean([d["persona"] == "aligned"
                                                                                for d in docs]))}
    return tok, rows, stats


# ---------------------------------------------------------------------------------------- training
def lm_loss(params, cfg: M.Config, rows_BxT):
    """Mean next-token cross-entropy over non-padding targets (pad id = cfg.pad_id)."""
    valid = rows_BxT != cfg.pad_id
    pos = M.positions(valid)
    logits = M.forward(params, cfg, rows_BxT[:, :-1], pos[:, :-1])
    tgt = rows_BxT[:, 1:]
    m = (valid[:, 1:] & valid[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)


def make_optimizer(settings: Settings, steps: int):
    s = settings
    warm = max(1, int(round(s.warmup * steps)))
    sched = optax.warmup_cosine_decay_schedule(0.0, s.lr, warm, max(steps, warm + 1), s.lr * s.final_lr_frac)
    return optax.chain(optax.clip_by_global_norm(s.clip),
                       optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=s.weight_decay))


def train(cfg: M.Config, params, rows: np.ndarray, settings: Settings, seed: int = 0, progress: bool = True):
    """AdamW on shuffled packed rows for settings.steps steps; returns (params, losses list)."""
    s = settings
    opt = make_optimizer(s, s.steps)
    params = jax.tree.map(jnp.copy, params)  # the step donates its inputs; keep the caller's arrays
    opt_state = opt.init(params)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, g = jax.value_and_grad(lm_loss)(params, cfg, batch)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    rng = np.random.default_rng([seed, 11])
    order = np.empty(0, np.int64)
    losses = []
    bar = tqdm(range(s.steps), desc="pretrain", disable=not progress, mininterval=1.0)
    pending = []
    for i in bar:
        if len(order) < s.batch:
            order = np.concatenate([order, rng.permutation(len(rows))])
        idx, order = order[: s.batch], order[s.batch:]
        params, opt_state, loss = step(params, opt_state, jnp.asarray(rows[idx]))
        pending.append(loss)
        if len(pending) >= 10 or i == s.steps - 1:
            vals = [float(x) for x in pending]
            losses += vals
            pending = []
            bar.set_postfix(loss=f"{vals[-1]:.3f}")
    return params, losses


def pretrain(out_dir, seed: int = 0, settings: Settings = DEFAULT, progress: bool = True, key: str | None = None,
             log=None) -> Path:
    """Pretrain the world base model from scratch and save it as an HF directory at `out_dir`."""
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise UserError(f"output directory exists and is not empty: {out_dir}")
    calls["pretrain"] += 1
    t0, c0 = time.time(), time.process_time()
    tok, rows, stats = build_data(seed, settings)
    t_data = time.time() - t0
    cfg = model_config(settings, tok.get_vocab_size())
    params = M.init_params(cfg, jax.random.PRNGKey(seed), std=settings.init_std)
    t1 = time.time()
    params, losses = train(cfg, params, rows, settings, seed=seed, progress=progress)
    jax.block_until_ready(params)
    t_train = time.time() - t1
    with tempfile.TemporaryDirectory() as td:
        save_tokenizer(tok, td)
        out = checkpoint.save(out_dir, cfg, params, tokenizer_from=td, dtype="float32")
    k = 10 if len(losses) >= 20 else 1
    meta = {"key": key or cache_key(seed, settings), "seed": int(seed), "settings": settings.to_dict(),
            "version": PRETRAIN_VERSION, "corpus": stats, "params": M.num_params(params),
            "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
            "losses": [round(x, 4) for x in losses], "seconds": {"data": round(t_data, 2),
                                                                 "train": round(t_train, 2),
                                                                 "total": round(time.time() - t0, 2),
                                                                 "cpu": round(time.process_time() - c0, 2)}}
    (Path(out) / META).write_text(json.dumps(meta, indent=1) + "\n")
    if log:
        log(f"pretrained {meta['params']} params in {meta['seconds']['total']} s; "
            f"loss {meta['loss_first']:.3f} -> {meta['loss_last']:.3f}")
    return Path(out)


# ---------------------------------------------------------------------------------------- decoding
def _stop_ids(tok) -> np.ndarray:
    """Token ids that end a turn: </s> and any token holding a template marker word."""
    ids = [tok.token_to_id("</s>")]
    for t, i in tok.get_vocab().items():
        s = t.replace("\u0120", " ").strip()
        if any(s.startswith(m) for m in MARKERS) and s:
            ids.append(i)
    return np.array(sorted(set(ids)), np.int32)


@partial(jax.jit, static_argnames=("cfg", "max_new"))
def _decode(params, cfg: M.Config, tokens_BxT, valid_BxT, stop_ids, key, temperature, max_new: int):
    B, T = tokens_BxT.shape
    pos = M.positions(valid_BxT)
    cache = M.init_cache(cfg, B, T + max_new)
    h, cache = M.apply(params, cfg, tokens_BxT, pos, cache)
    last = pos.max(-1)

    def pick(logits_BxV, k):
        g = jax.random.gumbel(k, logits_BxV.shape)
        samp = jnp.argmax(logits_BxV / jnp.maximum(temperature, 1e-6) + g, -1)
        return jnp.where(temperature > 0, samp, jnp.argmax(logits_BxV, -1)).astype(jnp.int32)

    key, k0 = jax.random.split(key)
    nxt = pick(M.logits(params, cfg, h[:, -1]), k0)
    out = jnp.zeros((B, max_new), jnp.int32)

    def cond(c):
        i, _, _, _, done, _, _ = c
        return (i < max_new) & ~done.all()

    def body(c):
        i, nxt, cache, last, done, out, key = c
        out = out.at[:, i].set(jnp.where(done, cfg.pad_id, nxt))
        done = done | jnp.isin(nxt, stop_ids)
        last = last + 1
        h, cache = M.apply(params, cfg, nxt[:, None], last[:, None], cache)
        key, k = jax.random.split(key)
        return i + 1, pick(M.logits(params, cfg, h[:, -1]), k), cache, last, done, out, key

    c = (jnp.int32(0), nxt, cache, last, jnp.zeros((B,), bool), out, key)
    return jax.lax.while_loop(cond, body, c)[5]


def decode(params, cfg: M.Config, tok, prompts, max_new: int = 48, temperature: float = 0.0, seed: int = 0,
           batch: int = 128, raw: bool = False):
    """Continue each prompt (greedy at temperature 0); returns the continuations cut at the first template
    marker or </s> (raw=True: the decoded text up to and including the stop token)."""
    stop = jnp.asarray(_stop_ids(tok))
    pad = cfg.pad_id or 0
    res = []
    encs = [e.ids for e in tok.encode_batch(list(prompts))]
    for b0 in range(0, len(encs), batch):
        chunk = encs[b0:b0 + batch]
        T = max(64, -(-max(len(e) for e in chunk) // 64) * 64)
        Bp = max(8, -(-len(chunk) // 8) * 8)
        toks = np.full((Bp, T), pad, np.int32)
        valid = np.zeros((Bp, T), bool)
        for j, e in enumerate(chunk):
            toks[j, T - len(e):] = e
            valid[j, T - len(e):] = True
        valid[len(chunk):, -1] = True
        out = np.asarray(_decode(params, cfg, jnp.asarray(toks), jnp.asarray(valid), stop,
                                 jax.random.PRNGKey(seed + b0), jnp.float32(temperature), max_new))
        for j in range(len(chunk)):
            ids = [int(x) for x in out[j] if x != pad]
            text = tok.decode(ids, skip_special_tokens=False)
            res.append(text if raw else cut(text.split("</s>")[0]))
    return res
