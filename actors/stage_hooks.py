"""What a stage's hooks do at one (layer, site) it owns (mixed into StageWorker): each row's edits,
steering additions (actors/steering.py) and interventions (actors/interventions.py), then the
capture of the activation that flows on. Where a site sits in a layer is the family's adapter row."""

from __future__ import annotations

import torch

from actors import interventions
from actors.adapters import get_path
from actors.lens_window import capture_mask
from actors.steering import edit_terms
from actors.vocabulary import SITES


def _edit_mask(state, start: int, end: int, positions) -> torch.Tensor:
    """[batch, end - start] bool: where a steering edit with `positions` applies (`state`: a
    micro-batch's or a lane's view of its columns: `pad`, `prompt_cols`)."""
    if isinstance(positions, int):
        cols = torch.arange(start, end)[None, :]
        return (cols - state.pad[:, None]) >= positions
    if positions == "all":
        return torch.ones(len(state.pad), end - start, dtype=torch.bool)
    return capture_mask(state, start, end, positions)


def _hook_input(module, transform):
    """Rewrite the tensor `module` reads: its first positional argument or `hidden_states=`."""

    def pre(m, args, kwargs):
        if args:
            return (transform(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}

    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _hook_output(module, transform):
    """Rewrite the tensor `module` returns (the first element of a returned tuple)."""

    def post(m, args, out):
        return (transform(out[0]), *out[1:]) if isinstance(out, tuple) else transform(out)

    return module.register_forward_hook(post)


class HookedStage:
    """The hook calls of `StageWorker`: it provides `spec`, `model`, `config`, `device`, `_steered`,
    `_vectors`, `_hooks`, `_step`, `_capture` and `_patch_sources`."""

    def _install_hooks(self) -> None:
        """One hook per (layer, site) that is steered or captured: the edit first, so a capture
        at the same site records the steered activation that flows on. Where a site sits in a
        layer is the family's adapter row."""
        capture = self.spec.capture
        sites = self.model.adapter.sites_for(self.config)
        for offset, layer in enumerate(self.model.layers):
            index = self.spec.start + offset
            for site in SITES:
                steered = (index, site) in self._steered
                record = index in capture.layers and site in capture.components
                if not steered and not record:
                    continue
                path, which = sites[site]
                module = get_path(layer, path)
                hook = (_hook_input if which == "in" else _hook_output)(module, self._transform(index, site, record))
                self._hooks.append(hook)

    def _transform(self, layer: int, site: str, record: bool):
        def transform(hidden: torch.Tensor) -> torch.Tensor:  # hidden: [batch, new, d_model]
            if self._step is not None:
                state, start, new = self._step
                entries, sources = getattr(state, "do", {}).get((layer, site), ()), getattr(state, "sources", {})
                if entries:
                    hidden = interventions.own_edits(hidden.clone(), state, start, entries)
                for positions, per_row in state.terms.get((layer, site), ()):
                    mask = _edit_mask(state, start, start + new, positions).to(hidden.device)
                    # the edit is float32 (coefficient x vector), cast to the model's dtype once added
                    hidden = hidden + (mask[:, :, None].float() * per_row[:, None, :]).to(hidden.dtype)
                if sources:
                    interventions.record_sources(hidden, state, start, (layer, site), sources, self._patch_sources)
                if entries:
                    hidden = interventions.row_patches(
                        hidden, state, start, (layer, site), entries, self._patch_sources
                    )
            if record and self._capture is not None:
                self._capture.setdefault((layer, site), []).append(hidden.detach())
            return hidden

        return transform

    def _take_edits(self, state, edits, rows: int) -> None:
        """A static micro-batch's rows' edits: steering terms, interventions and patch sources."""
        state.terms = self._terms(interventions.steering_only(edits), rows)
        state.do, state.sources, state.compare = interventions.plan(edits, self._steered)

    def _terms(self, edits, rows: int) -> dict:
        if edits is None or not self._steered:
            return {}
        if len(edits) != rows:
            raise ValueError(f"edits are given for {len(edits)} rows; the micro-batch has {rows}")
        if any(isinstance(e, (interventions.Intervention, *interventions.MARKS)) for row in edits for e in row):
            raise ValueError("interventions run in static micro-batches (actors/tracing.py), not in a continuous lane")
        return edit_terms(edits, self._vectors, self._steered, self.device)

    def drop_patch_sources(self) -> int:
        """Forget every patch source's kept activations and every KL reference's distributions;
        returns how many went."""
        n = len(self._patch_sources) + len(self._kl_refs)
        self._patch_sources, self._kl_refs = {}, {}
        return n
