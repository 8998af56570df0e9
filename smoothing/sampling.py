"""Batched Monte Carlo for smoothing: draw noise on the device, run the base model, count.

One sweep serves a whole batch of inputs ``x [B, *shape]`` (images, vectors, embeddings: any
shape) and several independent sample *streams* per input (e.g. CERTIFY's ``n0`` selection
samples and ``n`` estimation samples). Samples are drawn in blocks of at most ``chunk``
(from ``batch_size`` and a memory budget); blocks of several inputs are packed into one
forward pass of at most ``chunk`` rows; outputs are reduced on the device (``bincount`` for
class counts). No Python loop runs over samples.

Randomness and repeatability:

* ``share_noise=True`` (default): one generator per stream, seeded from ``(seed, stream)``;
  sample ``j`` of every input of the batch uses the same noise vector. Why each certificate
  keeps its guarantee exactly: for any one input ``x_b``, its selection and estimation draws
  are i.i.d. from the noise, the two streams are independent of each other, and neither
  depends on ``x_b`` or on the other inputs' results -- which is all CERTIFY's proof uses
  (Cohen et al. 2019, Prop. 2: the estimation count is Binomial(n, pA) given the selected
  class), so ``P(certificate of x_b wrong) <= alpha`` for every ``b``, exactly as with
  independent noise: the joint law of one input's counts is the same in both modes. The
  noise of an input depends on ``(seed, stream, chunk size)`` only, not on the other inputs:
  a batch of 1 gives exactly the certificate of a batch of N, and seeded runs repeat.
  What is lost is independence *between* inputs (and between calls with the same seed):
  failures are correlated (an unlucky draw hits them all), so the number of wrong
  certificates among ``B`` inputs is not Binomial(B, alpha); its mean is still
  ``<= alpha B`` and ``P(any wrong) <= alpha B`` (union bound), but a certified accuracy
  measured on a dataset has a larger Monte-Carlo variance. Why it is the default: the
  draw itself is the cost of CERTIFY on a CPU. torch's ``normal_`` costs ~3.4 ns per
  coordinate, ~15% of a small MNIST CNN's forward pass on one thread, more than the 5%
  budget, and no exact sampler in torch or numpy is fast enough to fit (benchmarks/RESULTS.md
  section 5); shared across ``B`` inputs the draw costs ``1/B`` of that.
* ``share_noise=False``: every (input, stream) has its own ``torch.Generator`` seeded from
  ``(seed, stream, the bytes of the input)``: independent noise for different inputs (use
  it for experiments that pool many inputs as independent trials, e.g. an empirical check
  of the failure rate). The noise an input receives does not depend on its position or on
  the other inputs of the batch. Identical inputs receive identical noise (each
  certificate is still valid on its own).

The noise is fresh for every block: no noise draw is ever reused for a second block or a
second stream. Memory: one input buffer of ``chunk`` rows is allocated per call and reused by
every forward pass; each block's rows of it are overwritten in place by a fresh draw
(``noise.fill_``) and then ``x[b]`` is added in place, so no pass allocates (a fresh 3 MB
buffer per pass of 1,000 MNIST rows cost ~960 page faults, 0.3 ms or more on CPU, about 2% of
a small CNN's forward pass).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, TypedDict, Unpack

import numpy as np
import torch
from torch import Tensor


__all__ = [
    "SamplingTimeout",
    "chunk_size",
    "seed_generator",
    "input_generators",
    "Perturb",
    "SamplingOptions",
    "monte_carlo",
    "count_classes",
]


class NoiseSource(Protocol):
    """What the sampler draws from: a :class:`~smoothing.noise.Noise`, or any object that fills
    a tensor in place (:class:`smoothing.inverse.UnitSampler`)."""

    def fill_(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


class SamplingTimeout(RuntimeError):
    """The deadline passed during sampling."""


def chunk_size(sample_numel: int, element_size: int = 4, batch_size: int = 1000, memory_mb: float | None = None) -> int:
    """Rows per forward pass: ``batch_size``, capped so that the noisy inputs of one pass
    (``rows * sample_numel * element_size`` bytes, counted twice for noise and model
    activations of the first layer) fit in ``memory_mb`` mebibytes. At least 1."""
    rows = int(batch_size)
    if rows < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if memory_mb is not None:
        if memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, got {memory_mb}")
        rows = min(rows, int(memory_mb * 2**20 // (2 * max(1, sample_numel) * element_size)))
    return max(1, rows)


def _digest(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def seed_generator(device: torch.device, *parts: bytes) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by a hash of ``parts``."""
    g = torch.Generator(device=device)
    g.manual_seed(_digest(*parts))
    return g


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().contiguous()
    return str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def input_generators(x: Tensor, seed: int, stream: str) -> list[torch.Generator]:
    """One generator per input ``x[b]`` seeded from ``(seed, stream, bytes of x[b])``."""
    s = str(int(seed)).encode()
    return [seed_generator(x.device, s, stream.encode(), _tensor_bytes(x[b])) for b in range(x.shape[0])]


