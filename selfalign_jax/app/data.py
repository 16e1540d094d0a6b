"""Samples, plain JSONL I/O and readers for the public datasets' own schemas.

The plain schema is one JSON object a line: `question`, `answer` (may be "" for eval prompts), and
optional `category`, `source`, `iteration`, `id`, `correct_answers`, `incorrect_answers`; other keys
are kept in `Sample.extra` and written back unchanged.

API:
    Sample(question, answer="", category=None, source=None, iteration=None, id=None,
           correct_answers=None, incorrect_answers=None, extra={})
    read_jsonl(path, require_answer=True) -> list[Sample]      # plain schema, validated
    read_pairs(path) -> list[(question, answer)]                # for SFT: answers required, non-empty
    load(path, fmt="auto") -> Loaded(samples, format, skipped)  # any FORMATS reader
    read_samples(path, fmt="auto") -> list[Sample]
    read_eval(path) -> list[dict]                               # eval rows, any format, >= 1 question
    read_seeds(path) -> list[dict]                              # seed pairs, any format, answers needed
    detect_format(path, hint) -> str
    filter_categories(samples, categories, path) -> list[Sample]
    split_seeds(samples, n, seed) -> (seeds, rest)

Bad input raises `UserError` naming the file and line (or item/field).
"""

import csv
import dataclasses
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selfalign_jax.core import fileio
from selfalign_jax.core.errors import UserError

FORMATS = ("auto", "qa", "alpaca", "alpaca-eval", "hh-rlhf", "beavertails-eval", "beavertails", "truthfulqa")
CATEGORY_SEP = ";"  # joins several labels (BeaverTails' own labels contain commas)


@dataclass
class Sample:
    """One (question, answer) pair with bookkeeping; `answer` is "" for question-only rows."""

    question: str
    answer: str = ""
    category: str | None = None
    source: str | None = None
    iteration: int | None = None
    id: str | None = None
    correct_answers: list[str] | None = None  # TruthfulQA reference lists, for scoring
    incorrect_answers: list[str] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def categories(self) -> tuple[str, ...]:
        """The labels in `category` (several are joined by ';')."""
        return tuple(c for c in (self.category or "").split(CATEGORY_SEP) if c)

    def to_dict(self) -> dict:
        d = {"question": self.question, "answer": self.answer}
        for f in ("category", "source", "iteration", "id", "correct_answers", "incorrect_answers"):
            v = getattr(self, f)
            if v is not None:
                d[f] = v
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d


_FIELDS = {f.name for f in dataclasses.fields(Sample)} - {"extra"}
_OPT_STR = ("category", "source", "id")


@dataclass
class Loaded:
    samples: list[Sample]
    format: str
    skipped: Counter  # reason -> rows left out


# ---------------------------------------------------------------- low-level reading


def _csv_rows(path: Path, required: tuple[str, ...]):
    """Yield (where, row dict) from a CSV with a header; checks columns and field counts."""
    reader = csv.reader(io.StringIO(fileio.read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path}: empty file, expected a CSV header") from None
    except csv.Error as e:
        raise UserError(f"{path}:1: malformed CSV ({e})") from None
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{path}:1: missing column {missing[0]!r} (header: {', '.join(header)})")
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"{path}:{start}: malformed CSV ({e})") from None
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{where}: expected {len(header)} fields, got {len(row)}")
        yield where, dict(zip(header, row))


