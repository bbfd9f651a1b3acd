"""Continuous batching on a stage: a lane is a micro-batch whose rows change while it runs. Each
call of a lane (`LaneStage.lane_step`) takes the targets of the last step, lets finished rows go
(their lens windows flushed, their KV cache rows dropped), decodes one column for the rows that
stay, and prefills newly admitted rows alone (one left-padded group), splicing their caches into
the lane right-aligned (left padding and attention masks re-aligned, per-row position ids).

Lens windows and captures are kept per row, in the row's own positions, so a row's stored values
depend on that row only; its lens chunks carry the row index in `LensChunk.micro_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from actors.lens_window import WindowBuffer
from actors.sampling import choose_tokens, row_generator


def _full_cache(n_layers: int):
    """A cache of plain (full) layers: rows are spliced by column, so sliding-window layers keep
    every column too and their window is the mask's (`create_sliding_window_causal_mask`)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache()
    cache.layers = [DynamicLayer() for _ in range(n_layers)]
    return cache


@dataclass
class _View:
    """What the edit and capture masks read of the columns one forward runs (see
    `lens_window.capture_mask`): per-row left pads [batch], where each row's prompt ends (an int,
    or [batch, 1] in a lane), the capture positions and the rows' steering terms."""

    pad: torch.Tensor
    prompt_cols: object
    positions: object
    terms: dict


@dataclass
class _RowLens:
    """One row's lens window on this stage, in its own positions (no padding)."""

    prompt_cols: int
    positions: object
    buffer: WindowBuffer = field(default_factory=WindowBuffer)
    pad: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))


@dataclass
class _Lane:
    positions: object
    cache: object
    rows: list  # row indices, in batch order
    mask: torch.Tensor  # [batch, cols] 1 = a real token (rows right-aligned)
    next_position: torch.Tensor  # [batch] the position of each row's next column
    prompt_len: torch.Tensor  # [batch]
    edits: list  # [batch] each row's RowEdits
    terms: dict = field(default_factory=dict)
    lens: dict = field(default_factory=dict)  # row -> _RowLens (the rows whose lens is recorded)
    generators: dict = field(default_factory=dict)  # row -> its own torch.Generator (last stage)
    sampling: dict = field(default_factory=dict)  # row -> its own SamplingSpec (a served request's)
    logprobs: dict = field(default_factory=dict)  # row -> how many top log-probs it reports (last stage)