#: ``perturb(x_rows [S, *shape], params [S, *param_shape]) -> model inputs [S, *shape]``;
#: ``None`` means additive noise ``x + params``.
Perturb = Callable[[Tensor, Tensor], Tensor]


class SamplingOptions(TypedDict, total=False):
    """The keyword options of the Monte Carlo that every smoothing entry point (``certify``,
    ``predict``, ``certify_topk``, ``certify_semantic``, the sound semantic certificates,
    ``sample_outputs``, ``percentile_bounds``, ``estimate_invariance``) passes on to
    :func:`monte_carlo` unchanged (``**sampling``); one not given takes :func:`monte_carlo`'s
    default.

    Keys:
        seed: base seed of the noise streams (default 0).
        batch_size, memory_mb: rows per forward pass, see :func:`chunk_size` (1000, ``None``).
        share_noise: one noise stream for the whole batch (default ``True``; see the module
            docstring); ``False``: independent noise per input.
        deadline: ``time.perf_counter()`` value after which :class:`SamplingTimeout` is raised
            (default ``None``: none).
    """

    seed: int
    batch_size: int
    memory_mb: float | None
    share_noise: bool
    deadline: float | None


@dataclass
class _Block:
    slot: int  # accumulator row (stream * B + b)
    b: int  # input index
    start: int  # position of the first sample within the slot
    count: int
    gen: torch.Generator | None  # independent mode
    noise: Tensor | None = None  # shared mode: the block's noise [count, *param_shape]


def monte_carlo(
    model: torch.nn.Module,
    x: Tensor,
    noise: NoiseSource,
    nums: Sequence[int],
    consume: Callable[[Tensor, Tensor, Tensor], None],
    *,
    streams: Sequence[str] | None = None,
    perturb: Perturb | None = None,
    param_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    memory_mb: float | None = None,
    share_noise: bool = True,
    deadline: float | None = None,
) -> None:
    """Run the base model on noisy copies of every input, streaming outputs to ``consume``.

    Args:
        model: base model, ``[S, *shape] -> [S, K]`` (any trailing output shape is flattened).
        x: clean inputs ``[B, *shape]`` on the model's device.
        noise: the noise; drawn with shape ``[m, *param_shape]``.
        nums: samples per stream (e.g. ``[n0, n]``); stream ``s`` of input ``b`` fills
            accumulator slot ``s * B + b``.
        consume: ``consume(slot [S] long, pos [S] long, out [S, K])`` for each forward
            pass; ``pos`` is the index of each row's sample within its slot. ``out`` may
            share memory with the reused input buffer (e.g. an identity model): copy what
            you keep beyond the call.
        streams: the streams' names, seeded from ``(seed, streams[s])`` (default ``"s0", "s1", ...``).
        perturb: how a noise sample acts on an input (default: added).
        param_shape: shape of one noise sample (default ``x.shape[1:]``).
        seed, batch_size, memory_mb, share_noise, deadline: see :class:`SamplingOptions`.
    """
    shape = tuple(x.shape[1:])
    pshape = shape if param_shape is None else tuple(param_shape)
    chunk = chunk_size(math.prod(shape), x.element_size(), batch_size, memory_mb)
    names = list(streams) if streams is not None else [f"s{i}" for i in range(len(nums))]
    if len(names) != len(nums):
        raise ValueError("streams and nums differ in length")
    buf: Tensor | None = None  # one input buffer, reused by every pass (no allocation per pass)
    for blocks in _passes(x, noise, names, nums, chunk, pshape, seed, share_noise):
        if deadline is not None and time.perf_counter() > deadline:
            raise SamplingTimeout("sampling passed its deadline")
        S = sum(bl.count for bl in blocks)
        if buf is None:
            buf = torch.empty((chunk, *pshape), device=x.device, dtype=x.dtype)
        rows = buf[:S]
        _fill_rows(rows, blocks, x, noise, perturb is None)
        slot, pos, bidx = _row_index(blocks, S, x.device)
        inp = rows if perturb is None else perturb(x.index_select(0, bidx), rows)
        out = model(inp)
        consume(slot, pos, out.reshape(S, -1))


