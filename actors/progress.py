"""Progress of a run for people: a progress bar (a live one on the driver even when the
coordinator runs in a Ray actor) and per-stage throughput polled from the stages."""

from __future__ import annotations

import sys
import time


def progress_bar(total: int, desc: str, enabled: bool):
    ray = sys.modules.get("ray")  # a process that never imported Ray is no Ray actor (nor pays its import)
    try:
        in_actor = ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:
        in_actor = False
    if in_actor:  # Ray forwards whole lines only; tqdm_ray renders a live bar on the driver
        from ray.experimental.tqdm_ray import tqdm

        return tqdm(total=total, desc=desc)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr)


class StageStats:
    """Per-stage throughput and rows done for the progress bar and the run log: every few
    seconds each stage is asked (without waiting) for its busy time and tokens processed; the
    coordinator counts rows whose generation has ended (`rows_done` of `rows_total`; the bar
    itself counts tokens, so its rate is tokens/s and its ETA the run's)."""

    def __init__(self, stages, bar, desc: str, every_s: float = 2.0, rows_total: int = 0):
        self.stages, self.bar, self.desc, self.every_s = stages, bar, desc, every_s
        self.last_poll, self.pending, self.rates, self.losses = 0.0, None, {}, {}
        self.rows_done, self.rows_total = 0, rows_total

    def tick(self) -> None:
        ex = self.stages.executor
        if self.pending is not None and ex.ready(self.pending):
            for stats in (ex.get(h) for h in self.pending):
                if stats["busy_s"] > 0:
                    self.rates[stats["stage"]] = stats["tokens"] / stats["busy_s"]
                if "loss" in stats:  # tuned-lens training: each stage's last step
                    self.losses[stats["stage"]] = stats["loss"]
            self.pending = None
            if hasattr(self.bar, "set_postfix_str"):
                self.bar.set_postfix_str(self.text().strip(" ,;"), refresh=False)
            elif hasattr(self.bar, "set_description"):  # Ray's tqdm (coordinator in an actor)
                self.bar.set_description(self.desc + self.text())
        if self.pending is None and time.monotonic() - self.last_poll > self.every_s:
            self.last_poll = time.monotonic()
            self.pending = self.stages.stats()

    def forget(self) -> None:
        """Drop a poll in flight (its stages may have restarted)."""
        self.pending = None

    def text(self) -> str:
        text = f"; rows {self.rows_done}/{self.rows_total} done" if self.rows_total else ""
        if not self.rates:
            return text
        text += "; stage tokens/s " + " ".join(f"s{k}={v:.0f}" for k, v in sorted(self.rates.items()))
        if self.losses:
            text += "; KL loss " + " ".join(f"s{k}={v:.3f}" for k, v in sorted(self.losses.items()))
        return text