class LaneStage:
    """The lane calls of `StageWorker` (mixed in): it provides `spec`, `engine`, `window`, `lens`,
    `device`, `config`, `_forward`, `_terms` and `_lanes`."""

    @torch.no_grad()
    def lane_step(self, lane: int, plan: dict, feed=None, upstream=None):
        """One call of lane `lane`. `plan`: {"open": first call, "evict": rows that have ended,
        "admit": None or {"rows", "input_ids" [n, cols] left-padded, "attention_mask", "edits"} and,
        for a server's rows, optional per-row lists "lens" (capture positions, or None: no lens for
        that row), "sampling" (a SamplingSpec or None: the run's) and "logprobs" (None or how many
        top log-probs of the next-token distribution to report)};
        `feed`: the last stage's output of the lane's previous call (each row's new token and
        final-normed state: the targets of its last column); `upstream`: the previous stage's
        output of this call. Returns `(output, lens_chunks)`: {"decode", "admit"} hidden states
        for the next stage, or on the last stage {"rows", "tokens", "final", "scores"}."""
        st = self._lane(lane, plan["open"])
        self._feed(st, feed)
        chunks = self._evict(st, plan["evict"])
        survivors, admit = list(st.rows), plan["admit"]
        decoded = admitted = None
        if survivors:
            x = upstream["decode"] if upstream is not None else _feed_tokens(feed, survivors)
            decoded = self._decode(lane, st, x)
        if admit:
            x = upstream["admit"] if upstream is not None else torch.as_tensor(admit["input_ids"], dtype=torch.long)
            admitted = self._admit(lane, st, admit, x)
        for row in st.rows:
            if row in st.lens:
                chunks += self.window.flush(row, st.lens[row], force=False)
        if not st.rows:
            del self._lanes[lane]
        chunks = chunks if self.spec.reports else []
        if not self.spec.is_last:
            return {"decode": _host(decoded), "admit": _host(admitted)}, chunks
        return self._lane_tokens(st, survivors, decoded, admit, admitted), chunks

    def _lane(self, lane: int, fresh: bool) -> _Lane:
        from actors.stage import LostStateError

        if fresh:
            self._lanes[lane] = _Lane(
                positions=_positions(self.spec.capture.positions), cache=_full_cache(self.config.num_hidden_layers), rows=[],
                mask=torch.zeros(0, 0, dtype=torch.long, device=self.device),
                next_position=torch.zeros(0, dtype=torch.long, device=self.device),
                prompt_len=torch.zeros(0, dtype=torch.long), edits=[],
            )  # fmt: skip
        if lane not in self._lanes:
            raise LostStateError(f"stage {self.spec.stage} holds no state for lane {lane}: it restarted since")
        return self._lanes[lane]

    def _feed(self, st: _Lane, feed) -> None:
        """Each fed row's new token (and final state) into its lens window: its last column's targets."""
        if feed is None:
            return
        finals = feed.get("final") if self.window.keys else None
        for j, row in enumerate(feed["rows"]):
            if row not in st.lens:
                continue
            buf = st.lens[row].buffer
            buf.tokens.append(torch.tensor([[int(feed["tokens"][j])]], dtype=torch.long))
            if finals is not None:
                buf.finals.append(torch.as_tensor(finals[j])[None].to(self.device, self.lens.weight.dtype))

    def _evict(self, st: _Lane, evict) -> list:
        """Finished rows leave: their windows are flushed whole, their cache rows dropped, and
        columns no remaining row uses (left pads of every row) trimmed."""
        chunks, gone = [], set(evict)
        for row in evict:
            if row in st.lens:
                chunks += self.window.flush(row, st.lens.pop(row), force=True)
            for held in (st.generators, st.sampling, st.logprobs):
                held.pop(row, None)
        keep = [i for i, r in enumerate(st.rows) if r not in gone]
        if len(keep) == len(st.rows):
            return chunks
        idx = torch.tensor(keep, dtype=torch.long)
        dev = idx.to(self.device)
        mask = st.mask[dev]
        first = int(mask.any(0).long().argmax()) if len(keep) else mask.shape[1]
        for layer in self._own_cache_layers(st):
            layer.keys, layer.values = layer.keys[dev, :, first:], layer.values[dev, :, first:]
        st.mask, st.next_position, st.prompt_len = mask[:, first:], st.next_position[dev], st.prompt_len[idx]
        st.rows, st.edits = [st.rows[i] for i in keep], [st.edits[i] for i in keep]
        st.terms = self._terms(st.edits, len(keep))
        return chunks

    def _own_cache_layers(self, st: _Lane) -> list:
        return [st.cache.layers[i] for i in range(self.spec.start, self.spec.end) if st.cache.layers[i].is_initialized]

    def _decode(self, lane: int, st: _Lane, x) -> torch.Tensor:
        """One new column for every row of the lane: x [batch, 1] ids or hidden [batch, 1, d]."""
        cols = st.mask.shape[1]
        pad = (cols - st.next_position).cpu()  # column c holds position c - pad of its row
        view = _View(pad, (pad + st.prompt_len)[:, None], st.positions, st.terms)
        st.mask = torch.cat([st.mask, torch.ones_like(st.mask[:, :1])], dim=1)
        hidden, captured = self._forward(lane, view, cols, self._input(x), st.mask, st.next_position[:, None], st.cache)
        st.next_position = st.next_position + 1
        for i, row in enumerate(st.rows):
            if row in st.lens:
                self._hold_row(st.lens[row], captured, i, 0)
        return hidden

    def _admit(self, lane: int, st: _Lane, admit: dict, x) -> torch.Tensor:
        """Prefill the admitted rows (one left-padded group, a cache of their own), give each its
        own lens window (and generator), and splice their caches into the lane."""
        mask = torch.as_tensor(admit["attention_mask"], dtype=torch.long)
        ids = torch.as_tensor(admit["input_ids"], dtype=torch.long)
        rows, cols = mask.shape
        pad, edits = (mask == 0).sum(-1), list(admit["edits"] or [()] * rows)
        view = _View(pad, cols, st.positions, self._terms(edits, rows))
        cache, dmask = _full_cache(self.config.num_hidden_layers), mask.to(self.device)
        positions = (dmask.cumsum(-1) - 1).masked_fill(dmask == 0, 1)  # generate's: left pads don't count
        hidden, captured = self._forward(lane, view, 0, self._input(x), dmask, positions, cache)
        lengths = cols - pad
        lens = admit.get("lens") or [st.positions] * rows
        for j, row in enumerate(admit["rows"]):
            if lens[j] is not None:
                st.lens[row] = _RowLens(int(lengths[j]), _positions(lens[j]))
                st.lens[row].buffer.tokens.append(ids[j : j + 1, int(pad[j]) :])
                self._hold_row(st.lens[row], captured, j, int(pad[j]))
            if self.spec.is_last:
                self._row_sampling(st, row, (admit.get("sampling") or [None] * rows)[j])
                if (admit.get("logprobs") or [None] * rows)[j] is not None:
                    st.logprobs[row] = int(admit["logprobs"][j])
        self._splice(st, cache, dmask, lengths, list(admit["rows"]), edits)
        return hidden

    def _row_sampling(self, st: _Lane, row: int, own) -> None:
        """Row `row`'s sampling (its own SamplingSpec, or the run's) and its generator: a served
        request's seed alone, or the run's seed and the row's index."""
        if own is not None:
            st.sampling[row] = own
        spec = own or self.spec.sampling
        if spec.temperature > 0:
            st.generators[row] = torch.Generator().manual_seed(spec.seed) if own else row_generator(spec.seed, row)

    def _splice(self, st: _Lane, cache, mask: torch.Tensor, lengths: torch.Tensor, rows: list, edits: list) -> None:
        """Append a prefilled group's cache rows to the lane, both left-padded to one width."""
        width = max(st.mask.shape[1], mask.shape[1])
        own = range(self.spec.start, self.spec.end)
        if not st.rows:
            st.cache = cache
        else:
            for i in own:
                old, new = st.cache.layers[i], cache.layers[i]
                old.keys = torch.cat([_left(old.keys, width), _left(new.keys, width)], dim=0)
                old.values = torch.cat([_left(old.values, width), _left(new.values, width)], dim=0)
        st.mask = torch.cat([_left(st.mask, width), _left(mask, width)], dim=0)
        st.next_position = torch.cat([st.next_position, lengths.to(self.device)])
        st.prompt_len = torch.cat([st.prompt_len, lengths])
        st.rows, st.edits = st.rows + rows, st.edits + edits
        st.terms = self._terms(st.edits, len(st.rows))

    def _choose(self, st: _Lane, rows: list, logits: torch.Tensor) -> torch.Tensor:
        """[rows] each row's next token: greedy rows together, sampled rows each with its own
        generator (batch-mates never move its draws) and its own SamplingSpec."""
        run = self.spec.sampling
        specs = [st.sampling.get(r, run) for r in rows]
        chosen = logits.argmax(-1)
        for j, (r, spec) in enumerate(zip(rows, specs)):
            if spec.temperature > 0:
                chosen[j] = choose_tokens(logits[j : j + 1], spec, st.generators[r])[0]
        return chosen

    def _input(self, x) -> torch.Tensor:
        if self.spec.stage == 0:
            return torch.as_tensor(x, dtype=torch.long).to(self.device)
        return torch.as_tensor(x).to(self.device, self.lens.weight.dtype)

    def _hold_row(self, row: _RowLens, captured: dict, i: int, start: int) -> None:
        """Row `i` of a forward's captured states, from column `start` on, into `row`'s window."""
        for key in self.window.keys:
            for hidden in captured.get(key, []):
                row.buffer.pending.setdefault(key, []).append(hidden[i : i + 1, start:])

    def _lane_tokens(self, st: _Lane, survivors: list, decoded, admit, admitted) -> dict:
        """The last stage's output: each row's next token from its own last column (survivors,
        then the admitted rows), its final-normed states and the `score_ids` logits."""
        spec = self.spec
        rows, last, finals = [], [], []
        if decoded is not None:
            rows += survivors
            last.append(decoded[:, -1])
            finals += [h for h in decoded] if self.window.wants_finals else []
        if admitted is not None:
            pad = (torch.as_tensor(admit["attention_mask"]) == 0).sum(-1)
            rows += list(admit["rows"])
            last.append(admitted[:, -1])
            finals += [admitted[j, int(p) :] for j, p in enumerate(pad)] if self.window.wants_finals else []
        if not rows:
            return {"rows": [], "tokens": torch.zeros(0, dtype=torch.long).numpy(), "final": None}
        logits = self.lens.full_logits(torch.cat(last))  # [rows, vocab]: stays on this stage
        chosen = self._choose(st, rows, logits)
        out = {"rows": rows, "tokens": chosen.cpu().numpy(), "final": None}
        if self.window.wants_finals:  # only the rows whose lens is recorded read their final states
            out["final"] = [self.lens.norm(h).cpu() if r in st.lens else None for r, h in zip(rows, finals)]
        if st.logprobs:
            out["logprobs"] = _logprobs(logits, chosen, [st.logprobs.get(r) for r in rows])
        if spec.score_ids:
            out["scores"] = logits[:, list(spec.score_ids)].float().cpu().numpy()
        return out