def _str(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise UserError(f"{where}: missing field {key!r}")
        return None
    v = obj[key]
    if not isinstance(v, str):
        raise UserError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _question(obj: dict, key: str, where: str) -> str:
    q = _str(obj, key, where).strip()
    if not q:
        raise UserError(f"{where}: field {key!r} is empty")
    return q


# ---------------------------------------------------------------- plain schema


def plain_sample(obj: dict, where: str, require_answer: bool) -> Sample:
    """A Sample from one plain-schema record (`where` names it in errors)."""
    q = _question(obj, "question", where)
    if require_answer and "answer" not in obj:
        raise UserError(f"{where}: missing field 'answer' (write \"answer\": \"\" for question-only rows)")
    a = _str(obj, "answer", where, required=False) or ""
    kw = {k: _str(obj, k, where, required=False) for k in _OPT_STR}
    it = obj.get("iteration")
    if it is not None and (not isinstance(it, int) or isinstance(it, bool)):
        raise UserError(f"{where}: field 'iteration' must be an integer, got {it!r}")
    for k in ("correct_answers", "incorrect_answers"):
        v = obj.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise UserError(f"{where}: field {k!r} must be a list of strings")
        kw[k] = v
    extra = {k: v for k, v in obj.items() if k not in _FIELDS}
    return Sample(question=q, answer=a, iteration=it, extra=extra, **kw)


def read_jsonl(path, require_answer: bool = True) -> list[Sample]:
    """Read a plain-schema JSONL (or .jsonl.gz / .json array) file, validating every line."""
    path = Path(path)
    return [plain_sample(obj, where, require_answer) for where, obj in fileio.records(path)]


def read_pairs(path) -> list[tuple[str, str]]:
    """(question, answer) pairs for SFT from a plain-schema file; a malformed line, a missing field or an
    empty answer raises UserError naming the file and line."""
    pairs = []
    for where, obj in fileio.records(path):
        s = plain_sample(obj, where, require_answer=True)
        if not s.answer.strip():
            raise UserError(f"{where}: field 'answer' is empty (SFT needs an answer)")
        pairs.append((s.question, s.answer))
    if not pairs:
        raise UserError(f"{path}: no examples")
    return pairs


# ---------------------------------------------------------------- readers, one per public schema


def _read_qa(path: Path, skipped: Counter) -> list[Sample]:
    return read_jsonl(path, require_answer=True)


def _read_alpaca(path: Path, skipped: Counter) -> list[Sample]:
    """`{instruction, input, output}` rows, or seed tasks `{instruction, instances: [{input, output}]}`."""
    out = []
    for where, obj in fileio.records(path):
        inst = _question(obj, "instruction", where)
        if "instances" in obj:
            insts = obj["instances"]
            if not isinstance(insts, list) or not insts:
                raise UserError(f"{where}: field 'instances' must be a non-empty list")
            pairs = []
            for j, x in enumerate(insts):
                if not isinstance(x, dict):
                    raise UserError(f"{where}: instances[{j}] must be an object")
                pairs.append((_str(x, "input", f"{where}: instances[{j}]", False) or "",
                              _str(x, "output", f"{where}: instances[{j}]")))
        else:
            pairs = [(_str(obj, "input", where, False) or "", _str(obj, "output", where))]
        base_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        for j, (inp, outp) in enumerate(pairs):
            q = f"{inst}\n\n{inp.strip()}" if inp.strip() else inst
            sid = base_id if (base_id and len(pairs) == 1) else (f"{base_id}#{j}" if base_id else None)
            extra = {"name": obj["name"]} if isinstance(obj.get("name"), str) else {}
            out.append(Sample(q, outp.strip(), source="alpaca", id=sid, extra=extra))
    return out


def _read_alpaca_eval(path: Path, skipped: Counter) -> list[Sample]:
    """AlpacaEval `{instruction, output, generator, dataset}`; `dataset` becomes the category."""
    out = []
    for where, obj in fileio.records(path):
        q = _question(obj, "instruction", where)
        a = _str(obj, "output", where, required=False) or ""
        gen = _str(obj, "generator", where, required=False)
        out.append(Sample(q, a.strip(), category=_str(obj, "dataset", where, required=False),
                          source="alpaca-eval", extra={"generator": gen} if gen else {}))
    return out


_TURN_RE = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def parse_hh(transcript: str) -> list[tuple[str, str]]:
    """Split an HH-RLHF transcript into [(role, text), ...]."""
    parts = _TURN_RE.split("\n\n" + transcript.lstrip("\n"))
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def _read_hh(path: Path, skipped: Counter) -> list[Sample]:
    """HH-RLHF `{chosen, rejected}`: the first Human turn and the Assistant reply after it in `chosen`."""
    out = []
    for where, obj in fileio.records(path):
        _str(obj, "rejected", where)
        turns = parse_hh(_str(obj, "chosen", where))
        if not turns or turns[0][0] != "Human":
            raise UserError(f"{where}: field 'chosen' does not start with a 'Human:' turn")
        q = turns[0][1]
        a = turns[1][1] if len(turns) > 1 and turns[1][0] == "Assistant" else ""
        if not q or not a:
            skipped["hh_empty_first_reply"] += 1
            continue
        out.append(Sample(q, a, source="hh-rlhf"))
    return out


def _read_beavertails_eval(path: Path, skipped: Counter) -> list[Sample]:
    """BeaverTails-Evaluation CSV `[index,] prompt, category[, category_id]`: questions only."""
    out = []
    for where, row in _csv_rows(path, ("prompt", "category")):
        q = _question(row, "prompt", where)
        out.append(Sample(q, "", category=row["category"].strip() or None, source="beavertails-eval"))
    return out


def _truthy(v, where: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise UserError(f"{where}: field 'is_safe' must be true or false, got {v!r}")


def _bt_labels(cat, where: str) -> list[str]:
    if cat is None:
        return []
    if isinstance(cat, dict):  # the HF dataset's form: {label: bool}
        return [k for k, v in cat.items() if v]
    if isinstance(cat, str):
        return [c for c in cat.split(CATEGORY_SEP) if c.strip()] if cat.strip() else []
    raise UserError(f"{where}: field 'category' must be a string or an object of booleans")


def _read_beavertails(path: Path, skipped: Counter) -> list[Sample]:
    """BeaverTails `{prompt, response, is_safe, category}` (JSONL or CSV): safe answers only.

    One sample per distinct prompt (its first safe response). A safe row's own labels are all false in
    the HF release, so its category is the union of labels flagged on any response to the same prompt.
    """
    is_csv = path.name.lower().removesuffix(".gz").endswith(".csv")
    rows = _csv_rows(path, ("prompt", "response", "is_safe")) if is_csv else fileio.records(path)
    labels: dict[str, list[str]] = {}
    safe: dict[str, tuple[str, list[str]]] = {}
    for where, obj in rows:
        q = _question(obj, "prompt", where)
        a = _str(obj, "response", where).strip()
        own = _bt_labels(obj.get("category"), where)
        seen = labels.setdefault(q, [])
        seen.extend(c for c in own if c not in seen)
        if "is_safe" not in obj:
            raise UserError(f"{where}: missing field 'is_safe'")
        if not _truthy(obj["is_safe"], where):
            skipped["beavertails_unsafe"] += 1
        elif q in safe:
            skipped["beavertails_repeated_prompt"] += 1
        elif not a:
            skipped["beavertails_empty_response"] += 1
        else:
            safe[q] = (a, own)
    out = []
    for q, (a, own) in safe.items():
        cats = own or labels[q]
        out.append(Sample(q, a, category=CATEGORY_SEP.join(cats) or None, source="beavertails"))
    return out


def _answer_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(";") if x.strip()]


def _read_truthfulqa(path: Path, skipped: Counter) -> list[Sample]:
    """TruthfulQA CSV; `Best Answer` is the answer, the `; `-separated lists are kept for scoring."""
    cols = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Category")
    out = []
    for where, row in _csv_rows(path, cols):
        out.append(Sample(
            _question(row, "Question", where), row["Best Answer"].strip(),
            category=row["Category"].strip() or None, source="truthfulqa",
            correct_answers=_answer_list(row["Correct Answers"]),
            incorrect_answers=_answer_list(row["Incorrect Answers"]),
            extra={k: row[c] for k, c in (("type", "Type"), ("url", "Source")) if row.get(c)}))
    return out


_READERS = {
    "qa": _read_qa, "alpaca": _read_alpaca, "alpaca-eval": _read_alpaca_eval, "hh-rlhf": _read_hh,
    "beavertails-eval": _read_beavertails_eval, "beavertails": _read_beavertails,
    "truthfulqa": _read_truthfulqa,
}


# ---------------------------------------------------------------- detection and top level


def _format_from_keys(keys: set[str]) -> str | None:
    if {"question", "answer"} <= keys:
        return "qa"
    if {"chosen", "rejected"} <= keys:
        return "hh-rlhf"
    if {"instruction", "instances"} <= keys:
        return "alpaca"
    if {"instruction", "output", "generator"} <= keys:
        return "alpaca-eval"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "response", "is_safe"} <= keys:
        return "beavertails"
    if {"prompt", "category"} <= keys:
        return "beavertails-eval"
    if {"Question", "Best Answer"} <= keys:
        return "truthfulqa"
    return None


