"""generate with GenConfig(penalize_prompt=False): repetition penalty and n-gram ban over the generated tokens only,
checked against transformers' own processors applied to the generated part of input_ids."""

import pytest

torch = pytest.importorskip("torch")

import hf_fixtures as fx  # noqa: E402
from selfalign_jax.core import checkpoint  # noqa: E402
  # noqa: E402
from gen_call import generate as gen  # noqa: E402

PROMPTS = ["the a of to and in is it you that he was", "word but not what", "one"]
NEW = 10


def test_generated_only_penalties_match_transformers(tmp_path):
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    tm = fx.make_model("llama", tmp_path)
    cfg, params = checkpoint.load(tmp_path, dtype="float32")
    tok = checkpoint.load_tokenizer(tmp_path)

    class GeneratedOnly(LogitsProcessor):
        def __init__(self, start):
            self.start = start
            self.procs = [RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2)]

        def __call__(self, input_ids, scores):
            gen = input_ids[:, self.start:]
            if gen.shape[1] == 0:
                return scores
            for p in self.procs:
                scores = p(gen, scores)
            return scores

    # prompts that end with the model's own greedy continuation, so whole-prompt penalties bite
    plain = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=())
    prompts = [p + " " + r.text for p, r in zip(PROMPTS, plain)]
    kw = dict(max_new_tokens=NEW, stop=(), repetition_penalty=1.3, no_repeat_ngram=2)
    ours = gen(params, cfg, tok, prompts, penalize_prompt=False, **kw)
    whole = gen(params, cfg, tok, prompts, **kw)
    assert [r.token_ids for r in ours] != [r.token_ids for r in whole]  # the prompt's ids made a difference
    for p, r in zip(prompts, ours):
        enc = tok([p], return_tensors="pt")
        with torch.no_grad():
            out = tm.generate(**enc, do_sample=False, max_new_tokens=NEW, pad_token_id=0,
                              logits_processor=LogitsProcessorList([GeneratedOnly(enc["input_ids"].shape[1])]))
        ref = out[0, enc["input_ids"].shape[1]:].tolist()
        ref = ref[:ref.index(2) + 1] if 2 in ref else ref
        assert r.token_ids == ref, (p, r.token_ids, ref)
