"""The logit lens: decode a hidden state through the model's own final norm and unembedding.

`lens(h) = log_softmax(cap(lm_head(final_norm(h))))`, where `cap` is the family's final logit
soft-cap `c * tanh(z / c)` (Gemma) or nothing, summarised without ever materialising more
than one window's logits: top-k ids and their exact (not renormalised) log-probs, the entropy,
the log-prob and rank of the token that actually came next, and, given the last layer's
final-normed hidden state of the same position, `kl_to_final` = KL(final || lens) in nats,
from the final distribution rebuilt with this replica of the unembedding. With tensor parallelism the
unembedding is vocab-sharded; each rank summarises its shard and the merge is exact (a global
logsumexp, a merged top-k, a summed rank count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from actors.gemv import linear_no_bias


def _comm(t: torch.Tensor) -> torch.Tensor:
    """gloo reduces CPU tensors; NCCL device tensors."""
    return t.cpu() if dist.get_backend() == "gloo" else t


ROWS_PER_MATMUL = 256
COLS_PER_MATMUL = 2048
_SCRATCH: dict[tuple, torch.Tensor] = {}  # (device, dtype, vocab shard) -> logits buffer of this process


def release_scratch() -> None:
    """Drop this process's reused logits buffers; the next lens call allocates afresh (a
    measurement that must not start out holding them, as the benchmark's, calls this first)."""
    _SCRATCH.clear()


@dataclass
class LensSummary:
    """Per position: `topk_ids`/`topk_logprobs` [n, k], `entropy`, `target_logprob`,
    `target_rank` [n] (rank 0 = the lens's top token)."""

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    entropy: torch.Tensor
    target_logprob: torch.Tensor
    target_rank: torch.Tensor
    kl_to_final: torch.Tensor | None = None  # [n] KL(final || lens), when the final states were given


