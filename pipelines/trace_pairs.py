"""A causal trace's input: clean/corrupted prompt pairs, from a JSONL file (one
`{"clean", "corrupt", "target", "foil"?}` object a line) or given inline, tokenized and checked
here, each refusal one line naming the file:line (or pairs[i]) and the field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from actors.tracing import TracePair
from pipelines.config import ConfigError
from pipelines.datasets import jsonl_records
from pipelines.prompts import one_token

FIELDS = ("clean", "corrupt", "target", "foil")


def read_pairs(source, tokenizer) -> tuple[list[TracePair], list[dict], dict]:
    """(token-id pairs, their texts, the input's identity {path or "inline", sha256, pairs})."""
    if source is None or source == "" or (not isinstance(source, str) and not len(source)):
        raise ConfigError(
            "pairs is not set: give a JSONL file (pairs=pairs.jsonl, one "
            '{"clean", "corrupt", "target", "foil"?} a line) or the pairs inline'
        )
    if isinstance(source, str):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"pairs={source!r}: no such file")
        rows = jsonl_records(path)
        identity = {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    else:
        rows = [(f"pairs[{i}]", dict(p) if hasattr(p, "keys") else p) for i, p in enumerate(source)]
        text = json.dumps([r for _, r in rows], sort_keys=True, default=str)
        identity = {"path": "inline", "sha256": hashlib.sha256(text.encode()).hexdigest()}
    if not rows:
        raise ConfigError(f"pairs={source!r} holds no pair")
    pairs, texts = [], []
    for where, row in rows:
        pair, text = _pair(where, row, tokenizer)
        pairs.append(pair)
        texts.append(text)
    return pairs, texts, {**identity, "pairs": len(pairs)}


def _pair(where: str, row, tokenizer) -> tuple[TracePair, dict]:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected an object with fields {list(FIELDS[:3])} (and optionally 'foil')")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}: valid fields are {list(FIELDS)}")
    text = {}
    for name in FIELDS:
        value = row.get(name)
        if name == "foil" and value is None:
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: field {name!r}={value!r}: give non-empty text")
        text[name] = value
    clean = tokenizer(text["clean"]).input_ids
    corrupt = tokenizer(text["corrupt"]).input_ids
    if len(clean) != len(corrupt):
        raise ConfigError(
            f"{where}: clean has {len(clean)} tokens, corrupt {len(corrupt)}: a trace restores each position "
            "from the clean run into the corrupted one and needs prompts of equal token length"
        )
    ids = {
        name: one_token(tokenizer, text[name], f"{where}: field {name!r}")
        for name in ("target", "foil")
        if name in text
    }
    if ids.get("foil") == ids["target"]:
        raise ConfigError(f"{where}: foil {text['foil']!r} is the target's token: give another")
    return TracePair(tuple(clean), tuple(corrupt), ids["target"], ids.get("foil")), text
