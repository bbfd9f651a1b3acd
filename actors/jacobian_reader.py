"""A stage's reading of the Jacobian lens: its own layers' `J_l` (only those are read from the
fit's file, see actors/jacobian_lens.py), applied to captured resid_post states, `h -> J_l h`,
before the logit lens decodes them: `jlens_l(h) = lm_head(final_norm(J_l h))`. The model's last
layer has `J = I`, so there the Jacobian lens is the logit lens, exactly (no matrix is read)."""

from __future__ import annotations

import torch


class JacobianTransport:
    """`J_l` [d_model, d_model] of a stage's layers; `transport(hidden, layer)` is `J_l h`."""

    def __init__(self, matrices: dict[int, torch.Tensor], last: int):
        self.matrices, self.last = matrices, last

    @classmethod
    def for_stage(cls, path: str, layers: tuple[int, ...], n_layers: int, device) -> JacobianTransport:
        """The matrices of `layers` (a stage's captured layers) from the file at `path`."""
        from actors.jacobian_lens import load_fit

        last = n_layers - 1
        mine = tuple(i for i in layers if i != last)
        fit = load_fit(path, only=mine)
        missing = sorted(set(mine) - set(fit.layers))
        if missing:  # run_spec.check_jacobian_lens refuses this before any stage starts
            raise ValueError(f"capture.jacobian_lens={path!r} holds no matrix for layers {missing}")
        matrices = fit.matrices(mine) if mine else {}
        return cls({layer: j.to(device) for layer, j in matrices.items()}, last)

    def __call__(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """hidden: [n, d_model] resid_post of `layer` -> J_l h (in float32, back in hidden's dtype)."""
        if layer == self.last:
            return hidden
        return (hidden.float() @ self.matrices[layer].T).to(hidden.dtype)