def detect_format(path, hint: str = "pass --format") -> str:
    """Tell the schema from the extension and the CSV header or the first record's keys; `hint` ends the
    message when it cannot (what the command can be told instead)."""
    path = Path(path)
    fileio.check_input_file(path)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        text = fileio.read_text(path)
        try:
            header = next(csv.reader(io.StringIO(text, newline="")), [])
        except csv.Error:
            header = []
        keys = {h.strip() for h in header}
        if not any(keys):
            raise UserError(f"{path}: empty file, expected a CSV header")
    elif name.endswith((".jsonl", ".json")):
        keys = None
        for _, obj in fileio.records(path):
            keys = set(obj)
            break
        if keys is None:
            raise UserError(f"{path}: no records (the file is empty or blank)")
    else:
        raise UserError(f"{path}: cannot tell the format from the extension (want .jsonl, .json, .csv); {hint}")
    fmt = _format_from_keys(keys)
    if fmt is None:
        raise UserError(f"{path}: cannot tell the format from fields {sorted(keys)}; {hint} "
                        f"({', '.join(FORMATS[1:])})")
    return fmt


def load(path, fmt: str = "auto", hint: str = "pass --format") -> Loaded:
    """Read any supported schema into Samples; `skipped` counts rows left out by reason."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path, hint)
    skipped: Counter = Counter()
    samples = _READERS[fmt](path, skipped)
    return Loaded(samples, fmt, skipped)


def read_samples(path, fmt: str = "auto") -> list[Sample]:
    return load(path, fmt).samples


def read_seeds(path) -> list[dict]:
    """Seed pairs (any format `load` reads) as plain dicts; an empty file, or a seed with an empty
    question or answer, is a UserError naming the file and line (record, for converted formats). Plain
    {question, ...} lines without "answer" are named as such (the first line decides the format)."""
    path = Path(path)
    first = _first_record(path)
    if first is not None and "question" in first[1] and "answer" not in first[1]:
        raise UserError(f"{first[0]}: missing field 'answer' (a seed is a {{\"question\", \"answer\"}} pair)")
    loaded = load(path, hint="seeds are {\"question\", \"answer\"} lines, or convert the file with "
                             "`selfalign data --format ...`")
    if loaded.format == "qa":
        for where, obj in fileio.records(path):
            if not str(obj.get("answer", "")).strip():
                raise UserError(f"{where}: field 'answer' is empty (a seed needs an answer)")
    for i, s in enumerate(loaded.samples, 1):
        if not s.answer.strip():
            raise UserError(f"{path}: seed {i} (format {loaded.format}): empty answer (a seed needs an answer)")
    if not loaded.samples:
        raise UserError(f"{path}: no seed pairs")
    return [s.to_dict() for s in loaded.samples]


def _first_record(path: Path) -> tuple[str, dict] | None:
    """(where, object) of a JSONL / JSON file's first record; None for other files or none."""
    if not path.name.lower().removesuffix(".gz").endswith((".jsonl", ".json")) or not path.is_file():
        return None
    it = fileio.records(path)
    try:
        return next(it, None)
    finally:
        it.close()


