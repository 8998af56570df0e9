"""The method registry and the two base classes every method derives from.

Adding a method = one class with ``name``, ``guarantee``, its options declared once as a frozen
dataclass ``Options`` (:mod:`verify.options`: type, default, range and help of each; the
registry, the CLI and ``certify methods`` read them from there) and either

* ``lower_bounds(model, inputs, spec) -> [B, N]`` (deterministic bound methods, derive from
  :class:`BoundMethod`: the status decision, the counterexample check at the clean input and the
  batched radius bisection come for free), or
* ``decide(model, inputs, prop, call) -> list[Certificate]`` (anything else, derive from
  :class:`Method`; ``call`` is the :class:`CertifyCall`: radius search, deadline, clean outputs),

decorated with :func:`register`. The module that defines it is listed in ``METHOD_MODULES``
so that ``certify methods`` finds it without importing everything up front.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import time
import typing
from typing import Any, ClassVar

import torch
from torch import Tensor

from .certificate import Certificate
from .deadline import Deadline
from .options import Options
from .options import Options as OptionsBase  # the annotation of Method.opts (Options is also a class attribute)
from .spec import InputSet, LinearSpec, LpBall, OutputProperty, SpecError, norm_name
from .status_rule import enforce_status_rule

__all__ = [
    "Method",
    "BoundMethod",
    "register",
    "get_method",
    "method_class",
    "list_methods",
    "UnknownMethodError",
    "METHOD_MODULES",
]

# modules that register methods when imported (one per family, owned by its package)
METHOD_MODULES = (
    "relax.methods.bounds",  # interval, crown, deeppoly, alpha-crown
    "relax.methods.lipschitz",  # lipschitz-global, lipschitz-local, lipschitz-sdp
    "relax.methods.solvers",  # lp, milp, sdp
    "relax.methods.bab",  # bab
    "smoothing.methods",  # smoothing-gaussian, -denoised, -laplace, -uniform, -zhang, -topk, -rotation, -translation
    "smoothing.methods_tasks",  # smoothing-regression, smoothing-invariance
)

_REGISTRY: dict[str, type["Method"]] = {}
_loaded = False


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want a plain sentence
        return str(self.args[0])


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} needs a string class attribute 'name'")
    if cls.guarantee not in ("deterministic", "probabilistic"):
        raise TypeError(f"{cls.__name__}.guarantee must be 'deterministic' or 'probabilistic'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"method name {name!r} registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
    _REGISTRY[name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in METHOD_MODULES:  # a missing family is an error, never silently dropped
        importlib.import_module(mod)
    _loaded = True


def list_methods() -> dict[str, type["Method"]]:
    """All registered methods by name (sorted)."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def _load_until(name: str) -> None:
    """Import the method families one by one until ``name`` is registered (a first
    ``certify()`` then pays for one family's imports, not all: they count towards its timeout)."""
    for mod in METHOD_MODULES:
        if name in _REGISTRY:
            return
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def method_class(name: str) -> type["Method"]:
    if name not in _REGISTRY:
        _load_until(name)
    if name not in _REGISTRY:
        _load_all()
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_method(name: "str | Method", **options: Any) -> "Method":
    """Instantiate a registered method with its keyword options (unknown options are an error
    naming the option and listing the valid ones; values are checked against the method's
    :class:`~verify.options.Options`)."""
    if isinstance(name, Method):
        if options:
            raise TypeError("options given together with a Method instance")
        return name
    cls = method_class(name)
    valid = cls.option_names()
    bad = [k for k in options if k not in valid]
    if bad:
        raise TypeError(f"method {name!r} has no option {bad[0]!r}; its options are: {', '.join(valid) or '(none)'}")
    return cls(**options)


