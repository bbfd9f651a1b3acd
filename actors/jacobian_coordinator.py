"""The Jacobian-lens fit across pipeline stages, driven from the driver's process: each
micro-batch's rows go forward stage to stage once (each stage keeps its graph), then for every
block of output dimensions the backward runs last stage to first, each stage through its own
layers only (actors/jacobian_fit.py), the cotangents at a stage's input handed to the previous
one. On Ray the calls are chained without waiting, so the last stage works on the next block (or micro-batch)
while the earlier ones finish this one. Sums come back to this process only at a checkpoint and
at the end, as a `jacobian_lens.JacobianFit` (sums and counts, so partial fits add up)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from actors.jacobian_fit import FitSpec
from actors.jacobian_lens import JacobianFit
from actors.progress import progress_bar
from actors.stage import StageSpec
from actors.stage_group import StageGroup

IN_FLIGHT = 2  # micro-batches submitted ahead (each holds its inputs on every stage)


def padded(rows: list[list[int]], pad: int = 0) -> np.ndarray:
    """Rows of ids right-padded to the longest: [n, T] int64."""
    ids = np.full((len(rows), max(len(r) for r in rows)), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids


class JacobianCoordinator:
    """Fits the Jacobian lens of the checkpoint at `model_path` (HF config `hf_config`) on
    `num_stages` stages created by `executor`. `model`, `revision`: recorded in the fit.

    `fitted(done)` is called once `done` micro-batches are in (after any checkpoint): a no-op
    here; tests subclass it to stop a fit at a chosen point."""

    def __init__(
        self, model_path: str, hf_config, num_stages: int, spec: FitSpec, executor,
        dtype: str = "float32", device: str = "cpu", model: str = "", revision: str = "",
    ):  # fmt: skip
        from actors.slicing import plan_stages

        d = hf_config.hidden_size
        if spec.block < 1 or d % spec.block:
            raise ValueError(f"jacobian.block={spec.block} does not divide d_model={d}: choose a divisor of {d}")
        self.spec, self.d_model, self.model, self.revision = spec, d, model, revision
        self.bounds = plan_stages(hf_config, num_stages)
        n = len(self.bounds)
        specs = [
            StageSpec(s, n, a, b, str(model_path), dtype=dtype, device=device, jacobian=spec)
            for s, (a, b) in enumerate(self.bounds)
        ]
        self.executor = executor
        self.stages = StageGroup(executor, specs)
        self.stages.setup()

    def fitted(self, done: int) -> None:
        """`done` micro-batches of this fit are in."""

    def empty(self) -> JacobianFit:
        return JacobianFit(model=self.model, d_model=self.d_model, skip=self.spec.skip, revision=self.revision)

    def fit(
        self, sequences: list[list[int]], batch: int, base: JacobianFit | None = None, first: int = 0,
        save_every: int = 0, save: Callable[[JacobianFit, int], None] | None = None, progress: bool = False,
    ) -> JacobianFit:  # fmt: skip
        """The fit of `base` (a checkpoint's: micro-batches before `first`) plus `sequences`'
        micro-batches of `batch` rows from `first` on. Every `save_every` micro-batches (counted
        from the fit's start) `save(fit so far, micro-batches done)`."""
        fit = base or self.empty()
        todo = [sequences[i : i + batch] for i in range(first * batch, len(sequences), batch)]
        bar = progress_bar(len(todo), "jacobian fit (micro-batches)", progress)
        pending: list[tuple[int, list, list]] = []  # (micro-batch, its rows, its last handles)
        started, seen = time.perf_counter(), 0
        if todo:
            self._forward_rows(first, todo[0])
        for offset, rows in enumerate(todo):
            mb = first + offset
            if offset + 1 < len(todo):  # ahead of this one's blocks: the last stage goes on to it without waiting
                self._forward_rows(mb + 1, todo[offset + 1])
            pending.append((mb, rows, self._submit_blocks(mb)))
            last = offset == len(todo) - 1
            checkpoint = save is not None and save_every and (mb + 1) % save_every == 0
            while pending and (len(pending) > IN_FLIGHT or last or checkpoint):
                done, done_rows, handles = pending.pop(0)
                for handle in handles:
                    self.executor.get(handle)
                fit = _count(fit, done_rows, self.spec.skip)
                seen += len(done_rows)
                bar.update(1)
                wall = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{seen / wall:.3g} seq/s, {seen * self.d_model / wall:.0f} output dims/s")
            if checkpoint or last:
                fit = self._collect(fit)
            if checkpoint:
                save(fit, mb + 1)
            self.fitted(mb + 1)
        bar.close()
        return fit

    def _forward_rows(self, key: int, rows: list[list[int]]) -> None:
        """Micro-batch `key`'s rows forward through every stage (each keeps its input)."""
        group, lengths = self.stages, [len(r) for r in rows]
        x = padded(rows)
        for s in range(group.num_stages):
            x = group.jacobian_rows(s, key, x, lengths)

    def _submit_blocks(self, key: int) -> list:
        """Every block of micro-batch `key`, last stage to first; returns the handles to wait on.
        A stage runs its calls in submission order, so the next micro-batch's rows were sent
        before these blocks (`fit`): otherwise the first stage would forward them only after its
        last block of this one, and the last stage would wait a block's time per micro-batch."""
        group, ends = self.stages, []
        for lo in range(0, self.d_model, self.spec.block):
            cotangent = None
            for s in reversed(range(group.num_stages)):
                cotangent = group.jacobian_block(s, key, lo, cotangent)
            ends.append(cotangent)  # the first stage's: None once its backward is done
        return ends + group.jacobian_drop(key)

    def _collect(self, fit: JacobianFit) -> JacobianFit:
        """`fit` plus the sums every stage has gathered since the last collection."""
        sums: dict = {}
        for handle in self.stages.jacobian_take():
            sums.update(self.executor.get(handle))
        if fit.sums:  # a checkpoint's, or the last collection's: float64 sums add exactly as the stages' do
            sums = {la: fit.sums[la].double() + s for la, s in sums.items()}
        return replace(fit, sums=sums)

    def close(self) -> None:
        self.executor.shutdown()


def _count(fit: JacobianFit, rows: list[list[int]], skip: int) -> JacobianFit:
    """`fit` with the counts of `rows` added (their sums come with the next collection)."""
    return replace(
        fit,
        positions=fit.positions + sum(max(0, len(r) - skip) for r in rows),
        sequences=fit.sequences + len(rows),
        tokens=fit.tokens + sum(len(r) for r in rows),
    )