def _passes(x: Tensor, noise: NoiseSource, names: list[str], nums: Sequence[int], chunk: int, pshape: tuple[int, ...],
            seed: int, share_noise: bool) -> Iterator[list["_Block"]]:
    """The forward passes: lists of blocks (one input's consecutive samples of one stream) whose
    counts add up to at most ``chunk``. Shared noise is drawn here, once per stream and chunk;
    independent noise is drawn into the rows later, from each input's own generator."""
    B, dev, dt = x.shape[0], x.device, x.dtype
    sbytes = str(int(seed)).encode()
    cur: list[_Block] = []
    used = 0
    for s, (name, num) in enumerate(zip(names, nums)):
        num = int(num)
        if num <= 0:
            continue
        if share_noise:
            gen = seed_generator(dev, sbytes, name.encode(), b"shared")
            for start in range(0, num, chunk):
                m = min(chunk, num - start)
                nz = torch.empty((m, *pshape), device=dev, dtype=dt)
                noise.fill_(nz, gen)
                for b in range(B):
                    if used + m > chunk:
                        yield cur
                        cur, used = [], 0
                    cur.append(_Block(s * B + b, b, start, m, None, nz))
                    used += m
        else:
            gens = input_generators(x, seed, name)
            for b in range(B):
                for start in range(0, num, chunk):
                    m = min(chunk, num - start)
                    if used + m > chunk:
                        yield cur
                        cur, used = [], 0
                    cur.append(_Block(s * B + b, b, start, m, gens[b]))
                    used += m
    if cur:
        yield cur


def _fill_rows(rows: Tensor, blocks: list["_Block"], x: Tensor, noise: NoiseSource, add: bool) -> None:
    """Write the pass's noisy inputs into ``rows [S, *shape]`` (or the bare noise, ``add=False``,
    for a perturbation that applies it itself)."""
    a = 0
    for bl in blocks:
        part = rows[a : a + bl.count]
        if bl.noise is not None:  # shared noise: one fused copy-and-add
            if add:
                torch.add(bl.noise, x[bl.b], out=part)
            else:
                part.copy_(bl.noise)
        else:
            noise.fill_(part, bl.gen)  # fresh draw, in place
            if add:
                part.add_(x[bl.b])
        a += bl.count


def _row_index(blocks: list["_Block"], S: int, dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of the pass: its accumulator slot, its sample's index within the slot and its
    input, ``[S]`` each (host bookkeeping with a few small numpy ops, one transfer each)."""
    k = len(blocks)
    cnt = np.fromiter((bl.count for bl in blocks), dtype=np.int64, count=k)
    first = np.cumsum(cnt) - cnt  # row of each block's first sample
    slot = torch.from_numpy(np.repeat(np.fromiter((bl.slot for bl in blocks), dtype=np.int64, count=k), cnt)).to(dev)
    start = np.fromiter((bl.start for bl in blocks), dtype=np.int64, count=k)
    pos = torch.from_numpy(np.arange(S, dtype=np.int64) + np.repeat(start - first, cnt)).to(dev)
    bidx = torch.from_numpy(np.repeat(np.fromiter((bl.b for bl in blocks), dtype=np.int64, count=k), cnt)).to(dev)
    return slot, pos, bidx


def count_classes(
    model: torch.nn.Module,
    x: Tensor,
    noise: NoiseSource,
    nums: Sequence[int],
    *,
    streams: Sequence[str] | None = None,
    perturb: Perturb | None = None,
    param_shape: tuple[int, ...] | None = None,
    **sampling: Unpack[SamplingOptions],
) -> Tensor:
    """Class counts of the base model's argmax under noise (arguments as :func:`monte_carlo`'s).

    Returns:
        ``[len(nums), B, K]`` int64 counts on ``x.device``: ``counts[s, b, c]`` is how many of
        stream ``s``'s samples of input ``b`` the model put in class ``c``.
    """
    B = x.shape[0]
    S = len(nums)
    acc: dict[str, Tensor] = {}

    def consume(slot: Tensor, pos: Tensor, out: Tensor) -> None:
        K = out.shape[1]
        if "c" not in acc:
            acc["c"] = torch.zeros(S * B * K, dtype=torch.long, device=out.device)
        pred = out.argmax(dim=1)
        acc["c"] += torch.bincount(slot * K + pred, minlength=S * B * K)

    with torch.inference_mode():
        monte_carlo(model, x, noise, nums, consume, streams=streams, perturb=perturb, param_shape=param_shape, **sampling)
    if "c" not in acc:  # no samples at all: K from one clean forward pass
        with torch.inference_mode():
            K = model(x[:1]).reshape(1, -1).shape[1]
        return torch.zeros(S, B, K, dtype=torch.long, device=x.device)
    return acc["c"].view(S, B, -1)
