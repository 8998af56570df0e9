"""Tiny MNIST IDX reader for the benchmarks (no torchvision).

IDX files (LeCun's format): images have a 16-byte header (magic, count, rows, cols, big
endian) then ``count * rows * cols`` uint8 pixels; labels an 8-byte header then ``count`` uint8.
``../shared/data/mnist`` holds the test split (``t10k-*``), gzipped. Pixels are scaled to
[0, 1] (``/255``), no other normalisation.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["shared_dir", "read_idx_images", "read_idx_labels", "load_mnist_test"]

REPO = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """``$CERTIFY_SHARED`` or ``../shared`` beside the repository."""
    env = os.environ.get("CERTIFY_SHARED")
    d = Path(env) if env else REPO.parent / "shared"
    if not (d / "data").is_dir():
        raise FileNotFoundError(f"shared data directory not found at {d}; set CERTIFY_SHARED")
    return d


def _read(path: Path) -> bytes:
    with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
        return f.read()


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """``[N, rows, cols]`` uint8 from an IDX3 file (gzipped or not)."""
    raw = _read(Path(path))
    magic, n, r, c = (int.from_bytes(raw[i : i + 4], "big") for i in (0, 4, 8, 12))
    if magic != 2051:
        raise ValueError(f"{path}: not an IDX3 image file (magic {magic})")
    return np.frombuffer(raw, dtype=np.uint8, offset=16, count=n * r * c).reshape(n, r, c)


def read_idx_labels(path: str | os.PathLike) -> np.ndarray:
    """``[N]`` uint8 from an IDX1 file (gzipped or not)."""
    raw = _read(Path(path))
    magic, n = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    if magic != 2049:
        raise ValueError(f"{path}: not an IDX1 label file (magic {magic})")
    return np.frombuffer(raw, dtype=np.uint8, offset=8, count=n).copy()


def load_mnist_test(root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST test split: ``x [10000, 1, 28, 28]`` float32 in [0, 1], ``y [10000]`` long."""
    d = Path(root) if root is not None else shared_dir() / "data" / "mnist"
    x = read_idx_images(d / "t10k-images-idx3-ubyte.gz")
    y = read_idx_labels(d / "t10k-labels-idx1-ubyte.gz")
    return torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(y.astype(np.int64))