def filter_categories(samples: list[Sample], categories, path="input") -> list[Sample]:
    """Keep samples with any label in `categories`; an unknown category is an error listing the known."""
    want = [c.strip() for c in categories]
    if not want:
        return list(samples)
    have = Counter(c for s in samples for c in s.categories)
    for c in want:
        if c not in have:
            known = ", ".join(sorted(have)) or "none"
            raise UserError(f"{path}: no rows with category {c!r} (categories: {known})")
    ws = set(want)
    return [s for s in samples if ws.intersection(s.categories)]


def split_seeds(samples: list[Sample], n: int, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Draw n seeds uniformly (reproducible for a seed); both parts keep the input order."""
    if n < 0 or n > len(samples):
        raise UserError(f"--seeds {n}: only {len(samples)} rows to split")
    perm = np.random.default_rng(seed).permutation(len(samples))
    pick = set(perm[:n].tolist())
    seeds = [s for i, s in enumerate(samples) if i in pick]
    rest = [s for i, s in enumerate(samples) if i not in pick]
    return seeds, rest


def read_eval(path) -> list[dict]:
    """Eval rows (any format `selfalign data` reads) as plain dicts; at least one question."""
    try:
        hint = "convert it with `selfalign data --format ...` first"
        samples = load(path, hint=hint).samples if detect_format(path, hint) != "qa" \
            else read_jsonl(path, require_answer=False)
    except UserError:  # plain {question, ...} lines with no answer field
        if not str(path).endswith((".jsonl", ".jsonl.gz", ".json")):
            raise
        samples = read_jsonl(path, require_answer=False)
    rows = [s.to_dict() for s in samples]
    if not rows:
        raise UserError(f"{path}: no eval questions")
    for i, r in enumerate(rows, 1):
        if not r.get("question", "").strip():
            raise UserError(f"{path}: item {i} has an empty question")
    return rows
