"""Tiny random Hugging Face checkpoints built with transformers + torch, saved as safetensors.

`make_model(family, path, **overrides)` writes config.json, model.safetensors and a small word-level
tokenizer.json into `path` and returns the torch model (eval mode, fp32, eager attention).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from selfalign_jax.core import checkpoint

WORDS = ("the a of to and in is it you that he was for on are as with his they at be this have from or "
         "one had by word but not what all were we when your can said there use an each which she do how "
         "their if will up other about out many then them these so some her would make like him into time "
         "has look two more write go see number no way could people my than first water been call who oil "
         "its now find long down day did get come made may part over new sound take only little work know "
         "place year live me back give most very after thing our just name good sentence man think say").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = 128

FAMILY_KW = {
    "llama": dict(num_key_value_heads=2, rope_theta=10000.0),
    "llama3": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "llama_linear_tied": dict(num_key_value_heads=4, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "mistral": dict(num_key_value_heads=2, sliding_window=4),
    "qwen2": dict(num_key_value_heads=2),
    "gemma": dict(num_key_value_heads=1, head_dim=32),
    # head_dim 24 != hidden / heads = 16
    "qwen3": dict(num_key_value_heads=2, head_dim=24),
    # soft-caps small enough to bite; query_pre_attn_scalar != head_dim; layer 0 sliding (window 4), 1 global
    "gemma2": dict(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=20, sliding_window=4,
                   attn_logit_softcapping=3.0, final_logit_softcapping=5.0),
    # sliding layers RoPE base 100, global layers 1e6 with linear scaling 8
    "gemma3": dict(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=20, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                    "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}}),
    "opt": dict(do_layer_norm_before=True),
    "opt350m": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
}
ALL = tuple(FAMILY_KW)
BASE = {"llama3": "llama", "llama_linear_tied": "llama", "opt350m": "opt"}


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS[: VOCAB - len(SPECIALS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    return fast


# the tokenizer class each family's checkpoints name in tokenizer_config.json
TOKENIZER_CLASS = {"llama": "LlamaTokenizer", "llama3": "LlamaTokenizer", "llama_linear_tied": "LlamaTokenizer",
                   "mistral": "LlamaTokenizer", "qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer",
                   "gemma": "GemmaTokenizer", "gemma2": "GemmaTokenizer", "gemma3": "GemmaTokenizer",
                   "opt": "GPT2Tokenizer", "opt350m": "GPT2Tokenizer"}
EXACT_SPECIALS = ["<pad>", "<s>", "</s>", "<sep>"]  # no <unk>: byte-level / byte-fallback BPE needs none
EXACT_VOCAB = 256  # printable ASCII, newline and tab as single tokens, then word prefixes


def make_family_tokenizer(path: Path, family: str, n: int = EXACT_VOCAB):
    """A BPE tokenizer of exactly n ids as `family`'s checkpoints ship it (byte-level for Qwen2 / GPT-2,
    sentencepiece-style for Llama / Gemma; every printable ASCII character, newline and tab has a token), its
    tokenizer_config.json naming TOKENIZER_CLASS[family] and only bos / eos / pad: transformers' class then adds
    its own defaults (<|endoftext|>, <unk>, <mask>) at ids >= n, which no file defines. Returns the
    tokenizers.Tokenizer written to tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    cls = TOKENIZER_CLASS[family]
    byte_level = cls in ("Qwen2Tokenizer", "GPT2Tokenizer")
    printable = "".join(chr(c) for c in range(33, 127))
    alphabet = printable + ("Ċĉ" if byte_level else "")  # byte-level: newline and tab map to Ċ, ĉ
    fallback = [] if byte_level else ["<0x0A>", "<0x09>"]  # sentencepiece: by byte fallback
    tokens, merges = gguf_vocab(n - len(fallback), "Ġ" if byte_level else "▁", alphabet)
    tokens += fallback
    tokens = EXACT_SPECIALS + tokens[len(SPECIALS):]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges],
                               byte_fallback=not byte_level, fuse_unk=not byte_level))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(EXACT_SPECIALS)
    Path(path).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(path) / "tokenizer.json"))
    conf = {"tokenizer_class": cls, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (Path(path) / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))
    return tok


