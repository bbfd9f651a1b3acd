"""Steering vectors as saved artefacts: one direction per (layer, site) built from contrastive
activations by a named aggregator, saved as safetensors with the metadata that loading checks
against the running model. Drivers build and load them; stages see only `SteeringEdit`s.

Each aggregator maps paired activations `positive, negative: [n, d_model]` to one direction
`[d_model]`; adding one is one function in `AGGREGATORS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


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
