"""Data sets as ``(x, labels)``: ``x [N, *shape]`` float32 in ``[0, 1]``, ``labels [N]`` long.

Loaders:

* :func:`digits` -- scikit-learn's bundled 8x8 digits (1,797 images, pixels ``/ 16``), shape
  ``[N, 1, 8, 8]``. The split is fixed: a permutation of all images drawn with
  ``numpy.random.RandomState(0)``; its first 1,258 images (70 %) are ``"train"``, the last 539 (30 %)
  ``"test"``.
* :func:`mnist` -- MNIST IDX files (``*-images-idx3-ubyte[.gz]`` / ``*-labels-idx1-ubyte[.gz]``),
  pixels ``/ 255``, shape ``[N, 1, 28, 28]``.
* :func:`eran_csv` -- ERAN sample files: one row ``label, pixels 0-255``. 784 values are MNIST
  ``[1, 28, 28]``; 3,072 values are CIFAR-10 stored HWC and returned CHW ``[3, 32, 32]``; any
  other width is returned flat ``[N, width]``.
* :func:`tensor_file` -- ``.npz`` (keys ``x``, ``y``) or ``.pt`` (a dict with ``x``/``y`` or a
  tuple ``(x, y)``). Integer pixel arrays (uint8) are divided by 255.

:func:`load_data` dispatches on a string: ``"digits"`` (``"digits:train"``),
``"mnist:<file or dir>"``, ``"eran-mnist:<csv>"``, ``"eran-cifar:<csv>"``, ``"eran:<csv>"``, or a
path to a ``.npz`` / ``.pt`` / ``.csv`` file or an MNIST directory.
"""
from __future__ import annotations

import csv
import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DataError", "digits", "mnist", "read_idx", "eran_csv", "tensor_file", "load_data", "DIGITS_TEST_FRACTION"]

DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0


class DataError(ValueError):
    """A data file is missing or malformed, or a data spec string is not understood."""


def _as_pair(x: np.ndarray | Tensor, y: np.ndarray | Tensor, limit: int | None) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if not torch.is_floating_point(x):
        x = x.float() / 255.0
    x = x.float()
    if y.dim() != 1 or y.dtype.is_floating_point and not torch.equal(y, y.round()):
        raise DataError(f"labels must be a 1-d integer array, got shape {tuple(y.shape)} dtype {y.dtype}")
    y = y.long()
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    if limit is not None:
        if limit < 0:
            raise DataError(f"limit must be >= 0, got {limit}")
        x, y = x[:limit], y[:limit]
    return x.contiguous(), y.contiguous()


def digits(split: str = "test", limit: int | None = None) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits, ``x [N, 1, 8, 8]`` in ``[0, 1]``, ``labels [N]``.

    ``split``: ``"train"`` (first 70 % of a ``RandomState(0)`` permutation, 1,258 images),
    ``"test"`` (the last 30 %, 539 images) or ``"all"`` (1,797 images, original order).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0
    y = d.target.astype(np.int64)
    if split == "all":
        return _as_pair(x, y, limit)
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(y))
    n_train = len(y) - int(round(DIGITS_TEST_FRACTION * len(y)))
    if split == "train":
        idx = perm[:n_train]
    elif split == "test":
        idx = perm[n_train:]
    else:
        raise DataError(f"digits: unknown split {split!r}; use train, test or all")
    return _as_pair(x[idx], y[idx], limit)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic ``00 00 <type> <ndim>``, ``ndim`` big-endian
    uint32 sizes, then the data (only unsigned-byte data, type 0x08, is supported)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    with _open(path) as f:
        head = f.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0:
            raise DataError(f"{path}: not an IDX file")
        if head[2] != 0x08:
            raise DataError(f"{path}: IDX data type {head[2]:#x} not supported (only unsigned bytes)")
        ndim = head[3]
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8).copy()
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _find(directory: Path, split: str, kind: str) -> Path:
    prefix = "t10k" if split == "test" else "train"
    for suffix in (".gz", ""):
        p = directory / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte{suffix}"
        if p.is_file():
            return p
    raise DataError(f"no MNIST {split} {kind} file ({prefix}-{kind}-idx*-ubyte[.gz]) in {directory}")


