"""Results that survive faults: resuming a results CSV safely.

* :func:`drop_partial_last_row` -- a run killed while writing leaves a partial last CSV row;
  it is removed (with a warning naming the file) before anything is appended or read.
* :class:`RunKey` -- what the rows of a ``compare`` results CSV were computed from: the model
  (a digest of its file or its weights), the norm, one digest per input (data point and label)
  and, per method, its options and radius-search settings. It is stored beside the CSV
  (``<prefix>_results.key.json``); ``compare --resume`` refuses a folder whose rows came from
  another model, norm or data, and recomputes a method whose options changed.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CertifyError

__all__ = ["drop_partial_last_row", "RunKey", "ResumeError", "model_digest", "input_digests"]


class ResumeError(CertifyError):
    """The results to resume were computed on another model, norm or data (or cannot be read)."""


def drop_partial_last_row(path: str | os.PathLike) -> str | None:
    """Remove a partial last row of the CSV at ``path`` (no final newline, fewer fields than the
    header, or an unterminated quoted field): what a kill during a write leaves. Returns the
    warning (also issued with :func:`warnings.warn`) or ``None`` when the file is whole."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return None
    text = p.read_bytes().decode("utf-8", errors="replace")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return None
    whole = text.endswith("\n") and (len(rows) == 1 or len(rows[-1]) == len(rows[0]))
    if whole:
        return None
    keep = rows[:-1]
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(keep)  # the excel dialect, as csv.DictWriter wrote them
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(buf.getvalue(), newline="")
    os.replace(tmp, p)
    msg = f"{p}: dropped a partial last row (an interrupted write): {len(keep) - 1} complete rows kept"
    warnings.warn(msg, stacklevel=2)
    return msg


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tensor_bytes(t: Tensor) -> bytes:
    """dtype, shape and raw bytes (any dtype, bfloat16 included, on any device)."""
    t = t.detach().to("cpu").contiguous()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def model_digest(model: Any) -> str:
    """A digest of a model file's bytes, or of a module's class, parameters and buffers."""
    if isinstance(model, (str, os.PathLike)):
        h = hashlib.sha256()
        with open(model, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()[:16]
    if isinstance(model, nn.Module):
        h = hashlib.sha256(type(model).__name__.encode())
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(_tensor_bytes(t))
        return h.hexdigest()[:16]
    return _sha(repr(model).encode())


def input_digests(x: Tensor, labels: Tensor) -> list[str]:
    """One digest per input: the data point (its values, dtype and shape) and its label."""
    return [_sha(_tensor_bytes(x[i]) + str(int(labels[i])).encode()) for i in range(len(labels))]


def settings_digest(settings: dict[str, Any]) -> str:
    """A digest of a method's options and radius-search settings (JSON, sorted keys)."""
    return _sha(json.dumps(settings, sort_keys=True, default=repr).encode())


@dataclass
class RunKey:
    """What a compare results CSV was computed from (see the module docstring)."""

    model: str
    norm: str
    inputs: list[str]
    methods: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def path_for(csv_path: Path) -> Path:
        return csv_path.with_name(csv_path.name.removesuffix(".csv") + ".key.json")

    @classmethod
    def load(cls, csv_path: Path) -> "RunKey | None":
        p = cls.path_for(csv_path)
        if not p.is_file():
            return None
        try:
            d = json.loads(p.read_text())
            return cls(d["model"], d["norm"], list(d["inputs"]), dict(d.get("methods", {})))
        except (ValueError, KeyError, TypeError) as e:
            raise ResumeError(f"{p}: cannot read the run key: {e}") from None

    def save(self, csv_path: Path) -> None:
        p = self.path_for(csv_path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps({"model": self.model, "norm": self.norm, "inputs": self.inputs, "methods": self.methods}))
        os.replace(tmp, p)

    def check_resumable(self, old: "RunKey | None", csv_path: Path) -> None:
        """Refuse to resume rows computed on another model, norm or data (one line naming the
        file and the first difference)."""
        where = f"cannot resume {csv_path}"
        if old is None:
            raise ResumeError(f"{where}: it has no run key ({self.path_for(csv_path).name}), so its rows cannot be "
                              "matched to this model and data; remove it or choose another --out/--prefix")
        if old.model != self.model:
            raise ResumeError(f"{where}: its rows were computed with another model (digest {old.model}, now {self.model})")
        if old.norm != self.norm:
            raise ResumeError(f"{where}: its rows are for the {old.norm} norm, not {self.norm}")
        for i, (a, b) in enumerate(zip(old.inputs, self.inputs)):
            if a != b:
                raise ResumeError(f"{where}: input {i} differs from the one its rows were computed on (other data or order)")

    def merged(self, old: "RunKey | None") -> "RunKey":
        """This key, keeping the digests of inputs (beyond this run's) and methods that only
        ``old`` has."""
        if old is None:
            return self
        inputs = self.inputs + old.inputs[len(self.inputs):]
        return RunKey(self.model, self.norm, inputs, {**old.methods, **self.methods})
