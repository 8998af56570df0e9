"""Compare several methods on the same inputs, same model, same device.

:func:`compare` runs every method on every input (in chunks, through :mod:`verify.executor`),
appends the Certificates to ``<prefix>_results.csv`` as each chunk finishes (``resume=True``
skips the ``(method, index)`` pairs already there), then writes ``<prefix>_results.json``,
``<prefix>.png`` (certified accuracy vs radius, with the PGD accuracy of f as an empirical
upper bound), ``<prefix>.html`` (table and PNG in one file) and ``<prefix>.md`` (summary table, attack table, and for smoothing methods the
attack success on g beyond the certified radius, at ``1.5 R`` and ``2 R``).
"""
from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .certificate import CSV_COLUMNS, Certificate, CertificateTable
from .executor import Task, execute
from .resources import usable_cores
from .registry import method_class
from .resume import ResumeError, RunKey, drop_partial_last_row, input_digests, model_digest, settings_digest
from .report import check_certified_per_input, format_markdown, html_report, format_text, markdown_report, plot_certified_accuracy, summarize, summary_columns
from .spec import LpBall, Robust, norm_name, parse_norm

__all__ = ["compare", "CompareResult", "attack_curve", "attack_robust", "beyond_radius_attack", "append_csv"]

BEYOND_FACTORS = (1.5, 2.0)


@dataclass
class CompareResult:
    """What :func:`compare` produced: the table, the PGD curve, the smoothing beyond-radius
    rows, the files written and notes (methods skipped, attack unavailable, ...)."""

    table: CertificateTable
    radii: list[float]
    attack: dict[float, float] | None = None
    beyond: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    violations: list[str] | None = None

    def summary_text(self) -> str:
        errors = any(c.status == "error" for c in self.table)
        return format_text(summarize(self.table, self.radii), summary_columns(self.radii, errors=errors))


def append_csv(path: Path, certs: Sequence[Certificate]) -> None:
    """Append rows to a results CSV (writing the header if the file is new or empty)."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        for c in certs:
            w.writerow(CertificateTable.csv_row(c))
        f.flush()


def _load_net(model: Any, device: str) -> nn.Module:
    from .model import load_model

    return load_model(model, device=device)


@torch.no_grad()
def _num_classes(net: nn.Module, x: Tensor) -> int:
    return net(x[:1]).shape[-1]


@torch.no_grad()
def _predict(net: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    return torch.cat([net(x[i : i + batch]).argmax(dim=1) for i in range(0, len(x), batch)])


def attack_curve(
    net: nn.Module, x: Tensor, labels: Tensor, radii: Sequence[float], norm: float,
    steps: int = 40, restarts: int = 1, seed: int = 0,
) -> dict[float, float]:
    """PGD accuracy of ``f`` at each radius: the fraction of inputs classified correctly and
    not broken by the attack (an empirical *upper* bound on robust accuracy)."""
    robust = attack_robust(net, x, labels, radii, norm, steps, restarts, seed)
    return {r: int(ok.sum()) / len(ok) for r, ok in robust.items()}


def attack_robust(
    net: nn.Module, x: Tensor, labels: Tensor, radii: Sequence[float], norm: float,
    steps: int = 40, restarts: int = 1, seed: int = 0,
) -> dict[float, Tensor]:
    """Per radius, bool ``[N]``: input classified correctly and PGD found no counterexample."""
    from .attack import pgd_attack

    correct = (_predict(net, x) == labels).cpu()
    out: dict[float, Tensor] = {}
    for r in radii:
        ok = correct.clone()
        if r > 0 and ok.any():
            idx = ok.nonzero().flatten()
            ball = LpBall(x[idx], float(r), norm, 0.0, 1.0)
            spec = Robust(labels[idx]).linear(len(idx), _num_classes(net, x), device=x.device, dtype=x.dtype)
            res = pgd_attack(net, ball, spec, steps=steps, restarts=restarts, seed=seed)
            ok[idx] = ~torch.as_tensor(res.found, dtype=torch.bool).cpu()
        out[float(r)] = ok
    return out


class _NoiseAveraged(nn.Module):
    """``log mean_k softmax f(x + sigma * noise_k)``: a differentiable surrogate of the smoothed
    classifier g, attacked by PGD (expectation over transformation, ``m`` fresh draws per call)."""

    def __init__(self, net: nn.Module, sigma: float, m: int = 16) -> None:
        super().__init__()
        self.net, self.sigma, self.m = net, sigma, m

    def forward(self, x: Tensor) -> Tensor:
        xs = x.unsqueeze(0) + self.sigma * torch.randn((self.m, *x.shape), device=x.device, dtype=x.dtype)
        p = torch.softmax(self.net(xs.flatten(0, 1)), dim=-1).view(self.m, x.shape[0], -1).mean(0)
        return torch.log(p.clamp_min(1e-12))


@torch.no_grad()
def _vote(net: nn.Module, x: Tensor, sigma: float, n: int, seed: int) -> Tensor:
    """Majority class of ``f(x + N(0, sigma^2))`` over ``n`` draws, ``[B]`` (no abstention:
    this is an empirical check, not a certificate)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    K = _num_classes(net, x)
    counts: Tensor | None = None
    for i in range(0, n, 256):
        k = min(256, n - i)
        xs = x.unsqueeze(0) + sigma * torch.randn((k, *x.shape), generator=g, device=x.device, dtype=x.dtype)
        y = net(xs.flatten(0, 1)).argmax(-1).view(k, x.shape[0])
        c = torch.nn.functional.one_hot(y, K).sum(0)
        counts = c if counts is None else counts + c
    assert counts is not None  # n >= 1 draws
    return counts.argmax(-1)


