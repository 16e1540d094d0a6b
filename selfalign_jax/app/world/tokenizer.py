"""A small byte-level BPE tokenizer trained on the world's corpus, saved so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it.

Byte-level, so any text round-trips exactly (newlines included); trained until every world word is one
token (about 1.3k tokens). Special tokens: <pad>=0, <s>=1, </s>=2, <unk>=3; <s> is prepended by default.
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from selfalign_jax.app.world import language

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts, vocab_size=2048, min_frequency=2):
    """Train a byte-level BPE on `texts` plus the world lexicon; returns a `tokenizers.Tokenizer`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lex = " ".join(sorted(language.lexicon()))
    tok.train_from_iterator(list(texts) + [lex] * min_frequency, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def save_tokenizer(tok, out_dir, model_max_length=1024):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": True, "add_eos_token": False, **SPECIAL}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", SPECIAL)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from a directory holding tokenizer.json (or the file itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)