class CertifyCall:
    """One :meth:`Method.certify` call as the method's :meth:`Method.decide` sees it.

    The clean-input quantities are computed at most once, on first use, and shared with the
    status rule (which then needs no forward pass of its own).

    Attributes:
        model, inputs, prop: the call's arguments (``inputs`` holds ``B`` sets).
        find_radius, max_radius: the radius search asked for.
        deadline: started when ``certify`` was entered, with the call's ``timeout``.
    """

    def __init__(self, model: torch.nn.Module, inputs: InputSet, prop: OutputProperty, find_radius: bool,
                 max_radius: float | None, deadline: Deadline) -> None:
        self.model, self.inputs, self.prop = model, inputs, prop
        self.find_radius, self.max_radius, self.deadline = find_radius, max_radius, deadline
        self._clean: tuple[Tensor, Tensor] | None = None
        self._labels: list[int] | None = None

    @property
    def timeout(self) -> float | None:
        return self.deadline.seconds

    def clean(self) -> tuple[Tensor, Tensor]:
        """The sets' centres ``x0 [B, *input_shape]`` and the model's outputs there ``y0 [B, K]``
        (one batched forward pass, no gradient)."""
        if self._clean is None:
            x0 = self.inputs.midpoint()
            with torch.no_grad():
                y0 = self.model(x0)
            self._clean = x0, y0.reshape(y0.shape[0], -1)
        return self._clean

    def spec(self) -> LinearSpec:
        """The property's rows ``C [B, N, K]``, ``d [B, N]`` in the outputs' dtype and device."""
        x0, y0 = self.clean()
        return self.prop.linear(self.inputs.batch_size, y0.shape[1], device=x0.device, dtype=y0.dtype)

    @property
    def norm(self) -> str:
        """``"l2"`` / ``"linf"`` / ``"l1"`` for an l_p ball, ``"box"`` for a box (the Certificate's
        ``norm``)."""
        return norm_name(self.inputs.p) if isinstance(self.inputs, LpBall) else "box"

    def eps(self, b: int) -> float | None:
        """The radius asked about for input ``b`` of a ball (``None`` for a box)."""
        return float(self.inputs.eps[b]) if isinstance(self.inputs, LpBall) else None

    def label(self, b: int) -> int | None:
        """The label of input ``b`` when the property has one (``Robust``, ``TopK``), else ``None``."""
        if self._labels is None:
            labels = self.prop.labels()
            self._labels = [] if labels is None else labels.reshape(-1).tolist()
        if not self._labels:
            return None
        return int(self._labels[b] if len(self._labels) > 1 else self._labels[0])

    def clean_verdict(self) -> tuple[Tensor, Tensor, Tensor, LinearSpec]:
        """At the sets' centres: ``x0 [B, *shape]``, the predicted class ``[B]``, whether the
        property holds there ``[B]`` (a batched pass: a near-tie is confirmed one input at a
        time by the status rule) and the property's rows."""
        x0, y0 = self.clean()
        spec = self.spec()
        return x0, y0.argmax(dim=1), spec.holds(y0), spec

    def centre_outputs(self) -> Tensor | None:
        """``y0`` when a method already computed it (for the status rule), else ``None``."""
        return None if self._clean is None else self._clean[1]


def _declared_options(cls: type) -> type[Options] | None:
    """The Options class of a method class's own ``opts: X`` annotation (``None`` without one);
    a string annotation (``from __future__ import annotations``) is resolved in its module."""
    ann = cls.__dict__.get("__annotations__", {}).get("opts")
    if ann is None:
        return None
    if isinstance(ann, str):
        ann = eval(ann, vars(sys.modules[cls.__module__]))  # noqa: S307  # a class name written in the source
    if not (isinstance(ann, type) and issubclass(ann, Options)):
        raise TypeError(f"{cls.__name__}.opts must be annotated with a verify.options.Options subclass, got {ann!r}")
    return ann


def _signature(options: type[Options]) -> inspect.Signature:
    """The keyword-only signature ``(*, name=default, ...)`` of a method with these options."""
    return inspect.Signature([inspect.Parameter(i.name, inspect.Parameter.KEYWORD_ONLY, default=i.default, annotation=i.type)
                              for i in options.infos()])