def beyond_radius_attack(
    net: nn.Module, x: Tensor, table: CertificateTable, norm: float, sigma_of: Callable[[str], float | None],
    factors: Sequence[float] = BEYOND_FACTORS, n_vote: int = 500, steps: int = 20, seed: int = 0,
) -> list[dict[str, Any]]:
    """For each smoothing method (Gaussian noise, l2): attack g at ``factor * R`` around every
    input it certified correctly with radius ``R > 0`` (PGD on a noise-averaged surrogate, then
    a ``n_vote``-sample majority vote at the found point). Returns one row per (method, factor):
    how many inputs were attacked and the fraction where g's vote changed."""
    from .attack import pgd_attack

    rows = []
    for m in table.methods():
        sub = [c for c in table.by_method(m) if c.certifies == "smoothed" and c.certified and c.correct and c.radius > 0]
        sigma = sigma_of(m)
        if not sub or sigma is None or norm != 2.0:
            continue
        idx = torch.tensor([c.index for c in sub])
        lab = torch.tensor([c.label for c in sub])
        R = torch.tensor([c.radius for c in sub], dtype=x.dtype)
        surrogate = _NoiseAveraged(net, sigma)
        for fac in factors:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                spec = Robust(lab).linear(len(idx), _num_classes(net, x), device=x.device, dtype=x.dtype)
                res = pgd_attack(surrogate, LpBall(x[idx], fac * R, norm, 0.0, 1.0), spec, steps=steps, restarts=1, seed=seed)
            changed = _vote(net, res.x_adv.detach().to(x), sigma, n_vote, seed) != lab.to(x.device)
            rows.append({"method": m, "factor": f"{fac:g} R", "attacked": len(sub), "success": changed.float().mean().item()})
    return rows


def _sigma_of(options: dict[str, dict[str, Any]]) -> Callable[[str], float | None]:
    def f(m: str) -> float | None:
        if "gaussian" not in m:
            return None
        sig = options.get(m, {}).get("sigma", method_class(m).option_defaults().get("sigma"))
        return float(sig) if isinstance(sig, (int, float)) else None

    return f


def _read_rows(csv_path: Path) -> CertificateTable:
    """The rows of a results CSV; a malformed row is an error naming the file."""
    try:
        return CertificateTable.from_csv(str(csv_path))
    except (ValueError, KeyError, TypeError, csv.Error) as e:
        raise ResumeError(f"{csv_path}: cannot read the results: {type(e).__name__}: {e}") from None


def _csv_header(csv_path: Path) -> list[str]:
    """The column names of an existing results CSV."""
    with open(csv_path, newline="") as f:
        return next(csv.reader(f), [])


