"""Expert parallelism: the experts of every MoE layer spread over the N ranks of a group, tokens sent to them.

Shape letters: E experts, N ranks of the expert group, L = E / N local experts, R rows per expert (the
groups' capacity slots, G*C), D width.

Each rank routes its own tokens into fixed `[E, R, D]` buffers exactly as on one process. One
`all_to_all_single` with equal splits sends rows of expert e to rank e // L, which receives `[N, L, R, D]`
(the rows of its experts from every rank of the group), runs its L experts over `[L, N*R, D]` in one batched
matmul, and a second all_to_all of equal splits brings the outputs back. Backward mirrors both exchanges. The
buffers' size is fixed by the capacity before the data arrives, so nothing here reads a value back to the host.

Checkpoints always hold the full `[E, ...]` expert tensors: `local_slice` cuts a rank's part out of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ExpertGroup:
    """The ranks that together hold one copy of every expert."""

    group: dist.ProcessGroup  # the N ranks exchanging tokens
    size: int  # N
    rank: int  # this rank's place in the group: it holds experts rank*L .. rank*L + L - 1

    def local_experts(self, num_experts: int) -> slice:
        """The experts this rank holds."""
        per_rank = num_experts // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with equal splits over the first axis; its own inverse, so backward is the same call."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_to_all(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Chunk i of `x`'s first axis goes to rank i of `group`; chunk j of the result came from rank j."""
    return _AllToAll.apply(x, group)


def send_to_owners(buffers_ERD: Tensor, ep: ExpertGroup) -> Tensor:
    """This rank's expert buffers -> the rows every rank of the group has for this rank's experts.  [L, N*R, D]"""
    E, R, D = buffers_ERD.shape
    N, L = ep.size, E // ep.size
    received_NLRD = all_to_all(buffers_ERD, ep.group).view(N, L, R, D)
    return received_NLRD.transpose(0, 1).reshape(L, N * R, D)


def return_to_senders(out_LXD: Tensor, ep: ExpertGroup) -> Tensor:
    """The inverse of `send_to_owners`: this rank's experts' outputs back to the ranks that sent the rows.  [E, R, D]"""
    L, NR, D = out_LXD.shape
    N = ep.size
    out_NLRD = out_LXD.view(L, N, NR // N, D).transpose(0, 1).contiguous()
    return all_to_all(out_NLRD, ep.group).view(N * L, NR // N, D)


def local_slice(full_E: Tensor, ep: ExpertGroup | None) -> Tensor:
    """This rank's part of a full `[E, ...]` expert tensor (all of it without expert parallelism)."""
    return full_E if ep is None else full_E[ep.local_experts(full_E.shape[0])]


def agreed_rows(rows: int, ep: ExpertGroup, device: torch.device) -> int:
    """The most rows any rank of the group has per expert, for evaluation, where batches may differ in size (the
    last one, or a rank padding with dummy passes): every rank pads its buffers to it. One small collective and a
    read-back, so training, whose micro-batches all have one size, never calls it."""
    most = torch.tensor([rows], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=ep.group)
    return int(most.item())
