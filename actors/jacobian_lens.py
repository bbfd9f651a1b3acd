"""The Jacobian lens artefact (Gurnee, Sofroniew, Lindsey et al. 2026): per decoder layer l the
corpus-averaged input-output Jacobian `J_l = mean over (sequence, source position p >= skip) of
sum over p' >= p of d h_L[p'] / d h_l[p]`, with `h_l` layer l's resid_post and `h_L` the last
layer's resid_post before the final norm; the lens is `lm_head(final_norm(J_l h))`.

A fit holds sums and a count (`positions`, the (sequence, source position) pairs summed), so
fits over disjoint shards of a corpus merge exactly. One safetensors file: `sum.{l}` float32
[d_model, d_model] per layer (float64 in a fit's checkpoints, which resume adds to), metadata (JSON values) naming the format, model, revision,
layers, d_model, sequences, tokens, positions, skip and the estimator. Checked against the
running model when read; a stage reads only its own layers' matrices."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

FORMAT = "distlens-jacobian-lens/1"
ESTIMATOR = "mean over sequences and source positions p >= skip of sum over p' >= p of d h_L[p'] / d h_l[p]"
FILE_NAME = "jacobian_lens.safetensors"


@dataclass
class JacobianFit:
    """A (partial) fit: per-layer sums of row-summed Jacobians and how much went into them."""

    model: str
    d_model: int
    skip: int
    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_model, d_model]
    positions: int = 0  # (sequence, source position p >= skip) pairs summed
    sequences: int = 0
    tokens: int = 0
    revision: str = ""

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.sums))

    def matrices(self, only: tuple[int, ...] | None = None) -> dict[int, torch.Tensor]:
        """J_l = sum_l / positions for the fit's layers (or just `only`'s)."""
        if self.positions <= 0:
            raise ValueError("the Jacobian fit is empty: it has summed no source positions")
        return {la: s.double().div(self.positions).float() for la, s in self.sums.items() if only is None or la in only}

    def meta(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model,
            "revision": self.revision,
            "layers": list(self.layers),
            "d_model": self.d_model,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "positions": self.positions,
            "skip": self.skip,
            "estimator": ESTIMATOR,
        }


def save_fit(path: str | Path, fit: JacobianFit, extra: dict | None = None, dtype=torch.float32) -> Path:
    """Write `fit` as one safetensors file (whole: written beside and renamed into place);
    `dtype`: the sums' (float64 for a checkpoint that a resumed fit adds to)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"sum.{la}": s.detach().to(dtype).cpu().contiguous() for la, s in fit.sums.items()}
    meta = {**(extra or {}), **fit.meta()}
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)
    return path


def read_meta(path: str | Path, where: str = "capture.jacobian_lens") -> dict:
    """The metadata of a Jacobian lens file, refused in one line when it is missing or not one
    (a pickle, another safetensors file). Reads the header only, never unpickles anything."""
    from safetensors import safe_open

    path = Path(path)
    label = f"{where}={str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{label} does not exist: give a {FILE_NAME} file (python -m pipelines.tune lens=jacobian)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            keys = set(f.keys())
    except Exception as err:
        raise ValueError(
            f"{label} is not a safetensors file ({type(err).__name__}); pickles are never loaded: "
            f"give a {FILE_NAME} file"
        ) from None
    if meta.get("format") != FORMAT or {f"sum.{la}" for la in meta.get("layers", [])} != keys:
        raise ValueError(f"{label} is not a Jacobian lens file (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def check_file(path: str | Path, model: str, d_model: int, n_layers: int, where: str = "capture.jacobian_lens") -> dict:
    """`read_meta`, then refused in one line when fitted on another model, hidden size or layers."""
    meta = read_meta(path, where)
    label = f"{where}={str(path)!r}"
    if meta.get("d_model") != d_model:
        raise ValueError(f"{label} has hidden size {meta.get('d_model')}; this model's is {d_model}")
    if model and meta.get("model") != model:
        raise ValueError(f"{label} was fitted on model {meta.get('model')!r}; this run uses {model!r}")
    if any(not 0 <= la < n_layers for la in meta["layers"]):
        raise ValueError(f"{label} holds layers {meta['layers']}; this model has 0..{n_layers - 1}")
    return meta


def load_fit(
    path: str | Path, only: tuple[int, ...] | None = None, where: str = "capture.jacobian_lens"
) -> JacobianFit:
    """The fit in `path` (after `read_meta`); `only`: just these layers' sums (a stage's own)."""
    from safetensors import safe_open

    meta = read_meta(path, where)
    keep = [la for la in meta["layers"] if only is None or la in only]
    with safe_open(str(path), framework="pt") as f:
        sums = {la: f.get_tensor(f"sum.{la}") for la in keep}
    return JacobianFit(
        model=meta["model"],
        d_model=meta["d_model"],
        skip=meta["skip"],
        sums=sums,
        positions=meta["positions"],
        sequences=meta["sequences"],
        tokens=meta["tokens"],
        revision=meta.get("revision", ""),
    )


def merge_fits(fits: list[JacobianFit]) -> JacobianFit:
    """Fits over disjoint shards as one: sums and counts add (in float64). Refused when they
    disagree on model, hidden size, skip or layers."""
    if not fits:
        raise ValueError("merge needs at least one Jacobian fit")
    first = fits[0]
    for other in fits[1:]:
        for name in ("model", "d_model", "skip", "layers"):
            if getattr(other, name) != getattr(first, name):
                raise ValueError(
                    f"Jacobian fits disagree on {name}: {getattr(first, name)!r} and {getattr(other, name)!r}"
                )
    sums = {la: sum((f.sums[la].double() for f in fits), torch.zeros((), dtype=torch.float64)) for la in first.layers}
    return replace(
        first,
        sums=sums,
        positions=sum(f.positions for f in fits),
        sequences=sum(f.sequences for f in fits),
        tokens=sum(f.tokens for f in fits),
    )