class Method:
    """Base class of all certification methods.

    Subclasses set the class attributes and declare their options once, as the annotation
    ``opts: XOptions`` of a frozen dataclass (:mod:`verify.options`; read as ``self.opts.sigma``);
    checks that involve several options go in :meth:`setup`.

    ``certify`` is the one pipeline and is not overridden: it starts the deadline, hands a
    :class:`CertifyCall` to the method's :meth:`decide`, and passes the answers through
    :func:`verify.status_rule.enforce_status_rule` ("falsified" only with a confirmed
    counterexample, no "certified" contradicted at the set's centre), so no method repeats the
    rule or can skip it.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "certify" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: define decide(model, inputs, prop, call), not certify (certify is the "
                            "pipeline every method shares: deadline, decide, status rule)")
        if "__init__" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: declare the options in an Options dataclass and checks in setup(), "
                            "not an __init__ (verify.options)")
        if "Options" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: declare the options as the annotation 'opts: <Options class>'")
        declared = _declared_options(cls)
        if declared is not None:
            cls.Options = declared
        cls.__signature__ = _signature(cls.Options)  # type: ignore[attr-defined]  # help(), IDEs

    name: ClassVar[str] = ""
    guarantee: ClassVar[str] = "deterministic"
    certifies: ClassVar[str] = "base"
    summary: ClassVar[str] = ""
    #: norms this method supports for l_p balls, plus "box" for boxes
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1", "box")
    #: cost per input on a small net: "fast" (bound propagation, sampling: a batch in seconds),
    #: "slow" (LP / MILP / branch-and-bound: seconds to minutes per input) or "very slow" (SDPs:
    #: minutes per input); demos and tests size their runs by it
    cost: ClassVar[str] = "fast"
    #: decides every property of the networks it accepts, given the time (MILP, branch-and-bound)
    complete: ClassVar[bool] = False

    #: the method's options (a frozen dataclass; :mod:`verify.options`): names, types,
    #: defaults, ranges and help text are read from it by the registry and the CLI. A subclass
    #: declares them once, as the annotation ``opts: MyOptions``; this is set from it
    Options: ClassVar[type[Options]] = Options
    opts: OptionsBase

    def __init__(self, **options: Any) -> None:
        """Build the method from its keyword options: they are checked against :attr:`Options`
        (type, range; :class:`~verify.errors.OptionError` naming the option), kept as
        ``self.opts`` (the one store of the options, typed by the subclass's ``opts:``
        annotation: ``method.opts.sigma``); then :meth:`setup` runs."""
        try:
            opts = self.Options(**options)
        except TypeError as e:  # an unknown keyword
            raise TypeError(f"{self.name or type(self).__name__}: {e}; its options are: "
                            f"{', '.join(self.option_names()) or '(none)'}") from None
        opts.check(self.name or type(self).__name__)
        self.opts = opts
        self.setup()

    def setup(self) -> None:
        """Checks that involve several options, and state derived from them (a loaded denoiser);
        called once by ``__init__`` after the options are stored. Nothing by default."""

    @classmethod
    def option_names(cls) -> list[str]:
        return cls.Options.names()

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return cls.Options.defaults()

    def options(self) -> dict[str, Any]:
        return self.opts.as_dict()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    def make_certificate(self, status: str, index: int, **fields: Any) -> Certificate:
        """A :class:`Certificate` of this method: name, guarantee and what it certifies come
        from the class; ``fields`` are the other Certificate fields."""
        return Certificate(method=self.name, guarantee=self.guarantee, certifies=self.certifies, status=status, index=index, **fields)

    def check_input_set(self, inputs: InputSet, find_radius: bool = False) -> None:
        """``SpecError`` for an input set of a kind not in ``norms``, and for a radius search
        (``find_radius``) on anything but an l_p ball."""
        kind = norm_name(inputs.p) if isinstance(inputs, LpBall) else "box"
        if kind not in self.norms:
            raise SpecError(f"method {self.name!r} does not support {kind} input sets (supports {', '.join(self.norms)})")
        if find_radius and not isinstance(inputs, LpBall):
            raise SpecError("find_radius needs an l_p ball input set")

    @typing.final
    def certify(
        self,
        model: torch.nn.Module,
        inputs: InputSet,
        prop: OutputProperty,
        *,
        find_radius: bool = False,
        max_radius: float | None = None,
        timeout: float | None = None,
    ) -> list[Certificate]:
        """One Certificate per input of the batch.

        Args:
            model: the network (a ``torch.fx.GraphModule`` in eval mode on the device), mapping
                ``[B, *input_shape] -> [B, K]``.
            inputs: the batched input set (its tensors are on the model's device).
            prop: the output property.
            find_radius: also search the largest certified radius (l_p balls only); ``eps``
                of ``inputs`` is then the radius asked about (0 for none).
            max_radius: upper end of the radius search.
            timeout: seconds for the whole batch; past it the answer is "unknown" with the
                best bounds found.
        """
        call = CertifyCall(model, inputs, prop, find_radius, max_radius, Deadline(timeout))
        certs = self.decide(model, inputs, prop, call)
        return enforce_status_rule(model, inputs, prop, certs, centre_outputs=call.centre_outputs())

    def decide(self, model: torch.nn.Module, inputs: InputSet, prop: OutputProperty, call: CertifyCall) -> list[Certificate]:
        """The method's answers, one Certificate per input of ``inputs`` (see :meth:`certify`;
        ``call`` holds the radius search, the deadline and the shared clean outputs)."""
        raise NotImplementedError


#: a float64 lower bound proves a row when it exceeds ``FLOAT64_PROOF_MARGIN (1 + |lower|)``
#: (:func:`float_safety_margin`); for a borderline bound (``|lower|`` near 0) that is this number
#: itself, the threshold ``bab`` uses for its domains (its bounds are float64 too)
FLOAT64_PROOF_MARGIN = 1e-10
#: the same for bounds computed in float32 (or narrower)
FLOAT32_PROOF_MARGIN = 1e-5


def float_safety_margin(lower: Tensor) -> Tensor:
    """The amount a lower bound must exceed 0 by before it counts as a proof.

    Bounds computed in float32 carry round-off of order ``1e-7 * (sum of |terms|)``; we
    demand ``lower > 1e-5 * (1 + |lower|)`` in float32 and ``1e-10 * (1 + |lower|)`` in
    float64. Methods that track their own round-off may override
    :meth:`BoundMethod.safety_margin`.
    """
    rel = FLOAT32_PROOF_MARGIN if lower.dtype in (torch.float32, torch.float16, torch.bfloat16) else FLOAT64_PROOF_MARGIN
    return rel * (1.0 + lower.abs())


def _float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 deep copy of ``model`` (attributes such as ``input_shape`` kept)."""
    import copy

    m = copy.deepcopy(model)
    return m.to(torch.float64)