def hf_config(family: str, **over):
    import transformers

    base = BASE.get(family, family)
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if base == "opt":
        kw.update(ffn_dim=96, word_embed_proj_dim=64, enable_bias=True)
    else:
        kw.update(intermediate_size=96, rms_norm_eps=1e-5)
    kw.update(FAMILY_KW[family])
    kw.update(over)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config, "gemma": transformers.GemmaConfig,
           "gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig,
           "opt": transformers.OPTConfig}[base]
    c = cls(**kw)
    c._attn_implementation = "eager"
    return c


def make_model(family: str, path, seed: int = 0, tokenizer: bool = True, exact_vocab: bool = False, **over):
    """Random tiny model of `family` (a key of FAMILY_KW) saved to path; returns the torch model.
    exact_vocab: the tokenizer is `make_family_tokenizer`'s, of exactly vocab_size ids."""
    import torch
    import transformers

    path = Path(path)
    torch.manual_seed(seed)
    if exact_vocab:
        over = {"vocab_size": EXACT_VOCAB, **over}
    m = transformers.AutoModelForCausalLM.from_config(hf_config(family, **over)).float().eval()
    with torch.no_grad():  # every tensor random and O(0.1): parity then tests something
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_((0.0 if "gemma" in family else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    m.save_pretrained(str(path), safe_serialization=True)
    if tokenizer and exact_vocab:
        make_family_tokenizer(path, family, m.config.vocab_size)
    elif tokenizer:
        make_tokenizer(path)
    m.config._attn_implementation = "eager"
    return m


def model_loader(tmp_path_factory):
    """A function family -> (path, transformers model, cfg, params, tokenizer), each family built once
    (for module-scoped fixtures)."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            tm = make_model(family, path)
            cfg, params = checkpoint.load(path, dtype="float32")
            cache[family] = (path, tm, cfg, params, checkpoint.load_tokenizer(path))
        return cache[family]

    return get


def left_padded_batch(seed: int = 0, lengths=(11, 7, 3), vocab: int = VOCAB):
    """tokens_BxT (int32, pad id 0 on the left), valid_BxT (bool)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = np.zeros((len(lengths), T), np.int32)
    valid = np.zeros((len(lengths), T), bool)
    for b, n in enumerate(lengths):
        tokens[b, T - n:] = rng.integers(4, vocab, n)
        valid[b, T - n:] = True
    return tokens, valid


def torch_logits(m, tokens, valid):
    """transformers logits for a left-padded batch, positions counted over valid tokens."""
    import numpy as np
    import torch

    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    mask = torch.tensor(np.asarray(valid), dtype=torch.long)
    kw = {}
    if m.config.model_type != "opt":
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask, **kw).logits.float().numpy()


def read_json(p):
    return json.loads(Path(p).read_text())


# ------------------------------------------------------------------------------------------- GGUF
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3"}
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"


def gguf_vocab(n: int = VOCAB, space: str = "Ġ", alphabet: str = "abcdefghijklmnopqrstuvwxyz"):
    """A BPE vocabulary of n tokens (specials, the alphabet, the space mark: 'Ġ' byte-level, '▁' sentencepiece,
    then word prefixes) and its merges."""
    tokens = SPECIALS + list(alphabet) + [space]
    merges = []
    for w in WORDS:
        for piece in [space + w, w]:
            for k in range(2, len(piece) + 1):
                if piece[:k] not in tokens and len(tokens) < n:
                    left = piece[:k - 1]
                    if left in tokens:
                        tokens.append(piece[:k])
                        merges.append(f"{left} {piece[k - 1]}")
    while len(tokens) < n:
        tokens.append(f"<extra{len(tokens)}>")
    return tokens, merges


def write_gguf(m, path, family: str, qtypes=None):
    """Write torch model m as llama.cpp's converter would: GGUF names, llama Q/K rows permuted, Gemma norms
    + 1, tensors quantized by name fragment (qtypes: {fragment: 'Q8_0', ...}, default F32), and a
    tokenizer with a chat template (byte-level BPE; sentencepiece-style for Gemma, as Gemma files carry).
    Returns the path."""
    import gguf
    import numpy as np

    arch = GGUF_ARCH[family]
    c = m.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rp = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rp["rope_theta"])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if family == "llama":
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if family.startswith("gemma"):
        w.add_sliding_window(c.sliding_window)
    if family == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    spm = family.startswith("gemma")
    tokens, merges = gguf_vocab(c.vocab_size, "▁" if spm else "Ġ")
    w.add_tokenizer_model("llama" if spm else "gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    if spm:  # longer pieces score higher: merges follow from the scores
        w.add_token_scores([0.0 if t in SPECIALS else float(len(t)) - 100.0 for t in tokens])
    else:
        w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.add_chat_template(CHAT_TEMPLATE)
    if rp.get("rope_type") == "llama3":  # llama.cpp: the per-frequency divisors as a tensor
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        H = head_dim
        base = 1.0 / (rp["rope_theta"] ** (np.arange(0, H, 2, dtype=np.float64) / H))
        scaled = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")[0].double().numpy()
        w.add_tensor("rope_freqs.weight", (base / scaled).astype(np.float32))
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     c.num_hidden_layers)
    sd = m.state_dict()
    for hf, t in sd.items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, suffix = hf.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        x = t.detach().float().numpy().copy()
        if family == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            n = c.num_attention_heads if "attn_q" in name else c.num_key_value_heads
            x = x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        if family.startswith("gemma") and name.endswith("norm.weight"):
            x = x + 1.0
        q = next((v for k, v in (qtypes or {}).items() if k in name), "F32")
        if q == "F32":
            w.add_tensor(name, x.astype(np.float32))
        elif q == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[q]
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def pairs(n: int = 24, seed: int = 0) -> list[tuple[str, str]]:
    """n random (question, answer) pairs of 3-7 and 4-11 words from WORDS[4:100] (the trainer tests' data)."""
    rng = np.random.default_rng(seed)
    words = WORDS[4:100]
    return [(" ".join(rng.choice(words, rng.integers(3, 8))), " ".join(rng.choice(words, rng.integers(4, 12))))
            for _ in range(n)]


