"""The executor's grid fallback (a method that refuses ``find_radius`` is certified at each grid
radius in turn): the largest certified grid radius for a deterministic method; refused for a
probabilistic one, whose best of k tests would hold only at confidence 1 - k alpha."""
from __future__ import annotations

import torch

import verify.api
from verify.certificate import Certificate
from verify.executor import Task, run_task
from verify.spec import SpecError


def _fake_certify(limit: float):
    """Certifies every input up to radius ``limit``; refuses a radius search."""
    def certify(model, x, labels, method, *, eps=0.0, find_radius=False, **kw):
        if find_radius:
            raise SpecError(f"{method} decides one set at a time")
        status = "certified" if eps <= limit else "unknown"
        return [Certificate(method=method, guarantee="deterministic", status=status, index=i, norm="linf", eps=eps,
                            radius=eps if status == "certified" else 0.0) for i in range(len(x))]
    return certify


def _task(method: str) -> Task:
    return Task(method=method, options={}, model=None, x=torch.zeros(2, 3), labels=torch.zeros(2, dtype=torch.long),
                indices=[5, 6], eps=0.1, grid=[0.1, 0.2, 0.3, 0.4])


def test_grid_gives_the_largest_certified_radius_of_a_deterministic_method(monkeypatch):
    monkeypatch.setattr(verify.api, "certify", _fake_certify(0.3))
    certs = run_task(_task("bab"))
    assert [c.index for c in certs] == [5, 6]
    assert all(c.status == "certified" and c.radius == 0.3 and c.details["radius_search"] == "grid" for c in certs)


def test_grid_is_refused_for_a_probabilistic_method(monkeypatch):
    monkeypatch.setattr(verify.api, "certify", _fake_certify(0.3))
    certs = run_task(_task("smoothing-gaussian"))
    assert all(c.status == "error" and "one set at a time" in c.details.get("error", str(c.details)) for c in certs)