def mnist(path: str | Path, split: str = "test", limit: int | None = None) -> tuple[Tensor, Tensor]:
    """MNIST from IDX files, ``x [N, 1, 28, 28]`` (pixels / 255), ``labels [N]``.

    ``path``: a directory holding ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``
    (``train-*`` for ``split="train"``), or the images file itself (the labels file is found
    beside it by name).
    """
    path = Path(path)
    if path.is_dir():
        img, lab = _find(path, split, "images"), _find(path, split, "labels")
    elif path.is_file():
        img = path
        lab = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
        if lab == img or not lab.is_file():
            raise DataError(f"no labels file beside {path} (expected {lab.name})")
    else:
        raise DataError(f"no such file or directory: {path}")
    x = read_idx(img)
    y = read_idx(lab)
    if x.ndim != 3:
        raise DataError(f"{img}: expected [N, rows, cols] images, got shape {x.shape}")
    return _as_pair(x[:, None, :, :], y.astype(np.int64), limit)


def eran_csv(path: str | Path, kind: str | None = None, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """ERAN sample CSV: rows ``label, v_1, ..., v_n`` with ``v`` in 0-255.

    ``kind``: ``"mnist"`` (``[1, 28, 28]``), ``"cifar"`` (HWC in the file -> ``[3, 32, 32]``)
    or ``None`` to decide by the row width (784 -> mnist, 3072 -> cifar, else flat).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    rows = []
    with open(path, newline="") as f:
        for i, r in enumerate(csv.reader(f)):
            if not r:
                continue
            try:
                rows.append([float(v) for v in r])
            except ValueError:
                raise DataError(f"{path}:{i + 1}: non-numeric value") from None
    if not rows:
        raise DataError(f"{path}: empty file")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise DataError(f"{path}: rows have different lengths {sorted(widths)}")
    a = np.asarray(rows, dtype=np.float32)
    y, v = a[:, 0].astype(np.int64), a[:, 1:] / 255.0
    n = v.shape[1]
    kind = kind or {784: "mnist", 3072: "cifar"}.get(n)
    if kind == "mnist":
        if n != 784:
            raise DataError(f"{path}: MNIST rows need 784 pixels, got {n}")
        x = v.reshape(-1, 1, 28, 28)
    elif kind == "cifar":
        if n != 3072:
            raise DataError(f"{path}: CIFAR rows need 3072 values, got {n}")
        x = v.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2)
    elif kind is None:
        x = v
    else:
        raise DataError(f"eran_csv: unknown kind {kind!r}; use mnist or cifar")
    return _as_pair(torch.from_numpy(np.ascontiguousarray(x)), y, limit)


def tensor_file(path: str | Path, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """``.npz`` with arrays ``x`` and ``y``, or ``.pt`` holding ``{"x": ..., "y": ...}`` or
    ``(x, y)`` (loaded with ``weights_only=True``: plain tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    if path.suffix == ".npz":
        with np.load(path) as z:
            missing = {"x", "y"} - set(z.files)
            if missing:
                raise DataError(f"{path}: needs arrays x and y, has {sorted(z.files)}")
            return _as_pair(z["x"], z["y"], limit)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors have many types
        raise DataError(f"{path}: cannot read as a torch file ({e})") from None
    if isinstance(obj, dict):
        if not {"x", "y"} <= set(obj):
            raise DataError(f"{path}: a dict of tensors needs keys x and y, has {sorted(map(str, obj))}")
        return _as_pair(obj["x"], obj["y"], limit)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return _as_pair(obj[0], obj[1], limit)
    raise DataError(f"{path}: expected a dict with x, y or a pair (x, y), got {type(obj).__name__}")


def load_data(spec: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Load a data set named by a string (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if len(kind) == 1 and sep:  # a Windows drive letter, not a prefix
        kind, rest = "", spec
    kind = kind.lower()
    if kind == "digits":
        return digits(rest or "test", limit=limit)
    if sep and kind == "mnist":
        return mnist(rest, limit=limit)
    if sep and kind in ("eran", "eran-mnist", "eran-cifar", "eran-cifar10"):
        return eran_csv(rest, {"eran": None, "eran-mnist": "mnist"}.get(kind, "cifar"), limit=limit)
    path = Path(spec)
    if not path.exists():
        raise DataError(
            f"data {spec!r}: no such file; use digits, mnist:<dir>, eran-mnist:<csv>, eran-cifar:<csv> or a .npz/.pt/.csv path"
        )
    if path.is_dir() or "idx3-ubyte" in path.name:
        return mnist(path, limit=limit)
    if path.suffix in (".npz", ".pt", ".pth"):
        return tensor_file(path, limit=limit)
    if path.suffix == ".csv":
        return eran_csv(path, limit=limit)
    raise DataError(f"data {spec!r}: unknown file type {path.suffix!r} (expected .npz, .pt, .csv or IDX)")