def _logprobs(logits: torch.Tensor, chosen: torch.Tensor, wanted: list) -> list:
    """Per row, None or (the chosen token's log-prob, the top `n` ids, their log-probs) of the
    next-token distribution: a few numbers per row, never the vocabulary."""
    out = []
    for j, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        logp = torch.log_softmax(logits[j].float(), -1)
        top = logp.topk(max(n, 1))
        out.append((float(logp[chosen[j]]), top.indices[:n].tolist(), top.values[:n].tolist()))
    return out


def _positions(positions):
    return positions if isinstance(positions, str) else tuple(positions)


def _feed_tokens(feed, rows: list) -> torch.Tensor:
    """[rows, 1] the fed tokens of `rows`, in that order."""
    where = {r: j for j, r in enumerate(feed["rows"])}
    return torch.tensor([[int(feed["tokens"][where[r]])] for r in rows], dtype=torch.long)


def _left(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` [batch, ..., cols, (d)] left-padded with zeros to `width` columns (dim -2 for caches
    [batch, heads, cols, d], dim -1 for masks [batch, cols])."""
    if t.dim() == 2:
        return F.pad(t, (width - t.shape[1], 0))
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def _host(hidden):
    return None if hidden is None else (hidden.cpu() if hidden.device.type != "cpu" else hidden)
