"""Branch-and-bound (complete verification): the shared result type and the property in tensor
form. (Counterexamples are sought with the project's falsifier, :mod:`verify.attack`.)

Conventions (see :class:`verify.spec.LinearSpec`): rows ``C y + d`` (``C [N, K]``, ``d [N]``)
with a group per row; the property holds at ``y`` iff every group has a row ``> 0``. The
*margin* of a domain is ``min over groups of max over rows in the group`` of the rows' lower
bounds: the domain is proved when it exceeds the float-safety margin, and a point ``x`` is a
counterexample when the margin of its exact output is ``<= 0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


__all__ = ["BabResult", "RowSpec"]


@dataclass
class BabResult:
    """Outcome of one branch-and-bound run on one input box and one property.

    Attributes:
        status: ``"certified"``, ``"falsified"`` or ``"unknown"``.
        counterexample: flattened input ``[n_0]`` (float64) with ``status="falsified"``.
        lower: a lower bound of the property margin over the whole box (``> 0`` when
            certified; for unknown, the best bound reached; ``-inf`` if none).
        domains: number of domains bounded.
        time_s: wall time.
        reason: why the search stopped (``"proved"``, ``"counterexample"``, ``"timeout"``,
            ``"memory"``, ...).
    """

    status: str
    counterexample: Tensor | None = None
    lower: float = -math.inf
    domains: int = 0
    time_s: float = 0.0
    reason: str = ""
    details: dict = field(default_factory=dict)


@dataclass
class RowSpec:
    """One property in tensor form: ``C [N, K]``, ``d [N]``, ``groups [N]`` (long)."""

    C: Tensor
    d: Tensor
    groups: Tensor

    @property
    def num_groups(self) -> int:
        return int(self.groups.max()) + 1

    def group_max(self, rows: Tensor) -> Tensor:
        """``[..., N] -> [..., G]``: max of the rows of each group."""
        out = torch.full((*rows.shape[:-1], self.num_groups), -math.inf, dtype=rows.dtype, device=rows.device)
        return out.scatter_reduce(-1, self.groups.to(rows.device).expand_as(rows), rows, reduce="amax")

    def margin(self, rows: Tensor) -> Tensor:
        """``[..., N] -> [...]``: min over groups of the group max (> 0 iff it holds)."""
        return self.group_max(rows).amin(-1)

    def values(self, y: Tensor) -> Tensor:
        """Rows at outputs ``y [B, K]`` -> ``[B, N]``."""
        return y.to(self.C.dtype) @ self.C.T + self.d

    def batch(self, B: int) -> tuple[Tensor, Tensor]:
        """``C [B, N, K]`` and ``d [B, N]`` (expanded views)."""
        return self.C.unsqueeze(0).expand(B, -1, -1), self.d.unsqueeze(0).expand(B, -1)

    def to(self, dtype: torch.dtype) -> "RowSpec":
        return RowSpec(self.C.to(dtype), self.d.to(dtype), self.groups)

    def open_part(self, rows: Tensor, margin: float) -> tuple["RowSpec", Tensor, float]:
        """The property without the groups that lower bounds ``rows [N]`` (valid on the whole
        input set) already prove (group max ``> margin``): each domain of the set lies in it, so
        those groups hold on every domain and the search need not bound them again.

        Returns the spec of the open groups (renumbered ``0..G'-1``), the indices ``[N']`` of its
        rows in this spec, and the least group max of the dropped groups (``inf`` if none): the
        property's margin on a domain is the smaller of that and the open spec's margin."""
        gmax = self.group_max(rows.to(self.C.dtype).reshape(-1))
        open_ = ~(gmax > margin)
        floor = float(gmax[~open_].min()) if bool((~open_).any()) else math.inf
        return (*self.select_groups(open_), floor)

    def best_rows(self, rows: Tensor, k: int) -> tuple["RowSpec", Tensor]:
        """The property with only the ``k`` rows of each group whose lower bounds ``rows [N]`` are
        highest (an undefined bound counts as ``-inf``), in their order, and their indices ``[N']`` in this spec.

        Sound on any subset: a group holds where one of its rows is ``> 0``, so the max of the
        kept rows' lower bounds is still a lower bound that proves the group. What is lost is
        only the chance that a dropped row becomes its group's best on some domain."""
        r = rows.to(self.C.dtype).reshape(-1).to(self.groups.device).nan_to_num(nan=-math.inf)
        keep = []
        for grp in range(self.num_groups):
            idx = (self.groups == grp).nonzero().squeeze(1)
            keep.append(idx[torch.topk(r[idx], min(k, idx.numel()), sorted=False).indices])
        chosen = torch.sort(torch.cat(keep)).values
        return RowSpec(self.C[chosen], self.d[chosen], self.groups[chosen]), chosen

    def select_groups(self, chosen: Tensor) -> tuple["RowSpec", Tensor]:
        """The property of the groups with ``chosen [G]`` true (renumbered ``0..G'-1`` in order)
        and the indices ``[N']`` of its rows in this spec."""
        chosen = chosen.to(self.groups.device)
        keep = chosen[self.groups].nonzero().squeeze(1)
        renumber = torch.cumsum(chosen.long(), 0) - 1
        return RowSpec(self.C[keep], self.d[keep], renumber[self.groups[keep]]), keep

    def with_averages(self, max_rows: int = 6) -> "RowSpec":
        """The same property with extra rows: in every group of 2..``max_rows`` rows, the
        average of each pair and of the whole group (just the whole group's average for larger
        groups). A convex combination of a group's rows is at most their max, so it may stand
        in for the group -- and its CROWN bound is often positive where no single row's is
        (rows that take turns being the largest across the box). Margins are unchanged: all
        rows of a group ``<= 0`` iff all rows and averages are."""
        C, d, g = [self.C], [self.d], [self.groups]
        for grp in range(self.num_groups):
            rows = (self.groups == grp).nonzero().squeeze(1).tolist()
            if len(rows) < 2:
                continue
            combos = [rows] + ([[i, j] for a, i in enumerate(rows) for j in rows[a + 1 :]] if len(rows) <= max_rows else [])
            if len(rows) == 2:
                combos = [rows]
            for c in combos:
                C.append(self.C[c].mean(0, keepdim=True))
                d.append(self.d[c].mean(0, keepdim=True))
                g.append(torch.tensor([grp], device=self.groups.device))
        return RowSpec(torch.cat(C), torch.cat(d), torch.cat(g))