def _resumed_pairs(csv_path: Path, key: RunKey, wanted: set[str], N: int, notes: list[str]) -> tuple[set[tuple[str, int]], RunKey]:
    """The ``(method, index)`` pairs of ``csv_path`` that a resumed run keeps, and the file's
    run key.

    A partial last row is dropped; rows computed on another model, norm or data are refused
    (:class:`ResumeError`); a method whose options or radius settings changed is recomputed
    (its rows are removed from the file)."""
    msg = drop_partial_last_row(csv_path)
    if msg:
        notes.append(msg)
    old_key = RunKey.load(csv_path)
    key.check_resumable(old_key, csv_path)
    assert old_key is not None  # check_resumable refuses a file without a key
    rows = _read_rows(csv_path)
    changed = {m for m in wanted if m in old_key.methods and old_key.methods[m] != key.methods[m]}
    changed |= {c.method for c in rows if c.method in wanted and c.method not in old_key.methods}
    if changed or _csv_header(csv_path) != CSV_COLUMNS:  # an older file lacks the newer columns
        rows = CertificateTable([c for c in rows if c.method not in changed])
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        rows.to_csv(str(tmp))
        os.replace(tmp, csv_path)
        if changed:
            notes.append(f"recomputed {', '.join(sorted(changed))}: options or radius settings differ from the resumed rows")
    done = {(c.method, c.index) for c in rows if c.method in wanted and c.index < N and c.status != "error"}
    notes.append(f"resumed: {len(done)} (method, input) pairs already in {csv_path.name} (errors are retried)")
    return done, old_key


def compare(
    model: Any,
    x: Tensor,
    labels: Tensor,
    methods: Sequence[str],
    *,
    radii: Sequence[float],
    norm: float | str = math.inf,
    out_dir: str | os.PathLike = ".",
    prefix: str = "compare",
    options: dict[str, dict[str, Any]] | None = None,
    limits: dict[str, int] | None = None,
    executor: str = "local",
    workers: int | None = None,
    chunk_size: int | None = None,
    resume: bool = False,
    find_radius: bool = True,
    max_radius: float | None = None,
    timeout: float | None = None,
    device: str = "cpu",
    attack: bool = True,
    attack_steps: int = 40,
    model_name: str = "f",
    title: str | None = None,
    progress: bool = True,
) -> CompareResult:
    """Run ``methods`` on ``x [N, *shape]`` / ``labels [N]`` and write the results and report.

    Args:
        model: a torch module or model path (each task loads it with :func:`verify.load_model`).
        radii: radii of the summary table and the attack curve (the plot spans ``[0, max]``).
        norm: the l_p norm of the balls; methods that do not support it are skipped (noted).
        options: per-method keyword options ``{method: {option: value}}``.
        limits: per-method cap ``{method: k}``: that method runs on the first ``k`` inputs only
            (for slow exact methods; the tables show each method's ``n``).
        executor, workers, chunk_size: see :mod:`verify.executor`; the default chunk is the whole
            batch for ``local`` and ``N / workers`` otherwise.
        resume: keep the rows of an existing ``<prefix>_results.csv`` and skip those
            ``(method, index)`` pairs.
        find_radius, max_radius: every method searches its largest certified radius.
        attack: compute the PGD curve of f and, for smoothing, the beyond-radius attack.
    """
    p = parse_norm(norm)
    options = options or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{prefix}_results.csv"
    res = CompareResult(CertificateTable(), [float(r) for r in radii])
    N = len(labels)
    settings = {m: {"options": options.get(m, {}), "find_radius": find_radius, "max_radius": max_radius} for m in methods}
    key = RunKey(model_digest(model), norm_name(p), input_digests(x, labels), {m: settings_digest(v) for m, v in settings.items()})
    done: set[tuple[str, int]] = set()
    old_key = None
    if resume and csv_path.exists() and csv_path.stat().st_size > 0:
        done, old_key = _resumed_pairs(csv_path, key, set(methods), N, res.notes)
    else:
        csv_path.unlink(missing_ok=True)
    key.merged(old_key).save(csv_path)

    run = _supported(methods, p, res.notes)
    limits = limits or {}
    step = chunk_size or (N if executor == "local" else max(1, math.ceil(N / (workers or usable_cores(2)))))
    tasks = [Task(m, options.get(m, {}), model, x[idx], labels[idx], idx, 0.0, norm_name(p), find_radius, max_radius, timeout, device,
                  grid=list(res.radii)) for m, idx in _chunks(run, done, N, limits, step)]
    _execute_into(csv_path, tasks, executor, workers, prefix, progress, res.notes)
    _collect(res, csv_path, run, N, limits, out / f"{prefix}_results.json")
    if attack and N:
        _attack_curves(res, model, x, labels, p, device, attack_steps, options)
    _write_reports(res, out, prefix, p, model_name, title)
    return res


def _supported(methods: Sequence[str], p: float, notes: list[str]) -> list[str]:
    """The methods that take l_p balls of this norm (a note for each that does not)."""
    run = []
    for m in methods:
        cls = method_class(m)
        if norm_name(p) not in cls.norms:
            notes.append(f"{m}: skipped, it does not support {norm_name(p)} balls (supports {', '.join(cls.norms)})")
            continue
        run.append(m)
    return run


