"""When a row's generation ends: its first end-of-sequence token (kept), its own `max_new_tokens`,
or the first step whose decoded text contains one of its stop strings (the token that completes
the string is kept). The run's settings apply to every row; a corpus row may carry its own
(`run_spec.RowStop`). Both batching modes use the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.run_spec import GenerationSettings, RowStop, SettingError


@dataclass(frozen=True)
class RowEnd:
    """One row's stop conditions, resolved against the run's."""

    budget: int  # max_new_tokens
    stop: tuple[str, ...]
    eos: frozenset

    def ended(self, generated: list[int], tokenizer) -> bool:
        """Whether `generated` (the row's ids so far, the newest last) ends the row."""
        if generated[-1] in self.eos or len(generated) >= self.budget:
            return True
        if not self.stop:
            return False
        text = tokenizer.decode(generated, skip_special_tokens=False)
        return any(s in text for s in self.stop)


class RowEnds:
    """Each prompt's `RowEnd`, made when asked from `stops` ([prompt] a `RowStop` or None each,
    a list or a corpus's packed rows; None: none given) and the run's settings. Prompts with the
    same conditions share one RowEnd; nothing is held per prompt."""

    SHARED = 1024  # distinct conditions kept (a corpus whose rows all differ does not grow it)

    def __init__(self, generation: GenerationSettings, stops, n_prompts: int):
        if stops is not None and len(stops) != n_prompts:
            raise SettingError("prompts", f": {len(stops)} stop conditions are given for {n_prompts} prompts")
        self.generation, self.stops = generation, stops
        self.eos = frozenset(generation.sampling.eos_token_ids)
        self._alike: dict = {}

    def __getitem__(self, prompt: int) -> RowEnd:
        own = (self.stops[prompt] if self.stops is not None else None) or RowStop()
        stop = tuple(self.generation.stop if own.stop is None else own.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise SettingError(
                "prompts", f"[{prompt}] stop={list(stop)!r}: every stop string must be a non-empty string"
            )
        budget = self.generation.max_new_tokens if own.max_new_tokens is None else own.max_new_tokens
        key = (budget, stop)
        if key not in self._alike:
            if len(self._alike) >= self.SHARED:
                self._alike.clear()
            self._alike[key] = RowEnd(budget, stop, self.eos)
        return self._alike[key]
