"""Typed method options (verify/options.py): declared once, checked, converted and explained."""
from __future__ import annotations

import inspect
import math
from dataclasses import FrozenInstanceError, dataclass

import pytest

from verify.cli import CLIError, main, parse_options
from verify.errors import OptionError
from verify.options import Options, option
from verify.registry import BoundMethod, get_method, list_methods


@dataclass(frozen=True, kw_only=True)
class _Sample(Options):
    steps: int = option(10, "steps", positive=True)
    rate: float = option(0.5, "a rate", interval=(0.0, 1.0, "right-open"))
    limit: float | None = option(None, "seconds", positive=True)
    mode: str = option("a", "the mode", choices=("a", "b"))
    flag: bool = option(False, "a switch")


@pytest.mark.parametrize("field, value, expected", [
    ("steps", 0, "expected a value > 0, got 0"),
    ("steps", 2.0, "expected an integer, got 2.0"),
    ("steps", True, "expected an integer, got True"),
    ("rate", 1.0, r"expected a value in \[0, 1\), got 1.0"),
    ("rate", -0.0 - 1e-9, r"expected a value in \[0, 1\)"),
    ("rate", math.nan, "expected a number, not NaN"),
    ("rate", "0.5", "expected a number, got '0.5'"),
    ("limit", -1, "expected a value > 0, got -1"),
    ("mode", "c", "expected one of a, b, got 'c'"),
    ("flag", 1, "expected true or false, got 1"),
    ("steps", None, "expected an integer, got None"),
])
def test_declared_type_and_range_are_checked(field, value, expected):
    with pytest.raises(OptionError, match=f"option {field} of owner: {expected}"):
        _Sample(**{field: value}).check("owner")


def test_values_that_fit_their_declaration_pass():
    _Sample(steps=3, rate=0, limit=None, mode="b", flag=True).check("owner")
    _Sample(rate=0, limit=2).check("owner")  # an int is a valid float; the closed end is in
    assert _Sample.defaults() == {"steps": 10, "rate": 0.5, "limit": None, "mode": "a", "flag": False}
    with pytest.raises(FrozenInstanceError):
        _Sample().steps = 3  # type: ignore[misc]


def test_every_registered_option_is_explained_and_its_default_passes_its_own_check():
    """``certify methods`` explains every option: each has help text, and the defaults fit
    their declarations (a default outside its declared range would make the method unbuildable)."""
    for name, cls in list_methods().items():
        for info in cls.Options.infos():
            assert len(info.help) > 10, f"{name}.{info.name} has no help text"
            info.check(name, info.default)
        sig = inspect.signature(cls)
        assert list(sig.parameters) == cls.option_names()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in sig.parameters.values())


def test_the_listing_shows_each_options_type_range_and_help(capsys):
    assert main(["methods", "bab", "smoothing-gaussian"]) == 0
    out = capsys.readouterr().out
    assert "split='auto'" in out and "(one of auto, input, relu)" in out
    assert "refine_after=0.1" in out and "(float, in [0, 1))" in out
    assert "alpha=0.001" in out and "(float, in (0, 1)) failure probability" in out
    assert "crown" not in out.split("options:")[0]  # only the methods named


def test_options_reach_the_method_as_attributes_and_in_its_certificates_details():
    m = get_method("alpha-crown", iterations=3, lr=0.05)
    assert (m.opts.iterations, m.opts.lr) == (3, 0.05)
    assert m.options() == {**list_methods()["alpha-crown"].option_defaults(), "iterations": 3, "lr": 0.05}
    with pytest.raises(TypeError, match="has no option 'iteration'; its options are: .*iterations"):
        get_method("alpha-crown", iteration=3)
    with pytest.raises(OptionError, match="option split of bab: expected one of auto, input, relu, got 'both'"):
        get_method("bab", split="both")


def test_a_method_with_its_own_init_is_refused():
    with pytest.raises(TypeError, match="declare the options in an Options dataclass"):
        class _Old(BoundMethod):  # noqa: F841
            name = "old-style"

            def __init__(self, steps: int = 3) -> None:
                self.steps = steps


def test_options_are_declared_once_as_the_opts_annotation():
    """``opts: X`` is the declaration: the registry, the signature and the typed attribute read it."""
    with pytest.raises(TypeError, match="declare the options as the annotation 'opts: <Options class>'"):
        class _Twice(BoundMethod):  # noqa: F841
            Options = _Sample

    class _Once(BoundMethod):
        name = "once"
        opts: _Sample

    assert _Once.Options is _Sample and _Once.option_names() == ["steps", "rate", "limit", "mode", "flag"]
    assert _Once(steps=4).opts == _Sample(steps=4)
    with pytest.raises(TypeError, match="must be annotated with a verify.options.Options subclass"):
        class _Wrong(BoundMethod):  # noqa: F841
            opts: int


def test_cli_text_becomes_the_declared_type():
    opts = parse_options(["refine_layers=2", "refine_workers=none", "margin=1e-5", "split=relu",
                          "refine_after=0"], ["bab"])["bab"]
    assert opts == {"refine_layers": 2, "refine_workers": None, "margin": 1e-5, "split": "relu", "refine_after": 0.0}
    assert type(opts["refine_after"]) is float
    assert parse_options(["share_noise=off", "memory_mb=64"], ["smoothing-gaussian"])["smoothing-gaussian"] == {
        "share_noise": False, "memory_mb": 64.0}
    with pytest.raises(CLIError, match="option attack_steps of bab: expected an integer, got '2.5'"):
        parse_options(["attack_steps=2.5"], ["bab"])
    with pytest.raises(CLIError, match="option early_stop of alpha-crown: expected true or false, got 'maybe'"):
        parse_options(["early_stop=maybe"], ["alpha-crown"])