def _chunks(run: list[str], done: set[tuple[str, int]], N: int, limits: dict[str, int], step: int) -> list[tuple[str, list[int]]]:
    """The work left as ``(method, input indices)`` chunks of at most ``step`` inputs: each
    method's first ``limits[m]`` inputs (all ``N`` by default) not already ``done``."""
    chunks = []
    for m in run:
        todo = [i for i in range(min(N, limits.get(m, N))) if (m, i) not in done]
        for s in range(0, len(todo), step):
            chunks.append((m, todo[s : s + step]))
    return chunks


def _collect(res: CompareResult, csv_path: Path, run: list[str], N: int, limits: dict[str, int], json_path: Path) -> None:
    """``res.table``: the CSV's last row per (method, input) of the methods run, in their order
    and within their limits; written to ``json_path`` too."""
    rows = _read_rows(csv_path) if csv_path.exists() else CertificateTable()
    keep = {m: i for i, m in enumerate(run)}
    last = {(c.method, c.index): c for c in rows if c.method in keep and c.index < min(N, limits.get(c.method, N))}
    res.table = CertificateTable(sorted(last.values(), key=lambda c: (keep[c.method], c.index)))
    res.table.to_json(str(json_path))
    res.files.update(csv=csv_path, json=json_path)


def _execute_into(csv_path: Path, tasks: list[Task], executor: str, workers: int | None, prefix: str, progress: bool,
                  notes: list[str]) -> None:
    """Run the tasks, appending each task's certificates to the CSV as it finishes (a progress
    bar over inputs; a note per task with errors)."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(t.indices) for t in tasks), desc=prefix, unit="input", file=sys.stderr, disable=None if progress else True)
    for task, certs in execute(tasks, executor, workers):
        append_csv(csv_path, certs)
        bar.set_postfix_str(task.method)
        bar.update(len(task.indices))
        errs = [c for c in certs if c.status == "error"]
        if errs:
            notes.append(f"{task.method}: {len(errs)} inputs errored: {errs[0].details.get('error', '')}")
    bar.close()


def _attack_curves(res: CompareResult, model: Any, x: Tensor, labels: Tensor, p: float, device: str, attack_steps: int,
                   options: dict[str, dict[str, Any]]) -> None:
    """The PGD accuracy curve of f, the per-input check of the certificates against it, and the
    beyond-radius attack on smoothed certificates."""
    try:
        net = _load_net(model, device)
        xd, yd = x.to(device), labels.to(device)
        robust = attack_robust(net, xd, yd, res.radii, p, steps=attack_steps)
        res.attack = {r: int(ok.sum()) / len(ok) for r, ok in robust.items()}
        res.violations = check_certified_per_input(res.table, robust)
        res.notes += [f"UNSOUND? {b}" for b in res.violations]
        res.beyond = beyond_radius_attack(net, xd, res.table, p, _sigma_of(options))
    except ImportError as e:
        res.notes.append(f"no PGD attack curve: {e}")


def _write_reports(res: CompareResult, out: Path, prefix: str, p: float, model_name: str, title: str | None) -> None:
    """The plot, the markdown and the HTML report (their paths into ``res.files``)."""
    png = plot_certified_accuracy(res.table, res.radii, out / f"{prefix}.png", attack_curve=res.attack, model_name=model_name, title=title)
    sections = []
    if res.beyond:
        sections.append((
            "Smoothing: attacks on g beyond the certified radius",
            "PGD on a noise-averaged surrogate of g at 1.5 R and 2 R around each input that g certifies "
            "correctly with radius R; success = the majority vote of f under noise changes at the found point.\n\n"
            + format_markdown(res.beyond, [("method", "method"), ("factor", "radius"), ("attacked", "inputs"), ("success", "attack success")]),
        ))
    if res.notes:
        sections.append(("Notes", "\n".join(f"- {n}" for n in res.notes)))
    md = markdown_report(res.table, res.radii, png, res.attack, title=title or f"Comparison ({norm_name(p)})",
                         model_name=model_name, sections=sections, violations=res.violations)
    (out / f"{prefix}.md").write_text(md)
    page = html_report(res.table, res.radii, png, title=title or f"Comparison ({norm_name(p)})", model_name=model_name)
    (out / f"{prefix}.html").write_text(page)
    res.files.update(png=png, markdown=out / f"{prefix}.md", html=out / f"{prefix}.html")
