"""The entry stage of ``bab`` (``relax/bab/entry_proofs.py``) on a small segmentation head whose
property counts the pixels that keep the mask's class (carvana_unet_2022's form): each pixel's
exact robustness comes from the ``milp`` method on that pixel's margin alone. The count of the
robust pixels is certified (where the first CROWN pass cannot: the stage decides it); one more
than a count that a sampled point reaches is never certified."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import load_benchmark
from verify import certify
from verify.spec import Box

stage_soundness = load_benchmark("entry_stage_soundness")  # the heads' count, pixels and exact robustness
Count = stage_soundness.Count

D = torch.float64
H = W = 5


class Margins(nn.Module):
    """``[B, 2, H, W]`` image -> ``[B, H W]`` logit margins (class 1 minus class 0) per pixel."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.c1, self.c2 = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        z = self.c2(torch.relu(self.c1(x)))
        return (z[:, 1] - z[:, 0]).flatten(1)


def _instance(seed: int, eps: float):
    margins = Margins(seed).double()
    img = torch.rand(1, 2, H, W, dtype=D)
    with torch.no_grad():
        m0 = margins(img)[0]
    mask = (m0 > 0).to(D).reshape(1, 1, H, W)
    lo, hi = torch.cat([img - eps, mask], 1), torch.cat([img + eps, mask], 1)
    return margins, m0, lo, hi


@pytest.mark.parametrize("seed,eps", [(0, 0.04), (3, 0.12)])
def test_the_robust_pixels_count_is_certified_and_one_more_is_not(seed, eps):
    margins, m0, lo, hi = _instance(seed, eps)
    net = Count(margins).double()
    robust = stage_soundness.exact_robust(margins, m0, lo, hi)
    assert robust is not None  # every pixel's MILP decided
    assert 0 < robust < H * W  # some pixels flip, some do not
    crown = certify(net, Box(lo, hi), stage_soundness.at_least(robust), "crown", dtype=D)
    assert crown[0].status == "unknown"  # the whole image's relaxation does not decide enough pixels
    c = certify(net, Box(lo, hi), stage_soundness.at_least(robust), "bab", timeout=60)
    assert c[0].status == "certified" and c[0].details["stage"] == "entries", c[0].details
    # a count below ``robust + 1`` is reached where the flippable pixels flip together, or not:
    # in no case may more than the robust pixels be certified with a sampled point below it
    pts = lo + (hi - lo) * torch.rand(20000, *lo.shape[1:], dtype=D)
    with torch.no_grad():
        reached = int(net(pts).min())
    assert reached >= robust
    bad = certify(net, Box(lo, hi), stage_soundness.at_least(reached + 1), "bab", timeout=30)
    assert bad[0].status != "certified"


class Transposed(nn.Module):
    """``[B, 2, 8]`` -> the count of positions where ``relu(conv(relu(conv(x))))``, transposed to
    ``[B, 8, 2]``, exceeds 0.1: the steps' inputs are a transpose of ReLU outputs (strided boxes)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.c, self.d = nn.Conv1d(2, 6, 3, padding=1), nn.Conv1d(6, 2, 3, padding=1)
        self.register_buffer("at_zero", torch.tensor(0.0))

    def forward(self, x):
        h = torch.relu(self.d(torch.relu(self.c(x)))).permute(0, 2, 1) - 0.1
        return torch.heaviside(h, self.at_zero).sum((1, 2)).unsqueeze(1)


def test_steps_of_a_transposed_layer_are_decided_and_a_reached_count_plus_one_is_not():
    net = Transposed(0).double()
    torch.manual_seed(0)
    x = torch.rand(1, 2, 8, dtype=D)
    lo, hi = x - 0.1, x + 0.1
    with torch.no_grad():
        reached = int(net(lo + (hi - lo) * torch.rand(20000, 2, 8, dtype=D)).min())
    assert certify(net, Box(lo, hi), stage_soundness.at_least(reached + 1), "bab", timeout=30)[0].status != "certified"
    c = certify(net, Box(lo, hi), stage_soundness.at_least(reached - 3), "bab", timeout=30)[0]
    assert c.status in ("certified", "unknown") and "error" not in c.details


def test_the_stage_ends_on_time_when_every_entry_search_uses_its_whole_budget(monkeypatch):
    """Each entry's search sleeps through the seconds it is given and proves nothing: the stage
    must hand out budgets that end by its own deadline, and ``bab`` answers by its timeout."""
    import time

    import relax.methods.bab as bab_method
    from relax.bab import BabResult

    margins, m0, lo, hi = _instance(0, 0.04)
    robust = stage_soundness.exact_robust(margins, m0, lo, hi)
    assert robust is not None  # every pixel's MILP decided
    real, given = bab_method.run_bab, []

    def slow(model, inputs, spec, opts, timeout=None, root_boxes=None):
        if root_boxes is None:
            return real(model, inputs, spec, opts, timeout=timeout, root_boxes=root_boxes)
        given.append(timeout)
        time.sleep(timeout)
        return BabResult("unknown", None, -1.0, 1, reason="timeout")

    monkeypatch.setattr(bab_method, "run_bab", slow)
    t0 = time.perf_counter()
    c = certify(Count(margins).double(), Box(lo, hi), stage_soundness.at_least(robust), "bab", timeout=4)[0]
    elapsed = time.perf_counter() - t0
    assert given, "the entry stage did not start"
    assert c.status == "unknown" and c.details["entries"]["proved"] == 0, c.details
    assert all(s > 0 for s in given) and elapsed < 4 + 1.0, (elapsed, given)


def test_a_search_given_its_boxes_keeps_them_at_the_root_and_one_not_given_tightens_them():
    """``run_bab(..., root_boxes=)`` (the entry stage's sub-searches): the root alpha-CROWN keeps the
    boxes it was given (``FirstPass.given``); a pass of its own optimises them, and both hold."""
    from relax.bab import RowSpec
    from relax.bounds import prepare
    from relax.bounds.crown import crown
    from relax.methods.bab import BabOptions, FirstPass, _root_alpha_crown

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 1)).double()
    x = torch.rand(1, 4, dtype=D)
    graph, x_set = prepare(net, Box(x - 0.4, x + 0.4), D)
    rs = RowSpec(torch.ones(1, 1, dtype=D), torch.zeros(1, dtype=D), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        boxes = crown(graph, x_set, rs.batch(1)[0]).intermediate
    deeper = graph.preactivations()[-1]  # the second ReLU's input: alpha-CROWN's own pass tightens it
    kept = _root_alpha_crown(graph, x_set, rs, BabOptions(), 10.0, FirstPass(boxes, 0.0, given=True)).intermediate
    own = _root_alpha_crown(graph, x_set, rs, BabOptions(), 10.0, FirstPass(boxes, 0.0)).intermediate
    assert all(torch.equal(kept[k][i], boxes[k][i]) for k in boxes for i in (0, 1))
    assert float((own[deeper][1] - own[deeper][0]).sum()) < float((boxes[deeper][1] - boxes[deeper][0]).sum())
    pts = (x - 0.4) + 0.8 * torch.rand(5000, 4, dtype=D)
    inner = net[2](net[1](net[0](pts)))
    for lo, hi in (kept[deeper], own[deeper]):
        assert (inner >= lo - 1e-9).all() and (inner <= hi + 1e-9).all()