def llama_base(tmp_path_factory):
    """(path, transformers model, our tokenizer) of a tiny random llama checkpoint (the trainer tests' base)."""
    path = tmp_path_factory.mktemp("base")
    return path, make_model("llama", path), checkpoint.load_tokenizer(path)


def tiny_run_config():
    """An IsaraConfig of one iteration of 4 prompts on a tiny model (hashing embedder, 8 new tokens)."""
    from selfalign_jax.app.config import IsaraConfig
    from selfalign_jax.core.settings import GenConfig, TrainConfig
    g = GenConfig(max_new_tokens=8, temperature=1.0)
    return IsaraConfig(iterations=1, generate=4, demos=2, context_budget=300, embedder="hashing", question_gen=g,
                       answer_gen=g, sft=TrainConfig(lr=1e-3, batch_size=4, grad_accum=1, max_length=32),
                       batch_size=4, seed=1, min_words=0)


def finished_run(tmp_path_factory):
    """(dir holding model/ and run/, the 6 seeds, the metrics rows) of a finished `tiny_run_config` run."""
    from selfalign_jax.app import rundir
    d = tmp_path_factory.mktemp("run")
    make_model("llama", d / "model", max_position_embeddings=256)
    w = WORDS[4:60]
    seeds = [{"question": " ".join(w[i:i + 5]), "answer": " ".join(w[i + 5:i + 11])} for i in range(6)]
    return d, seeds, rundir.run(d / "model", seeds, d / "run", tiny_run_config())


def hold_lock(path, kind: str = "acquire"):
    """A process holding `runlock.<kind>(path)` (acquire: a run directory; acquire_output: an output) until killed."""
    import subprocess
    import sys
    code = (f"import sys, time; from selfalign_jax.app import runlock; runlock.{kind}(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p
