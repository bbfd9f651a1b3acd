"""Next-token choice on the last stage: greedy, or temperature with nucleus (top-p) under a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


def choose_tokens(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [batch, vocab] float32 -> token ids [batch]."""
    if spec.temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.float().cpu() / spec.temperature
    if spec.top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the top token always stays.
        drop = (cum - sorted_logits.softmax(-1)) >= spec.top_p
        sorted_logits[drop] = -torch.inf
        scaled = torch.full_like(scaled, -torch.inf).scatter(-1, order, sorted_logits)
    probs = scaled.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def row_generator(seed: int, row: int) -> torch.Generator:
    """Row `row`'s own generator under continuous batching: its samples depend on the run's seed
    and its row index only, never on the rows that share its micro-batch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * row + 1)
