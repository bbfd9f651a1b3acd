"""The A/B behaviour datasets of steering studies (Anthropic's model-written-evaluation JSONL):
loading with real-data quirks handled, name resolution, and a seeded train/test split.

A line: {"question": "...Choices:\\n (A) ...\\n (B) ...", "answer_matching_behavior": " (A)",
"answer_not_matching_behavior": " (B)" or [" (B)", ...]}; some items have choices C and D.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

_CHOICE = re.compile(r"^\s*\(([A-Z])\)", re.MULTILINE)
_ANSWER = re.compile(r"^\s*\(?\s*([A-Z])\s*\)?\s*$")
FIELDS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")


class DatasetError(ValueError):
    """A malformed dataset line; the message names file:line and the field."""


@dataclass(frozen=True)
class ABItem:
    question: str
    matching: str  # the letter that shows the behaviour, e.g. "A"
    not_matching: tuple[str, ...]  # the other answer letter(s)
    choices: tuple[str, ...]  # every choice letter in the question, in order
    where: str  # file:line


def _letter(value, where: str, field: str) -> str:
    match = _ANSWER.match(value) if isinstance(value, str) else None
    if not match:
        raise DatasetError(f"{where}: field {field!r} is {value!r}; expected an answer letter like ' (A)'")
    return match.group(1)


def parse_item(record, where: str) -> ABItem:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object with fields {list(FIELDS)}")
    for field in FIELDS:
        if field not in record:
            raise DatasetError(f"{where}: missing field {field!r}")
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: field 'question' is empty")
    question = question.strip()
    choices = tuple(dict.fromkeys(_CHOICE.findall(question)))
    if len(choices) < 2:
        raise DatasetError(f"{where}: field 'question' lists {len(choices)} choices like ' (A) ...'; need at least 2")
    matching = _letter(record["answer_matching_behavior"], where, "answer_matching_behavior")
    raw = record["answer_not_matching_behavior"]
    others = tuple(_letter(v, where, "answer_not_matching_behavior") for v in (raw if isinstance(raw, list) else [raw]))
    for field, letter in [
        ("answer_matching_behavior", matching),
        *[("answer_not_matching_behavior", o) for o in others],
    ]:
        if letter not in choices:
            raise DatasetError(f"{where}: field {field!r} is ({letter}), not among the choices {list(choices)}")
    if not others or matching in others:
        raise DatasetError(f"{where}: field 'answer_not_matching_behavior' must name a letter other than ({matching})")
    return ABItem(question, matching, others, choices, where)


def load_items(path: str | Path, skip_malformed: bool = False) -> list[ABItem]:
    """Items of one JSONL file. A malformed line raises DatasetError naming file:line and the
    field, unless `skip_malformed` (then it is reported on stderr and left out)."""
    import sys

    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 (byte {err.start}); the file must be UTF-8 JSONL") from None
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON ({err.msg})") from None
            items.append(parse_item(record, where))
        except DatasetError as err:
            if not skip_malformed:
                raise
            print(f"distlens: skipped malformed line {err}", file=sys.stderr)
    if not items:
        raise DatasetError(f"{path}: no items")
    return items


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


def split_items(items: list[ABItem], train_fraction: float, seed: int) -> tuple[list[ABItem], list[ABItem]]:
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
