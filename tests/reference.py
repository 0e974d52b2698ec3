"""Plain-Python references the tests hold the library against (kept out of the package)."""

from __future__ import annotations

import itertools
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """Records every op run under it (forward and backward): its name, and the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def reference_slots(gates: list[list[float]], k: int, capacity: int, bpr: bool) -> list[list[tuple[int, int | None]]]:
    """For one group: per token, its K (expert, slot-or-None) choices, by the V-MoE paper's rules, with loops."""
    num_tokens = len(gates)
    choices = []
    for row in gates:  # top-K, ties to the lower expert index
        ranked = sorted(range(len(row)), key=lambda e: (-row[e], e))
        choices.append(ranked[:k])
    order = list(range(num_tokens))
    if bpr:  # stable: equal top-1 gates keep group order
        order = sorted(order, key=lambda t: -gates[t][choices[t][0]])
    filled: dict[int, int] = {}
    result: list[list[tuple[int, int | None]]] = [[(-1, None)] * k for _ in range(num_tokens)]
    for rank in range(k):
        for t in order:
            e = choices[t][rank]
            slot = filled.get(e, 0)
            filled[e] = slot + 1
            result[t][rank] = (e, slot if slot < capacity else None)
    return result


def einsum_moe(x_GSD: torch.Tensor, gates_GSE: torch.Tensor, k: int, capacity: int, bpr: bool, experts) -> torch.Tensor:
    """One-hot einsum dispatch and combine (the official JAX way) from reference_slots."""
    G, S, D = x_GSD.shape
    E = gates_GSE.shape[-1]
    dispatch = torch.zeros(G, S, E, capacity)
    for g in range(G):
        for s, row in enumerate(reference_slots(gates_GSE[g].tolist(), k, capacity, bpr)):
            for e, slot in row:
                if slot is not None:
                    dispatch[g, s, e, slot] = 1.0
    combine = dispatch * gates_GSE.unsqueeze(-1)  # gradient reaches the gates through combine
    buffers = torch.einsum("gsec,gsd->egcd", dispatch, x_GSD).reshape(E, G * capacity, D)
    out = experts(buffers).view(E, G, capacity, D)
    return torch.einsum("egcd,gsec->gsd", out, combine)


def simplex_projection(values: list[float]) -> list[float]:
    """Euclidean projection onto the probability simplex: p = max(v - tau, 0) with tau found by bisection so that
    p sums to 1 (no sorting, unlike the fast code)."""
    low, high = min(values) - 1.0, max(values)  # the mass is >= 1 at low, 0 at high
    for _ in range(200):
        tau = (low + high) / 2
        low, high = (tau, high) if sum(max(v - tau, 0.0) for v in values) > 1 else (low, tau)
    return [max(v - (low + high) / 2, 0.0) for v in values]


def sparse_simplex_projection(values: list[float], k: int) -> list[float]:
    """The nearest point of the simplex with at most k non-zeros, by trying every support of k entries."""
    best, best_distance = [], math.inf
    for support in itertools.combinations(range(len(values)), k):
        point = [0.0] * len(values)
        for i, p in zip(support, simplex_projection([values[i] for i in support]), strict=True):
            point[i] = p
        distance = sum((p - v) ** 2 for p, v in zip(point, values, strict=True))
        if distance < best_distance:
            best, best_distance = point, distance
    return best
