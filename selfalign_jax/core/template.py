"""Conversation templates: the paper's plain safe-rlhf template (default) or the model's chat template.

Plain: `BEGINNING OF CONVERSATION: USER: {question} ASSISTANT: {answer} END OF CONVERSATION`, demonstrations
joined by a blank line. Generated text is cut at the first template marker (BEGIN, END, USER, ASSISTANT,
ASSISTENT, \\begin, \\end, ANS; not at index 0) and stripped, as the authors' post-processing.
"""

from __future__ import annotations

import dataclasses

from selfalign_jax.core.errors import UserError

BEGIN = "BEGINNING OF CONVERSATION:"
USER = "USER:"
ASSISTANT = "ASSISTANT:"
END = "END OF CONVERSATION"
# the authors' post-processing markers (`utils.postprocessing`): generation stops and text is cut at them
MARKERS = ("BEGIN", "END", "USER", "ASSISTANT", "ASSISTENT", "\\begin", "\\end", "ANS")
SEP = "\n\n"
_MARK = "\x00SELFALIGN\x00"


def find_cut(text: str, markers=MARKERS) -> int:
    """Index of the first cut point: the earliest first occurrence of a marker, where an occurrence at
    index 0 is no cut point (the authors' `if idx > 0`); -1 if none."""
    return min((j for j in (text.find(m) for m in markers) if j > 0), default=-1)


def cut(text: str, markers=MARKERS) -> str:
    """Text before the first cut point (`find_cut`), stripped."""
    i = find_cut(text, markers)
    return (text if i < 0 else text[:i]).strip()


@dataclasses.dataclass(frozen=True)
class Template:
    """kind='plain' (paper) or 'chat' (tokenizer.apply_chat_template; pass the tokenizer)."""

    kind: str = "plain"
    tokenizer: object = None

    def demo(self, question: str, answer: str) -> str:
        if self.kind == "plain":
            return f"{BEGIN} {USER} {question} {ASSISTANT} {answer} {END}"
        return self._chat([("user", question), ("assistant", answer)], gen=False)

    def demos(self, pairs) -> str:
        """Demonstrations (question, answer) rendered and joined (blank line for plain)."""
        if self.kind == "plain":
            return SEP.join(self.demo(q, a) for q, a in pairs)
        return self._chat([m for q, a in pairs for m in (("user", q), ("assistant", a))], gen=False)

    def question_prompt(self, pairs) -> str:
        """Demonstrations, then the opening of a new user turn: the model writes a question."""
        if self.kind == "plain":
            return (self.demos(pairs) + SEP if pairs else "") + f"{BEGIN} {USER}"
        msgs = [m for q, a in pairs for m in (("user", q), ("assistant", a))]
        return self._chat(msgs + [("user", _MARK)], gen=False).split(_MARK)[0]

    def answer_prompt(self, pairs, question: str) -> str:
        """Demonstrations, then the question and the opening of the assistant turn."""
        if self.kind == "plain":
            return (self.demos(pairs) + SEP if pairs else "") + f"{BEGIN} {USER} {question} {ASSISTANT}"
        msgs = [m for q, a in pairs for m in (("user", q), ("assistant", a))]
        return self._chat(msgs + [("user", question)], gen=True)

    def train_pair(self, question: str, answer: str) -> tuple[str, str]:
        """(prompt, target) for SFT: loss on the target only; the trainer appends EOS."""
        if self.kind == "plain":
            return self.answer_prompt([], question), " " + answer
        prompt = self.answer_prompt([], question)
        full = self._chat([("user", question), ("assistant", answer)], gen=False)
        return prompt, full[len(prompt):] if full.startswith(prompt) else answer

    def _chat(self, msgs, gen: bool) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise UserError("template 'chat': the tokenizer has no chat_template")
        return self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in msgs],
                                                  tokenize=False, add_generation_prompt=gen)
