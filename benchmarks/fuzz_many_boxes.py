"""Fuzzing the batched input splitting of many boxes (`relax.bab.many_boxes`) for false answers.

Random networks of the mscn pattern (per-row ReLU MLP features times a fixed 0/1 mask, a masked
mean, an MLP head; or a plain ReLU MLP) at weight scales 1, 1e2 and 1e3; per network 48 boxes that
fix all inputs but 1-3 (widths from 1e-6 to 0.5), each with a property ``y > t`` or ``y < t`` whose
threshold lies, for half the boxes, up to 30 % of the sampled range past the sampled extreme (mostly
true, some barely) and, for the others, inside the sampled range (false). A
*false proof* is a proved box with a sampled or PGD point that violates it; a *false candidate* a
candidate outside its box or whose output does not violate. Also counted: boxes left open although
one of their 2,000 sampled points violates (counterexamples the stage missed: not wrong, slower). Usage::

    python benchmarks/fuzz_many_boxes.py --nets 20 --seed 0
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from relax.bab.many_boxes import split_many_boxes
from relax.ir.graph import build_graph
from verify.attack import pgd_attack
from verify.spec import Box, LinearSpec

ROWS, FEATS = 4, 5  # input [ROWS, FEATS + 1]: features, then the mask column


class _Net(nn.Module):
    def __init__(self, masked: bool, width: int, scale: float):
        super().__init__()
        self.masked = masked
        self.f = nn.Sequential(nn.Linear(FEATS, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(width if masked else ROWS * width, width), nn.ReLU(), nn.Linear(width, 1))
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(scale)

    def forward(self, x):
        x = x.reshape(-1, ROWS, FEATS + 1)
        h = self.f(x[..., :FEATS])
        if self.masked:
            m = x[..., FEATS:]
            return self.head((h * m).sum(1) / m.sum(1))
        return self.head(h.flatten(1))


def _boxes(M: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(M, ROWS, FEATS + 1, generator=g, dtype=torch.float64)
    x[..., FEATS] = (torch.rand(M, ROWS, generator=g) < 0.6).double()
    x[:, 0, FEATS] = 1.0
    lo, hi = x.reshape(M, -1).clone(), x.reshape(M, -1).clone()
    for m in range(M):
        cols = torch.randperm(FEATS, generator=g)[: 1 + int(torch.randint(3, (1,), generator=g))]
        width = 10 ** float(torch.empty(1).uniform_(-6, -0.3, generator=g))
        hi[m, cols] = lo[m, cols] + width
    return lo, hi


def one_net(masked: bool, scale: float, seed: int, M: int = 48) -> dict[str, int]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _Net(masked, int(torch.randint(8, 40, (1,), generator=g)), scale).double().eval()
    graph = build_graph(torch.fx.symbolic_trace(net), (ROWS, FEATS + 1), torch.float64)
    lo, hi = _boxes(M, g)
    with torch.no_grad():
        ys = torch.stack([net(lo[m] + (hi[m] - lo[m]) * torch.rand(2_000, lo.shape[1], generator=g, dtype=torch.float64)).squeeze(1)
                          for m in range(M)])  # [M, 2000]
    span = (ys.amax(1) - ys.amin(1)).clamp(min=1e-12)
    sign = torch.where(torch.rand(M, generator=g) < 0.5, 1.0, -1.0).double()  # y > t or y < t
    u = torch.rand(M, generator=g, dtype=torch.float64)
    past = torch.rand(M, generator=g) < 0.5  # half the thresholds past the sampled extreme (likely true), half inside
    offset = torch.where(past, -0.3 * span * u, span * u)  # from the extreme the property needs, inwards positive
    t = torch.where(sign > 0, ys.amin(1) + offset, ys.amax(1) - offset)
    C, d = sign.reshape(M, 1, 1), (-sign * t).reshape(M, 1)
    r = split_many_boxes(graph, lo, hi, C, d, torch.zeros(1, dtype=torch.long), stop_at=time.perf_counter() + 20)
    out = {"boxes": M, "proved": int(r.proved.sum()), "candidates": len(r.candidates), "false_proofs": 0, "false_candidates": 0}
    sampled_false = ((sign.unsqueeze(1) * (ys - t.unsqueeze(1))) <= 0).any(1)
    decided = r.proved | torch.tensor([m in r.candidates for m in range(M)])
    out["open_with_sampled_violation"] = int((~decided & sampled_false).sum())  # missed counterexamples (not wrong)
    groups = torch.zeros(1, dtype=torch.long)
    for m in r.proved.nonzero().flatten().tolist():
        spec = LinearSpec(C[m:m + 1], d[m:m + 1], groups)
        adv = pgd_attack(net, Box(lo[m:m + 1], hi[m:m + 1]), spec, steps=30, restarts=3)
        if bool(((sign[m] * (ys[m] - t[m])) <= 0).any()) or bool(adv.found[0]) or float(adv.margin[0]) <= 0:
            out["false_proofs"] += 1
    for m, x in r.candidates.items():
        with torch.no_grad():
            v = float(sign[m] * (net(x.unsqueeze(0)).squeeze() - t[m]))
        if v > 0 or bool((x < lo[m]).any()) or bool((x > hi[m]).any()):
            out["false_candidates"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", type=int, default=10, help="networks per (kind, scale)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    total: dict[str, int] = {}
    for scale in (1.0, 1e2, 1e3):
        for masked in (True, False):
            for k in range(a.nets):
                res = one_net(masked, scale, a.seed * 100_000 + k + int(1000 * masked) + int(scale))
                for key, v in res.items():
                    total[key] = total.get(key, 0) + v
        print(f"scale {scale:g}: {total}", flush=True)
    print("false answers:", total["false_proofs"] + total["false_candidates"])


if __name__ == "__main__":
    main()