class BoundMethod(Method):
    """A deterministic method defined by sound lower bounds on the property rows.

    Subclasses implement :meth:`lower_bounds`. This class turns them into Certificates:

    * ``falsified`` when the clean input (a point of the set) already violates the property,
      confirmed one input at a time in the model's dtype and in float64 by the status rule
      (:func:`verify.attack.confirm_counterexample`; the counterexample is that input);
    * ``certified`` when every group has a row whose lower bound exceeds the float-safety
      margin;
    * ``unknown`` otherwise.

    With ``find_radius`` the largest certified l_p radius is found by bisection, all inputs of
    the batch at once (``bisection_steps`` halvings of ``[0, max_radius]``).
    """

    guarantee = "deterministic"
    certifies = "base"
    bisection_steps: int = 12  # a class default; a method may make it an option

    def lower_bounds(self, model: torch.nn.Module, inputs: InputSet, spec: LinearSpec) -> Tensor:
        """Sound lower bounds ``[B, N]`` of ``C y + d`` over every point of ``inputs``."""
        raise NotImplementedError

    def safety_margin(self, lower: Tensor) -> Tensor:
        return float_safety_margin(lower)

    #: a float32 proof whose best group bound is below this fraction of (1 + |lower|) is
    #: re-checked with the model and bounds in float64
    recheck_fraction: ClassVar[float] = 1e-3

    def checked_bounds(self, model: torch.nn.Module, inputs: InputSet, spec: LinearSpec) -> tuple[Tensor, Tensor]:
        """Lower bounds ``[B, N]`` and proved ``[B]``, with borderline float32 proofs confirmed
        in float64.

        The engines of :mod:`relax` return bounds that already account for their round-off
        (:mod:`relax.bounds.roundoff`), so a float32 proof is sound as it stands; this recheck is a
        second line for methods whose bounds do not track round-off: a float32 proof that
        clears the safety margin by little is recomputed on a float64 copy of the model and
        kept only if it still holds there.
        """
        lower = self.lower_bounds(model, inputs, spec)
        proved = self.proves(lower, spec)
        if lower.dtype == torch.float64 or not bool(proved.any()):
            return lower, proved
        best = spec.group_max(lower).amin(dim=-1)
        scale = 1.0 + lower.abs().amax(dim=-1)
        borderline = proved & (best <= self.recheck_fraction * scale)
        if bool(borderline.any()):
            idx = borderline.nonzero().squeeze(1)
            model64 = _float64_copy(model)
            low64 = self.lower_bounds(model64, inputs.select(idx).to(dtype=torch.float64), spec.select(idx).to(dtype=torch.float64))
            proved = proved.clone()
            proved[idx] = self.proves(low64, spec.select(idx).to(dtype=torch.float64)).to(proved.device)
            lower = lower.clone()
            lower[idx] = torch.minimum(lower[idx], low64.to(lower.dtype))
        return lower, proved

    def proves(self, lower: Tensor, spec: LinearSpec) -> Tensor:
        """Bool ``[B]``: the bounds prove the property after the float margin."""
        ok = lower > self.safety_margin(lower)
        rows = torch.where(ok, torch.ones_like(lower), -torch.ones_like(lower))
        return spec.certified_by(rows, 0.0)

    @property
    def deadline(self) -> Deadline:
        """The deadline of the running :meth:`certify` call (unlimited outside one): subclasses
        pass it to their long loops and solvers inside :meth:`lower_bounds`."""
        return getattr(self, "_deadline", None) or Deadline(None)

    def decide(self, model, inputs, prop, call):
        """See :meth:`Method.certify`. With ``timeout`` the bound computations and the radius
        bisection stop at the deadline: bounds finished so far are kept (each is sound), the
        radius is the largest one proved so far, and what is not proved is "unknown"."""
        self._deadline = call.deadline
        try:
            return self._decide_until(call)
        finally:
            self._deadline = None

    def _decide_until(self, call: CertifyCall) -> list[Certificate]:
        model, inputs, find_radius, max_radius, deadline = (
            call.model, call.inputs, call.find_radius, call.max_radius, call.deadline)
        t0 = deadline.start
        self.check_input_set(inputs, find_radius)
        B = inputs.batch_size
        x0, pred, clean_ok, spec = call.clean_verdict()
        ball = inputs if isinstance(inputs, LpBall) else None

        lower, proved = self.checked_bounds(model, inputs, spec)
        proved = proved & clean_ok
        # the clean input as the counterexample; the status rule (verify.status_rule) keeps
        # "falsified" only where single-input passes confirm it (a batched pass can flip a near-tie)
        falsified = ~clean_ok
        asked_eps = ball.eps if ball is not None else None

        radius = torch.zeros(B, dtype=torch.float64)
        if asked_eps is not None:  # a ball
            radius = torch.where(proved.cpu(), asked_eps.double().cpu(), radius)
        if find_radius:
            assert ball is not None and asked_eps is not None  # check_input_set: a radius search needs a ball
            hi_r = float(max_radius) if max_radius is not None else float(max(asked_eps.max().item() * 4, 1.0))
            radius = self.bisect_radius(model, ball, spec, clean_ok, hi_r, radius)

        elapsed = time.perf_counter() - t0
        certs = []
        for b in range(B):
            status = "certified" if proved[b] else ("falsified" if falsified[b] else "unknown")
            cex = x0[b].detach().cpu() if status == "falsified" else None
            certs.append(self.make_certificate(
                status, b, label=call.label(b), prediction=int(pred[b]), norm=call.norm, eps=call.eps(b),
                radius=float(radius[b]), lower=lower[b].detach().cpu(), counterexample=cex, time_s=elapsed / B,
                details={"options": self.options(), **_deadline_details(deadline)},
            ))
        return certs

    def bisect_radius(self, model, inputs: LpBall, spec: LinearSpec, clean_ok: Tensor, hi_r: float, known: Tensor) -> Tensor:
        """Largest radius in ``[0, hi_r]`` that :meth:`lower_bounds` proves, per input
        (batched bisection; ``known`` radii already proved are kept as a floor)."""
        B = inputs.batch_size
        lo = known.clone().double()
        hi = torch.full((B,), hi_r, dtype=torch.float64)
        hi = torch.maximum(hi, lo)
        active = clean_ok.cpu().clone()
        lo[~active] = 0.0
        deadline, step_s = self.deadline, 0.0
        for _ in range(self.bisection_steps):
            # a step that would end past the deadline is not started (the last one's time as estimate)
            if not active.any() or not deadline.affords(step_s):
                break
            t_step = time.perf_counter()
            mid = (lo + hi) / 2
            # float64 radii: LpBall rounds them *up* to the model dtype, and the radius kept on
            # success is the one actually proved (never the unrounded midpoint)
            ball = inputs.with_eps(torch.where(active, mid, lo).to(inputs.eps.device))
            ok = self.checked_bounds(model, ball, spec)[1].cpu() & active
            lo = torch.where(ok, ball.eps.double().cpu(), lo)
            hi = torch.where(active & ~ok, mid, hi)
            step_s = time.perf_counter() - t_step
        return lo


def _deadline_details(deadline: Deadline) -> dict[str, Any]:
    """``details`` entries of a certificate computed under a deadline (none without one)."""
    if deadline.seconds is None:
        return {}
    return {"timeout": deadline.seconds, "deadline_expired": deadline.expired()}
