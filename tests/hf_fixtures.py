"""Tiny random Hugging Face checkpoints built with transformers + torch, saved as safetensors.

`make_model(family, path, **overrides)` writes config.json, model.safetensors and a small word-level
tokenizer.json into `path` and returns the torch model (eval mode, fp32, eager attention).
"""

from __future__ import annotations

import json
from pathlib import Path

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


def make_model(family: str, path, seed: int = 0, tokenizer: bool = True, **over):
    """Random tiny model of `family` (a key of FAMILY_KW) saved to path; returns the torch model."""
    import torch
    import transformers

    path = Path(path)
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(hf_config(family, **over)).float().eval()
    with torch.no_grad():  # every tensor random and O(0.1): parity then tests something
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_((0.0 if "gemma" in family else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    m.save_pretrained(str(path), safe_serialization=True)
    if tokenizer:
        make_tokenizer(path)
    m.config._attn_implementation = "eager"
    return m


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
