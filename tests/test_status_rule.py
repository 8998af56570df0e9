"""The one status rule (verify/status_rule.py) that every method's answer passes: planted wrong
answers of a rogue method are caught, right ones pass unchanged."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from verify import registry
from verify.certificate import Certificate
from verify.options import Options, option
from verify.registry import Method, list_methods
from verify.spec import LpBall, Robust


def _model() -> nn.Module:
    """y = (x0, x1): class 0 iff x0 > x1."""
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.eye(2))
        m.bias.zero_()
    return m.eval()


@dataclass(frozen=True, kw_only=True)
class _AnswerOptions(Options):
    answers: Any = option((), "the planted answers")


class Rogue(Method):
    """Answers whatever the test plants: ``answers`` is a list of (status, counterexample, certifies)."""

    name = "rogue"

    opts: _AnswerOptions

    def decide(self, model, inputs, prop, call):
        return [Certificate(method=self.name, guarantee="deterministic" if how == "base" else "probabilistic",
                            confidence=1.0 if how == "base" else 0.999, certifies=how, status=status, index=b,
                            counterexample=cex)
                for b, (status, cex, how) in enumerate(self.opts.answers)]


class RogueChild(Rogue):
    name = "rogue-child"

    def decide(self, model, inputs, prop, call):
        return super().decide(model, inputs, prop, call)


def _ball(*centres, eps=0.1):
    return LpBall(torch.tensor(centres, dtype=torch.float32), eps, float("inf"))


def test_a_false_falsification_becomes_unknown():
    ball = _ball([0.8, 0.2], [0.8, 0.2])  # label 0 holds on the whole ball
    certs = Rogue(answers=[("falsified", [0.8, 0.2], "base"), ("falsified", None, "base")]).certify(_model(), ball, Robust(0))
    assert [c.status for c in certs] == ["unknown", "unknown"]
    assert all(c.counterexample is None and "status_rule" in c.details for c in certs)


def test_a_true_counterexample_just_outside_is_projected_and_kept():
    ball = _ball([0.52, 0.48], eps=0.05)  # x = (0.47, 0.53) violates label 0 and is inside
    outside = [0.47 - 1e-6, 0.53 + 1e-6]  # a rounding step outside the ball
    (c,) = Rogue(answers=[("falsified", outside, "base")]).certify(_model(), ball, Robust(0))
    assert c.status == "falsified"
    x = torch.tensor(c.counterexample, dtype=torch.float64).reshape(1, 2)
    assert bool(ball.to(dtype=torch.float64).contains(x, tol=0.0)[0]) and float(x[0, 0]) <= float(x[0, 1])


def test_a_certificate_contradicted_at_the_centre_is_an_error():
    ball = _ball([0.2, 0.8], [0.8, 0.2])  # the first centre is misclassified for label 0
    certs = Rogue(answers=[("certified", None, "base"), ("certified", None, "base")]).certify(_model(), ball, Robust(0))
    assert [c.status for c in certs] == ["error", "certified"]
    assert "unsound" in certs[0].details["status_rule"]


def test_claims_about_the_smoothed_classifier_pass_unchanged():
    ball = _ball([0.2, 0.8])
    (c,) = Rogue(answers=[("certified", None, "smoothed")]).certify(_model(), ball, Robust(0))
    assert c.status == "certified"


def test_the_rule_runs_once_per_call(monkeypatch):
    calls = []
    real = registry.enforce_status_rule
    monkeypatch.setattr(registry, "enforce_status_rule", lambda *a, **k: calls.append(1) or real(*a, **k))
    RogueChild(answers=[("unknown", None, "base")]).certify(_model(), _ball([0.8, 0.2]), Robust(0))
    assert len(calls) == 1


@pytest.mark.parametrize("name", sorted(list_methods()))
def test_every_registered_method_answers_through_the_one_pipeline(name):
    assert list_methods()[name].certify is Method.certify


def test_a_method_cannot_replace_the_pipeline():
    with pytest.raises(TypeError, match="define decide"):
        class _Bypass(Method):  # noqa: F841
            def certify(self, model, inputs, prop, **kwargs):
                return []


def test_the_rule_reuses_the_methods_clean_outputs(monkeypatch):
    """A method that computed the outputs at the centres (``call.clean()``) hands them to the
    rule: no second batched forward pass."""
    passes = []
    model = _model()
    model.register_forward_hook(lambda m, i, o: passes.append(i[0].shape[0]))

    class _Clean(Rogue):
        def decide(self, model, inputs, prop, call):
            call.clean()
            return super().decide(model, inputs, prop, call)

    for cls in (Rogue, _Clean):
        passes.clear()
        certs = cls(answers=[("certified", None, "base")] * 2).certify(model, _ball([0.8, 0.2], [0.7, 0.3]), Robust(0))
        assert [c.status for c in certs] == ["certified"] * 2
        assert passes == [2], (cls.__name__, passes)  # one batched pass at the two centres, either way