class LogitLens(nn.Module):
    """Final norm + one vocab shard of lm_head (the whole vocabulary when `tp_size == 1`)."""

    def __init__(
        self,
        final_norm: nn.Module,
        lm_head: nn.Module,
        tp_rank: int = 0,
        tp_size: int = 1,
        rows_per_matmul: int = ROWS_PER_MATMUL,
        rows_per_pass: int = 32,
        softcap: float | None = None,
    ):
        super().__init__()
        self.norm = final_norm
        self.softcap = softcap  # logits -> softcap * tanh(logits / softcap), as the model's own head does
        weight = lm_head.weight  # [vocab, d_model]
        self.vocab_size = weight.shape[0]
        bounds = torch.tensor_split(torch.arange(self.vocab_size), tp_size)[tp_rank]
        self.vocab_offset = int(bounds[0]) if len(bounds) else self.vocab_size
        # A shard copy only when sharding; tp_size == 1 keeps sharing the (maybe tied) weight,
        # and keeps the head module alive (stages in one process share it: slicing._HEADS).
        self.weight = weight if tp_size == 1 else weight[bounds].detach().clone()
        self.head = lm_head if tp_size == 1 else None
        self.tp_size = tp_size
        self.rows_per_matmul = rows_per_matmul
        self.rows_per_pass = rows_per_pass

    def shard_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, d_model] (not yet normalised) -> float32 logits of this shard [n, vocab_shard]."""
        x = self.norm(hidden)
        if x.dim() == 2 and x.device.type == "cpu":  # a decoding step's few sampling rows: split
            return self._cap(linear_no_bias(x, self.weight)).float()
        return self._cap(x @ self.weight.T).float()

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The final logit soft-cap, in place, in the head's dtype (where the model applies it)."""
        if self.softcap is None:
            return logits
        return logits.div_(self.softcap).tanh_().mul_(self.softcap)

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
    def summarise(
        self, hidden: torch.Tensor, targets: torch.Tensor, k: int, final: torch.Tensor | None = None, per: int = 1
    ) -> LensSummary:
        """hidden: [n, d_model]; targets: [n] next-token ids (any value where unknown); final:
        [n / per, d_model] the last layer's final-normed hidden states, row i of `hidden` being
        position i // per (several layers and components of one position side by side), for
        `kl_to_final`.

        The unembedding runs over `rows_per_matmul` rows at a time (a large GEMM is ~1.5x faster
        per row than a window's); the full-vocabulary reductions then run over slices of
        `rows_per_pass` rows, small enough to stay in cache between passes."""
        step = max(per, self.rows_per_matmul // per * per)  # whole positions per GEMM
        pieces = [
            self._summarise_rows(
                hidden[i : i + step],
                targets[i : i + step],
                k,
                None if final is None else final[i // per : (i + step) // per],
                per,
            )  # fmt: skip
            for i in range(0, hidden.shape[0], step)
        ]
        if len(pieces) == 1:
            return pieces[0]
        fields = [list(parts) for parts in zip(*(vars(p).values() for p in pieces))]
        return LensSummary(*(None if parts[0] is None else torch.cat(parts) for parts in fields))

    def _logits_buffer(self, n: int, hidden: torch.Tensor) -> torch.Tensor:
        """An [n, vocab_shard] output buffer, one per process (stages that share a process run
        one at a time) and reused: a fresh one per call would be a fresh mmap whose pages are
        faulted in (zeroed) every time."""
        key = (hidden.device, self.weight.dtype, self.weight.shape[0])
        buf = _SCRATCH.get(key)
        if buf is None or buf.shape[0] < n:
            buf = _SCRATCH[key] = torch.empty((max(n, self.rows_per_matmul), key[2]), dtype=key[1], device=key[0])
        return buf[:n]

    def _shard_products(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out[:] = cap(x @ shard.T), by vocab slices (see `_summarise_rows`)."""
        vocab = out.shape[1]
        cols = COLS_PER_MATMUL if x.device.type == "cpu" else max(vocab, 1)
        starts = list(range(0, vocab, cols))
        if len(starts) > 1 and vocab - starts[-1] < cols // 4:  # no narrow last slice: another kernel
            starts.pop()
        for a, b in zip(starts, [*starts[1:], vocab]):
            torch.mm(x, self.weight[a:b].T, out=out[:, a:b])
            self._cap(out[:, a:b])
        return out

    def _summarise_rows(
        self, hidden: torch.Tensor, targets: torch.Tensor, k: int, final: torch.Tensor | None, per: int
    ) -> LensSummary:
        n = hidden.shape[0]
        x, z_all = self.norm(hidden), self._logits_buffer(n, hidden)
        # On a CPU, vocab slices of COLS_PER_MATMUL keep each product's output in cache (~9% less time
        # per row than one call, the same values for the vocabularies tested); a GPU takes the
        # whole shard in one call.
        self._shard_products(x, z_all)
        vocab = z_all.shape[1]
        kk = min(k, vocab)
        local_t = targets.to(z_all.device) - self.vocab_offset
        in_shard = (local_t >= 0) & (local_t < vocab)
        local_t = local_t.clamp(0, vocab - 1)
        dev = z_all.device
        top_vals, top_ids = torch.empty(n, kk, device=dev), torch.empty(n, kk, dtype=torch.long, device=dev)
        log_sum, mean_z, target_logit = (torch.empty(n, device=dev) for _ in range(3))
        rank = torch.empty(n, dtype=torch.long, device=dev)
        if final is not None:
            f_max, ef, f_sum, f_mean = self._final_shard(final, vocab, dev)
            cross = torch.empty(n, device=dev)  # E_{p_f}[z_lens] over this shard, per row
            position = torch.arange(n, device=dev) // per
        for i in range(0, n, self.rows_per_pass):
            rows = slice(i, i + self.rows_per_pass)
            z = z_all[rows].float()
            if final is not None:
                cross[rows] = (ef[position[rows]] * z).sum(-1) / f_sum[position[rows]]
            vals, ids = z.topk(kk, dim=-1)  # vals[:, 0] is the row max
            p = torch.softmax(z, dim=-1)  # exp(z - max) / S, so p at the argmax is exactly 1 / S
            p_max = p.gather(1, ids[:, :1])[:, 0]
            log_sum[rows] = -torch.log(p_max)  # log S = log sum exp(z - max)
            mean_z[rows] = (p * z).sum(-1)  # E_p[z] over this shard
            t_logit = z.gather(1, local_t[rows, None])[:, 0]
            t_logit = torch.where(in_shard[rows], t_logit, torch.full_like(t_logit, -torch.inf))
            target_logit[rows] = t_logit
            if self.tp_size == 1:  # with shards, counted after the target logit is merged
                rank[rows] = (z > t_logit[:, None]).sum(-1, dtype=torch.int32)
            top_vals[rows], top_ids[rows] = vals, ids + self.vocab_offset
        local_max = top_vals[:, 0]
        if final is not None:  # per row: this shard's log-mass of the final distribution and its means
            f_lse = (f_max + torch.log(f_sum))[position]
            f_mean = f_mean[position]
        if self.tp_size > 1:
            top_vals, top_ids, target_logit, lse, mean_z, rank = self._merge_shards(
                z_all, k, local_max, log_sum, mean_z, top_vals, top_ids, target_logit, rank
            )
            if final is not None:  # the same merge for the final distribution: shards weighted by mass
                f_lse, f_mean, cross = self._merge_final(f_lse, f_mean, cross, z_all.device)
        else:
            lse = local_max + log_sum
        # KL(p_f || p) = sum p_f (log p_f - log p) = (E_f[z_f] - lse_f) - (E_f[z] - lse)
        kl = None if final is None else (f_mean - f_lse) - (cross - lse)
        return LensSummary(
            topk_ids=top_ids.to(torch.int32),
            topk_logprobs=top_vals - lse[:, None],
            entropy=lse - mean_z,  # H = lse - E_p[z]
            target_logprob=target_logit - lse,
            target_rank=rank.to(torch.int32).reshape(n),
            kl_to_final=kl,
        )

    def _final_shard(self, final: torch.Tensor, vocab: int, dev) -> tuple[torch.Tensor, ...]:
        """The final distribution's shard, once per position: p_f = e_f / S_f. Returns its max
        logit, e_f [positions, vocab shard], S_f and E_{p_f}[z_f] over this shard."""
        # final is already final-normed (the last stage's output), so only the head runs here.
        zf = self._shard_products(final.to(self.weight.dtype), torch.empty(
            (final.shape[0], vocab), dtype=self.weight.dtype, device=dev)).float()  # fmt: skip
        f_max = zf.max(dim=-1).values
        ef = torch.exp(zf - f_max[:, None])  # [positions, vocab shard]
        f_sum = ef.sum(-1)
        f_mean = (ef * zf).sum(-1) / f_sum  # E_{p_f}[z_f] over this shard
        return f_max, ef, f_sum, f_mean

    def _merge_shards(self, z_all, k, local_max, log_sum, mean_z, top_vals, top_ids, target_logit, rank):
        """Merge the vocab shards' summaries across the stage's TP ranks: returns the global
        top-k values and ids, target logit, logsumexp, E_p[z] and target rank."""
        n = z_all.shape[0]
        # Merge the shards: each reports (max, S, E_p[z]); the global logsumexp rescales S,
        # and the global E_p[z] is the S-weighted mean of the shards' E_p[z].
        stats = _comm(torch.stack([local_max, log_sum, mean_z], dim=-1))
        gathered = [torch.empty_like(stats) for _ in range(self.tp_size)]
        dist.all_gather(gathered, stats)
        stats = torch.stack(gathered).to(z_all.device)  # [tp, n, 3]
        vals = [torch.empty_like(_comm(top_vals)) for _ in range(self.tp_size)]
        ids = [torch.empty_like(_comm(top_ids)) for _ in range(self.tp_size)]
        dist.all_gather(vals, _comm(top_vals))
        dist.all_gather(ids, _comm(top_ids))
        all_vals, all_ids = torch.cat(vals, -1).to(z_all.device), torch.cat(ids, -1).to(z_all.device)
        top_vals, pick = all_vals.topk(k, dim=-1)
        top_ids = all_ids.gather(1, pick)
        t = _comm(target_logit)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        target_logit = t.to(z_all.device)
        shard_lse = stats[..., 0] + stats[..., 1]  # [tp, n]
        lse = torch.logsumexp(shard_lse, dim=0)
        weights = torch.exp(shard_lse - lse)  # each shard's share of the probability mass
        mean_z = (weights * stats[..., 2]).sum(0)
        # Each shard counts its logits above the *global* target logit; the counts add up.
        for i in range(0, n, self.rows_per_pass):
            rows = slice(i, i + self.rows_per_pass)
            rank[rows] = (z_all[rows].float() > target_logit[rows, None]).sum(-1, dtype=torch.int32)
        r = _comm(rank)
        dist.all_reduce(r)
        rank = r.to(z_all.device)
        return top_vals, top_ids, target_logit, lse, mean_z, rank

    def _merge_final(self, f_lse, f_mean, cross, device) -> tuple[torch.Tensor, ...]:
        """The shards' merge for the final distribution, weighted by each shard's mass: returns
        the global lse_f, E_f[z_f] and E_f[z_lens] per row."""
        f = _comm(torch.stack([f_lse, f_mean, cross], dim=-1))
        parts = [torch.empty_like(f) for _ in range(self.tp_size)]
        dist.all_gather(parts, f)
        f = torch.stack(parts).to(device)  # [tp, n, 3]
        f_lse = torch.logsumexp(f[..., 0], dim=0)
        w = torch.exp(f[..., 0] - f_lse)
        return f_lse, (w * f[..., 1]).sum(0), (w * f[..., 2]).sum(0)
