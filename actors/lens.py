"""The logit lens: decode a hidden state through the model's own final norm and unembedding.

`lens(h) = log_softmax(lm_head(final_norm(h)))`, summarised without ever materialising more
than one window's logits: top-k ids and their exact (not renormalised) log-probs, the entropy,
and the log-prob and rank of the token that actually came next. With tensor parallelism the
unembedding is vocab-sharded; each rank summarises its shard and the merge is exact (a global
logsumexp, a merged top-k, a summed rank count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def _comm(t: torch.Tensor) -> torch.Tensor:
    """gloo reduces CPU tensors; NCCL device tensors."""
    return t.cpu() if dist.get_backend() == "gloo" else t


@dataclass
class LensSummary:
    """Per position: `topk_ids`/`topk_logprobs` [n, k], `entropy`, `target_logprob`,
    `target_rank` [n] (rank 0 = the lens's top token)."""

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    entropy: torch.Tensor
    target_logprob: torch.Tensor
    target_rank: torch.Tensor


class LogitLens(nn.Module):
    """Final norm + one vocab shard of lm_head (the whole vocabulary when `tp_size == 1`)."""

    def __init__(
        self, final_norm: nn.Module, lm_head: nn.Module, tp_rank: int = 0, tp_size: int = 1, rows_per_matmul: int = 1024
    ):
        super().__init__()
        self.norm = final_norm
        weight = lm_head.weight  # [vocab, d_model]
        self.vocab_size = weight.shape[0]
        bounds = torch.tensor_split(torch.arange(self.vocab_size), tp_size)[tp_rank]
        self.vocab_offset = int(bounds[0]) if len(bounds) else self.vocab_size
        # A shard copy only when sharding; tp_size == 1 keeps sharing the (maybe tied) weight.
        self.weight = weight if tp_size == 1 else weight[bounds].detach().clone()
        self.tp_size = tp_size
        self.rows_per_matmul = rows_per_matmul

    def shard_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, d_model] (not yet normalised) -> float32 logits of this shard [n, vocab_shard]."""
        return (self.norm(hidden) @ self.weight.T).float()

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [n, vocab], gathered across the stage's TP ranks; for
        sampling the next token of a few rows, never for whole windows."""
        logits = self.shard_logits(hidden)
        if self.tp_size == 1:
            return logits
        parts = [None] * self.tp_size
        dist.all_gather_object(parts, logits.cpu())
        return torch.cat(parts, dim=-1).to(logits.device)

    @torch.no_grad()
    def summarise(self, hidden: torch.Tensor, targets: torch.Tensor, k: int) -> LensSummary:
        """hidden: [n, d_model]; targets: [n] next-token ids (any value where unknown)."""
        pieces = [
            self._summarise_rows(hidden[i : i + self.rows_per_matmul], targets[i : i + self.rows_per_matmul], k)
            for i in range(0, hidden.shape[0], self.rows_per_matmul)
        ]
        return LensSummary(*(torch.cat(parts) for parts in zip(*(vars(p).values() for p in pieces))))

    def _summarise_rows(self, hidden: torch.Tensor, targets: torch.Tensor, k: int) -> LensSummary:
        z = self.shard_logits(hidden)  # [n, V_shard]
        n = z.shape[0]
        local_max = z.max(dim=-1).values  # [n]
        shifted = torch.exp(z - local_max[:, None])
        sum_exp = shifted.sum(-1)  # sum exp(z - m)
        sum_exp_z = (shifted * z).sum(-1)  # sum exp(z - m) * z
        top_vals, top_ids = z.topk(min(k, z.shape[-1]), dim=-1)
        top_ids = top_ids + self.vocab_offset
        local_t = targets - self.vocab_offset
        in_shard = (local_t >= 0) & (local_t < z.shape[-1])
        target_logit = torch.where(
            in_shard,
            z.gather(1, local_t.clamp(0, z.shape[-1] - 1)[:, None])[:, 0],
            torch.full_like(local_max, -torch.inf),
        )
        if self.tp_size > 1:
            stats = _comm(torch.stack([local_max, sum_exp, sum_exp_z], dim=-1))
            gathered = [torch.empty_like(stats) for _ in range(self.tp_size)]
            dist.all_gather(gathered, stats)
            stats = torch.stack(gathered).to(z.device)  # [tp, n, 3]
            vals = [torch.empty_like(_comm(top_vals)) for _ in range(self.tp_size)]
            ids = [torch.empty_like(_comm(top_ids)) for _ in range(self.tp_size)]
            dist.all_gather(vals, _comm(top_vals))
            dist.all_gather(ids, _comm(top_ids))
            all_vals, all_ids = torch.cat(vals, -1).to(z.device), torch.cat(ids, -1).to(z.device)
            top_vals, pick = all_vals.topk(k, dim=-1)
            top_ids = all_ids.gather(1, pick)
            t = _comm(target_logit)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            target_logit = t.to(z.device)
            global_max = stats[..., 0].max(0).values
            scale = torch.exp(stats[..., 0] - global_max)
            sum_exp = (stats[..., 1] * scale).sum(0)
            sum_exp_z = (stats[..., 2] * scale).sum(0)
        else:
            global_max = local_max
        lse = global_max + torch.log(sum_exp)  # [n]
        entropy = lse - sum_exp_z / sum_exp  # H = lse - E_p[z]
        rank = (z > target_logit[:, None]).sum(-1)
        if self.tp_size > 1:
            rank = _comm(rank)
            dist.all_reduce(rank)
            rank = rank.to(z.device)
        return LensSummary(
            topk_ids=top_ids.to(torch.int32),
            topk_logprobs=top_vals - lse[:, None],
            entropy=entropy,
            target_logprob=target_logit - lse,
            target_rank=rank.to(torch.int32).reshape(n),
        )
