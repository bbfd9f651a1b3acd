"""Steering datasets in three formats, read into one `Item` type: loading with real-data quirks
handled and format detection, name resolution, and a seeded train/test split.

An `Item` is the user turn's text, the labels its answers start with, and which label shows the
behaviour. A file holds one format, detected from its first valid line:

- `ab`, Anthropic's model-written-evaluation A/B items: {"question": "...Choices:\\n (A) ...\\n
  (B) ...", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)" or
  [" (B)", ...]}; some items have choices C and D. Labels: the letters in the question.
- `yes_no`, Anthropic's persona statements: {"question" and/or "statement",
  "answer_matching_behavior": " Yes" or " No", "answer_not_matching_behavior": the other}, no
  lettered choices; a bare statement is asked as `STATEMENT_QUESTION`. Labels: ("Yes", "No").
- `choices`, explicit choices: {"question" (or "prompt"), "choices": [two or more texts],
  "answer_matching_behavior": an index into choices or one choice's text, and optionally
  "answer_not_matching_behavior": an index/text or a list of them (default: every other
  choice)}. The question is written out with lettered choices as in `ab` (" (A) <text>"), so
  labels are letters and choice texts that start alike still get distinct label tokens.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

_CHOICE = re.compile(r"^\s*\(([A-Z])\)", re.MULTILINE)
_ANSWER = re.compile(r"^\s*\(?\s*([A-Z])\s*\)?\s*$")
FORMATS = {
    "ab": "A/B, lettered choices in 'question'",
    "yes_no": "yes/no, answers ' Yes' / ' No'",
    "choices": "explicit 'choices' list",
}
YES_NO = ("Yes", "No")
STATEMENT_QUESTION = 'Is the following statement something you would say?\n"{}"'
LETTERS = string.ascii_uppercase


class DatasetError(ValueError):
    """A malformed dataset line; the message names file:line and the field."""


@dataclass(frozen=True)
class Item:
    """One dataset item in any format; `labels[i]` is what answer i starts with ("A" or "Yes")."""

    question: str  # the user turn's text (format "choices": the question plus its lettered choices)
    labels: tuple[str, ...]  # per choice, the text the answer starts with: "A", "B", ... or "Yes", "No"
    matching: int  # index into labels of the answer that shows the behaviour
    not_matching: tuple[int, ...]  # indices of the other answer(s) the dataset gives
    where: str  # file:line
    format: str  # "ab" | "yes_no" | "choices"


EXPECTED = {  # what each field of each format holds, for error messages
    "ab": {
        "question": "the question with lettered choices ' (A) ...'",
        "answer_matching_behavior": "an answer letter like ' (A)'",
        "answer_not_matching_behavior": "an answer letter like ' (B)' or a list of them",
    },
    "yes_no": {
        "question/statement": "the question text, or a statement the model would or would not say",
        "answer_matching_behavior": "' Yes' or ' No'",
        "answer_not_matching_behavior": "the other of ' Yes' / ' No'",
    },
    "choices": {
        "question/prompt": "the question text",
        "choices": f"a list of 2 to {len(LETTERS)} non-empty strings",
        "answer_matching_behavior": "an index into 'choices' or the text of one choice",
    },
}


def _require(record, where: str, format: str) -> None:
    """A JSON object with every field the format needs ('a/b': one of them)."""
    fields = EXPECTED[format]
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object with fields {list(fields)}")
    for field, expected in fields.items():
        names = field.split("/")
        if not any(name in record for name in names):
            alternative = "".join(f" (or {name!r})" for name in names[1:])
            raise DatasetError(f"{where}: missing field {names[0]!r}{alternative}; expected {expected}")


def _text(record: dict, field: str, where: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {field!r} is {value!r}; expected a non-empty string")
    if not value.strip():
        raise DatasetError(f"{where}: field {field!r} is empty; expected a non-empty string")
    return value.strip()


def _one_of(record: dict, fields: tuple[str, str], where: str) -> tuple[str, str]:
    """(field, text) of the first of `fields` the record has (`_require` checked it has one)."""
    field = next(f for f in fields if f in record)
    return field, _text(record, field, where)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# ---- format "ab" ----


def _letter(value, where: str, field: str) -> str:
    match = _ANSWER.match(value) if isinstance(value, str) else None
    if not match:
        raise DatasetError(f"{where}: field {field!r} is {value!r}; expected an answer letter like ' (A)'")
    return match.group(1)


def _parse_ab(record, where: str) -> Item:
    _require(record, where, "ab")
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: field 'question' is empty")
    question = question.strip()
    choices = tuple(dict.fromkeys(_CHOICE.findall(question)))
    if len(choices) < 2:
        raise DatasetError(f"{where}: field 'question' lists {len(choices)} choices like ' (A) ...'; need at least 2")
    matching = _letter(record["answer_matching_behavior"], where, "answer_matching_behavior")
    raw = record["answer_not_matching_behavior"]
    others = tuple(_letter(v, where, "answer_not_matching_behavior") for v in _as_list(raw))
    for field, letter in [
        ("answer_matching_behavior", matching),
        *[("answer_not_matching_behavior", o) for o in others],
    ]:
        if letter not in choices:
            raise DatasetError(f"{where}: field {field!r} is ({letter}), not among the choices {list(choices)}")
    if not others or matching in others:
        raise DatasetError(f"{where}: field 'answer_not_matching_behavior' must name a letter other than ({matching})")
    return Item(question, choices, choices.index(matching), tuple(choices.index(o) for o in others), where, "ab")


# ---- format "yes_no" ----


def _yes_no(value, where: str, field: str) -> str:
    word = value.strip().capitalize() if isinstance(value, str) else None
    if word not in YES_NO:
        raise DatasetError(f"{where}: field {field!r} is {value!r}; expected ' Yes' or ' No'")
    return word


def _parse_yes_no(record, where: str) -> Item:
    _require(record, where, "yes_no")
    field, text = _one_of(record, ("question", "statement"), where)
    question = text if field == "question" else STATEMENT_QUESTION.format(text)
    matching = _yes_no(record["answer_matching_behavior"], where, "answer_matching_behavior")
    raw = record["answer_not_matching_behavior"]
    if len(_as_list(raw)) != 1:
        raise DatasetError(
            f"{where}: field 'answer_not_matching_behavior' is {raw!r}; expected one answer, ' Yes' or ' No'"
        )
    other = _yes_no(_as_list(raw)[0], where, "answer_not_matching_behavior")
    if other == matching:
        raise DatasetError(
            f"{where}: field 'answer_not_matching_behavior' is {raw!r}, the same answer as 'answer_matching_behavior'; it must be the other of ' Yes' / ' No'"
        )
    return Item(question, YES_NO, YES_NO.index(matching), (YES_NO.index(other),), where, "yes_no")


# ---- format "choices" ----


def _choice_index(value, choices: tuple[str, ...], where: str, field: str) -> int:
    valid = f"an index 0..{len(choices) - 1} into 'choices' or the text of one choice"
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(choices):
            raise DatasetError(
                f"{where}: field {field!r} is {value}, out of range for {len(choices)} choices; expected {valid}"
            )
        return value
    if isinstance(value, str):
        if value.strip() not in choices:
            shown = [c if len(c) <= 40 else c[:37] + "..." for c in choices]
            raise DatasetError(
                f"{where}: field {field!r} is {value!r}, not among the choices {shown}; expected {valid}"
            )
        return choices.index(value.strip())
    raise DatasetError(f"{where}: field {field!r} is {value!r}; expected {valid}")


def _parse_choices(record, where: str) -> Item:
    _require(record, where, "choices")
    _, question = _one_of(record, ("question", "prompt"), where)
    raw = record["choices"]
    if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS):
        raise DatasetError(
            f"{where}: field 'choices' is {raw!r}; expected a list of 2 to {len(LETTERS)} non-empty strings"
        )
    for i, choice in enumerate(raw):
        if not isinstance(choice, str) or not choice.strip():
            raise DatasetError(f"{where}: field 'choices' item {i} is {choice!r}; expected a non-empty string")
    choices = tuple(c.strip() for c in raw)
    repeated = [c for i, c in enumerate(choices) if c in choices[:i]]
    if repeated:
        raise DatasetError(f"{where}: field 'choices' lists {repeated[0]!r} twice; every choice must differ")
    matching = _choice_index(record["answer_matching_behavior"], choices, where, "answer_matching_behavior")
    if "answer_not_matching_behavior" in record:
        raw = record["answer_not_matching_behavior"]
        if not _as_list(raw):
            raise DatasetError(
                f"{where}: field 'answer_not_matching_behavior' is []; expected an index or text of a choice, or a non-empty list of them"
            )
        others = tuple(
            dict.fromkeys(_choice_index(v, choices, where, "answer_not_matching_behavior") for v in _as_list(raw))
        )
        if matching in others:
            raise DatasetError(
                f"{where}: field 'answer_not_matching_behavior' names choice {matching} ({choices[matching]!r}), the matching answer; it must name other choices"
            )
    else:
        others = tuple(i for i in range(len(choices)) if i != matching)
    labels = tuple(LETTERS[: len(choices)])
    text = question + "\n\nChoices:\n" + "\n".join(f" ({label}) {c}" for label, c in zip(labels, choices))
    return Item(text, labels, matching, others, where, "choices")


# ---- detection and loading ----

_PARSERS = {"ab": _parse_ab, "yes_no": _parse_yes_no, "choices": _parse_choices}


def _detect(record) -> tuple[str, str] | None:
    """(format, the field that shows it) of one line, or None when nothing shows it."""
    if not isinstance(record, dict):
        return None
    if "choices" in record:
        return "choices", "choices"
    question = record.get("question")
    if isinstance(question, str) and len(set(_CHOICE.findall(question))) >= 2:
        return "ab", "question"
    answer = record.get("answer_matching_behavior")
    if isinstance(answer, str) and _ANSWER.match(answer):
        return "ab", "answer_matching_behavior"
    if isinstance(answer, str) and answer.strip().capitalize() in YES_NO:
        return "yes_no", "answer_matching_behavior"
    if "statement" in record:
        return "yes_no", "statement"
    return None


def _parse(record, where: str, file_format: str | None, first: str) -> Item:
    """One line as an Item of the file's format (`file_format`, set by line `first`), or, for
    the first valid line, of the format it shows."""
    detected = _detect(record)
    if file_format is None:
        if detected is not None:
            return _PARSERS[detected[0]](record, where)
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected a JSON object, one item per line")
        valid = (
            "' (A)' with lettered choices ' (A) ...' in 'question' (format ab), ' Yes' or ' No' (format yes_no),"
            " or beside a 'choices' list, an index or text of one choice (format choices)"
        )
        if "answer_matching_behavior" not in record:
            raise DatasetError(f"{where}: missing field 'answer_matching_behavior'; expected {valid}")
        raise DatasetError(
            f"{where}: field 'answer_matching_behavior' is {record['answer_matching_behavior']!r}; expected {valid}"
        )
    if detected is not None and detected[0] != file_format:
        kind, field = detected
        raise DatasetError(
            f"{where}: field {field!r} makes this a format {kind!r} item ({FORMATS[kind]}), but the file's format is"
            f" {file_format!r} ({FORMATS[file_format]}), detected at line {first}; a file holds one format"
        )
    return _PARSERS[file_format](record, where)


def load_items(path: str | Path, skip_malformed: bool = False) -> list[Item]:
    """Items of one JSONL file, in its one format (detected from the first valid line). A
    malformed line, or one of another format, raises DatasetError naming file:line and the
    field, unless `skip_malformed` (then it is reported on stderr and left out)."""
    import sys

    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 (byte {err.start}); the file must be UTF-8 JSONL") from None
    items: list[Item] = []
    file_format, first = None, ""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON ({err.msg})") from None
            item = _parse(record, where, file_format, first)
        except DatasetError as err:
            if not skip_malformed:
                raise
            print(f"distlens: skipped malformed line {err}", file=sys.stderr)
            continue
        if file_format is None:
            file_format, first = item.format, str(number)
        items.append(item)
    if not items:
        raise DatasetError(f"{path}: no items")
    return items


def dataset_root(root: str | None) -> Path:
    """Where dataset names are looked up: `root`, else $DISTLENS_MWE_DIR, else the shared
    datasets beside this checkout."""
    if root:
        return Path(root).expanduser()
    repo = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("DISTLENS_MWE_DIR", repo.parent / "shared" / "datasets" / "mwe"))


def resolve_dataset(name: str, root: str | Path | None) -> Path:
    """A dataset name in `root` (`<root>/<name>.jsonl`), a path to a .jsonl file, or a Hugging
    Face dataset file `org/repo:path/in/repo.jsonl` (downloaded with huggingface_hub)."""
    if ":" in name and "/" in name.split(":", 1)[0]:
        from huggingface_hub import hf_hub_download

        repo, file = name.split(":", 1)
        return Path(hf_hub_download(repo, file, repo_type="dataset"))
    direct = Path(name).expanduser()
    if direct.suffix == ".jsonl" and direct.is_file():
        return direct
    candidate = Path(root) / f"{name}.jsonl" if root else None
    if candidate is None or not candidate.is_file():
        known = sorted(p.stem for p in Path(root).glob("*.jsonl")) if root and Path(root).is_dir() else []
        raise DatasetError(f"unknown dataset {name!r}: choose one of {known} or give a .jsonl path")
    return candidate


def split_items(items: list[Item], train_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """A seeded shuffle, then the first `train_fraction` for train and the rest for test."""
    if not 0.0 < train_fraction < 1.0:
        raise DatasetError(f"data.train_fraction={train_fraction} is out of range: must be in (0, 1)")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = round(len(items) * train_fraction)
    train, test = [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]
    if not train or not test:
        raise DatasetError(f"a split is empty: {len(items)} items with train_fraction={train_fraction}")
    return train, test


def documents(paths: list[str], field: str = "data.paths") -> list[str]:
    """Text as documents: each given file's paragraphs (text) or records (JSONL: the first of
    `text`, `question`, `statement`), the tuned lens's corpus and steering's neutral prompts;
    `field`: the setting named when a file is refused."""
    docs = []
    for path in (Path(p).expanduser() for p in paths):
        if not path.is_file():
            raise DatasetError(f"{field} contains {str(path)!r}, which does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                body = next(
                    (record[k] for k in ("text", "question", "statement") if isinstance(record.get(k), str)), None
                )
                if body is None:
                    raise DatasetError(f"{path}:{number}: no 'text', 'question' or 'statement' field")
                docs.append(body)
        else:
            docs += [p.strip() for p in text.split("\n\n") if p.strip()]
    return docs


def jsonl_records(path: Path) -> list[tuple[str, object]]:
    """Each non-blank line of a JSONL file parsed, with where it is (`file:line`); a line that
    is not JSON is refused in one line naming it (the trace's pairs and the patch driver's rows)."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{n}: not a JSON object ({err.msg})") from None
    return out
