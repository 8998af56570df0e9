"""Run certification tasks (one method on one chunk of inputs) in-process, in a process pool or
on ray, yielding results as they finish so that callers can write them incrementally.

* ``local`` -- sequential, in this process.
* ``process`` -- :class:`concurrent.futures.ProcessPoolExecutor` (``spawn`` start method; each
  worker uses ``cores // workers`` torch threads).
* ``ray`` -- ``ray.remote`` tasks (optional dependency: ``pip install 'certify[ray]'``).

A task that raises does not stop the others: its inputs get ``status="error"`` Certificates
whose ``details["error"]`` holds the message.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from .certificate import Certificate
from .resources import usable_cores

__all__ = ["Task", "run_task", "execute", "EXECUTORS", "ExecutorError"]

EXECUTORS = ("local", "process", "ray")


class ExecutorError(RuntimeError):
    """An executor cannot be used (unknown name, ray not installed, ...)."""


@dataclass
class Task:
    """One method on one chunk of inputs.

    Attributes:
        method: registry name; ``options`` its keyword options.
        model: a torch module or a model path (loaded by :func:`verify.certify`).
        x: clean inputs ``[b, *shape]``; ``labels``: ``[b]``; ``indices``: their data-set positions.
        eps, norm, find_radius, max_radius, timeout, device: as in :func:`verify.certify`.
        grid: radii to fall back on when the method refuses ``find_radius`` (it decides one
            set at a time, e.g. branch and bound): it certifies at each radius in increasing
            order, inputs dropping out at their first failure; ``radius`` is then the largest
            grid radius certified (``details["radius_search"] = "grid"``).
    """

    method: str
    options: dict[str, Any]
    model: Any
    x: Tensor
    labels: Tensor
    indices: list[int]
    eps: float = 0.0
    norm: str = "inf"
    find_radius: bool = True
    max_radius: float | None = None
    timeout: float | None = None
    device: str = "cpu"
    grid: list[float] | None = None


def _error_certs(task: Task, err: BaseException, seconds: float) -> list[Certificate]:
    from .registry import method_class

    guarantee, certifies, conf = "deterministic", "base", 1.0
    try:
        cls = method_class(task.method)
        guarantee, certifies = cls.guarantee, cls.certifies
        if guarantee == "probabilistic":
            alpha = task.options.get("alpha", cls.option_defaults().get("alpha", 0.001))
            conf = 1.0 - float(alpha)
    except Exception:  # the error may be the method itself (unknown name, bad alpha)
        pass
    msg = f"{type(err).__name__}: {err}".splitlines()[0][:500]
    return [
        Certificate(
            method=task.method, guarantee=guarantee, certifies=certifies, confidence=conf, status="error",
            index=i, label=int(y), time_s=seconds / max(1, len(task.indices)), details={"error": msg},
        )
        for i, y in zip(task.indices, task.labels.tolist())
    ]


def run_task(task: Task) -> list[Certificate]:
    """Certify one chunk; the Certificates carry the data-set ``index``. Exceptions become
    ``status="error"`` Certificates."""
    from .api import certify
    from .spec import SpecError

    t0 = time.perf_counter()
    try:
        try:
            certs = list(certify(
                task.model, task.x, task.labels, task.method, eps=task.eps, norm=task.norm,
                find_radius=task.find_radius, max_radius=task.max_radius, timeout=task.timeout,
                device=task.device, method_options=task.options,
            ))
        except SpecError:
            if not (task.find_radius and task.grid) or not _grid_is_sound(task.method):
                raise
            certs = _grid_certify(task)
    except Exception as e:  # reported per input, the other tasks go on
        return _error_certs(task, e, time.perf_counter() - t0)
    for c in certs:
        c.index = task.indices[c.index]
    return certs


def _grid_is_sound(method: str) -> bool:
    """The largest radius certified on a grid is a proof for a deterministic method; for a
    probabilistic one it is the best of several tests, each at confidence ``1 - alpha``, which
    holds only at ``1 - k alpha`` (such a method must search its radius itself)."""
    from .registry import method_class

    return method_class(method).guarantee == "deterministic"


def _grid_certify(task: Task) -> list[Certificate]:
    """Largest certified radius on ``task.grid`` for a method without a radius search."""
    from .api import certify

    best: dict[int, Certificate] = {}
    alive = list(range(len(task.indices)))
    spent = [0.0] * len(alive)
    for r in sorted(r for r in task.grid or () if r > 0):
        if not alive:
            break
        table = certify(task.model, task.x[alive], task.labels[alive], task.method, eps=r, norm=task.norm,
                        timeout=task.timeout, device=task.device, method_options=task.options)
        still = []
        for pos, c in zip(alive, table):
            spent[pos] += c.time_s
            if c.status == "certified":
                c.radius = max(c.radius, c.eps if c.eps is not None else r)
                still.append(pos)
            elif pos in best:  # certified at the previous radius, not at this one
                best[pos].details["grid_next"] = {"eps": r, "status": c.status}
            if c.status == "certified" or pos not in best:
                best[pos] = c
        alive = still
    out = []
    for pos in range(len(task.indices)):
        c = best[pos]
        c.index, c.time_s = pos, spent[pos]
        c.details["radius_search"] = "grid"
        out.append(c)
    return out


def _init_worker(threads: int, parent: int | None = None) -> None:
    """Set the worker's torch threads and heap policy (:mod:`verify.heap`) and tie its life to
    the parent process ``parent``."""
    from .heap import start_heap_trimmer

    start_heap_trimmer()
    torch.set_num_threads(threads)
    if parent is not None:
        die_with_parent(parent)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """End this process when the process ``parent`` dies, even by ``kill -9``.

    On Linux the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``);
    everywhere a daemon thread also polls the parent pid every ``poll_s`` seconds (the fallback
    where prctl is missing) and exits when this process has been re-parented.
    """
    import signal
    import threading

    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="certify-parent-watchdog", daemon=True).start()


def _set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` through ctypes; False where it is not available."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _run_task_dicts(task: Task) -> list[dict[str, Any]]:
    return [c.to_dict() for c in run_task(task)]


def execute(tasks: Iterable[Task], executor: str = "local", workers: int | None = None) -> Iterator[tuple[Task, list[Certificate]]]:
    """Run ``tasks``; yield ``(task, certificates)`` as each finishes (order not guaranteed for
    ``process`` and ``ray``)."""
    tasks = list(tasks)
    if executor not in EXECUTORS:
        raise ExecutorError(f"unknown executor {executor!r}; use {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise ExecutorError(f"workers must be >= 1, got {workers}")
    if executor == "local":
        for t in tasks:
            yield t, run_task(t)
    elif executor == "process":
        yield from _execute_process(tasks, workers or usable_cores(2))
    else:
        yield from _execute_ray(tasks, workers)


def _execute_process(tasks: list[Task], workers: int) -> Iterator[tuple[Task, list[Certificate]]]:
    import multiprocessing as mp

    threads = max(1, usable_cores() // workers)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(threads, os.getpid())) as pool:
        pending = {pool.submit(_run_task_dicts, t): t for t in tasks}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                t = pending.pop(fut)
                try:
                    certs = [Certificate.from_dict(d) for d in fut.result()]
                except Exception as e:  # a worker died (e.g. out of memory)
                    certs = _error_certs(t, e, 0.0)
                yield t, certs


def _execute_ray(tasks: list[Task], workers: int | None) -> Iterator[tuple[Task, list[Certificate]]]:
    try:
        import ray
    except ImportError:
        raise ExecutorError("executor 'ray' needs the ray package: pip install 'certify[ray]'") from None
    if not ray.is_initialized():
        ray.init(num_cpus=workers, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(_run_task_dicts)
    pending = {remote.remote(t): t for t in tasks}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            t = pending.pop(ref)
            try:
                certs = [Certificate.from_dict(d) for d in ray.get(ref)]
            except Exception as e:
                certs = _error_certs(t, e, 0.0)
            yield t, certs
