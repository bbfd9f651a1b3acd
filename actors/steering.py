"""Steering vectors from contrastive A/B pairs, read at the label position (CAA-style).

For each item, two prompts end in the matching and in the non-matching answer letter; the
activation at that letter's position, at layer L and site S, differs between them, and an
aggregator (mean difference by default) turns the paired differences into one direction.
Prompts for building and for evaluating come from one function, `ab_prompt`, so the letter
read for the vector and the letters scored at evaluation are the same token ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from actors.mwe import ABItem
from actors.prompting import render_prompt

ANSWER_OPEN = "("  # the assistant's answer starts "(", so the next token is the letter


def letter_id(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens for this tokenizer; need exactly 1")
    return ids[0]


@dataclass(frozen=True)
class ABPrompt:
    """`prefix` ends right before the answer letter; `letters` maps each choice to its id."""

    prefix: list[int]
    letters: dict[str, int]

    def with_answer(self, letter: str) -> list[int]:
        """The prefix plus that letter: its last position is the label position."""
        return [*self.prefix, self.letters[letter]]


def ab_prompt(tokenizer, item: ABItem, chat_template: bool = True) -> ABPrompt:
    rendered = render_prompt(tokenizer, item.question, chat_template)
    templated = rendered is not item.question
    prefix = tokenizer(rendered + ANSWER_OPEN, add_special_tokens=not templated).input_ids
    return ABPrompt(prefix, {letter: letter_id(tokenizer, letter) for letter in item.choices})


# -- aggregators: paired activations [n, d] -> one direction [d] ----------------------------
def mean_difference(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """CAA: the mean of the paired differences."""
    return (positive - negative).mean(axis=0)


def pca_direction(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Principal axis of the paired differences (uncentred: the direction the differences
    themselves share, which stays defined when they all agree), signed and scaled to the mean
    difference's projection on it."""
    diffs = positive - negative
    _, _, vt = np.linalg.svd(diffs, full_matrices=False)
    direction = vt[0]
    projection = float(diffs.mean(axis=0) @ direction)
    return direction * projection


AGGREGATORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "mean_diff": mean_difference,
    "pca": pca_direction,
}


@dataclass
class SteeringVector:
    vector: np.ndarray  # [d_model] float32
    model: str
    hidden_size: int
    layer: int
    site: str
    dataset: str
    items: int
    aggregator: str
    normalised: bool
    norm: float  # of the vector before any normalisation

    @classmethod
    def build(cls, positive, negative, *, aggregator="mean_diff", normalise=False, **meta) -> SteeringVector:
        if aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator={aggregator!r}: choose one of {sorted(AGGREGATORS)}")
        v = AGGREGATORS[aggregator](np.asarray(positive, np.float64), np.asarray(negative, np.float64))
        norm = float(np.linalg.norm(v))
        if normalise:
            v = v / norm
        return cls(v.astype(np.float32), hidden_size=v.shape[0], items=len(positive), aggregator=aggregator,
                   normalised=normalise, norm=norm, **meta)  # fmt: skip

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        meta = {k: json.dumps(v) for k, v in asdict(self).items() if k != "vector"}
        save_file({"vector": self.vector}, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, model: str | None = None, hidden_size: int | None = None) -> SteeringVector:
        """Load and check against the running model: a vector from another model or hidden
        size is refused."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise ValueError(f"steering vector {path} is a directory: give the .safetensors file inside it")
        if not path.is_file():
            raise ValueError(f"steering vector {path} does not exist")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
                vector = f.get_tensor("vector")
        except Exception as err:  # not safetensors, truncated, or no "vector" tensor
            raise ValueError(
                f"steering vector {path} is not a steering-vector .safetensors file ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); save vectors with SteeringVector.save"
            ) from err
        missing = [k for k in ("model", "hidden_size", "layer", "site") if k not in meta]
        if missing:
            raise ValueError(f"steering vector {path} lacks metadata {missing}; save vectors with SteeringVector.save")
        vec = cls(vector=vector, **meta)
        if hidden_size is not None and (vec.hidden_size != hidden_size or vector.shape != (hidden_size,)):
            raise ValueError(
                f"steering vector {path} has hidden size {vec.hidden_size} (shape {vector.shape}); "
                f"this model's hidden size is {hidden_size}"
            )
        if model is not None and vec.model != model:
            raise ValueError(f"steering vector {path} was built on model {vec.model!r}; this run uses {model!r}")
        return vec
