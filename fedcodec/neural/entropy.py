"""A factorized entropy model (one learned univariate density per latent channel) and real range
coding of quantized latents with ``constriction``.

The density follows Ballé et al. (2018, appendix 6.1): each channel's cumulative distribution is a
small monotone network ``c(v)`` (softplus-positive matrices, tanh gates), and the probability of a
quantized value ``k`` is ``c(k + ½) − c(k − ½)``. Training uses additive uniform noise in place of
rounding, so the same expression is the noisy latent's likelihood.

For coding, the density is turned into integer frequency tables (:class:`Tables`, ``2**PRECISION``
counts per channel over a support ``lo..hi`` plus one escape symbol); values outside the support
are coded as the escape symbol followed by a raw 16-bit value. Encoder and decoder build the coder
from the same integers, so decoding is bit-exact on any machine, and the tables' fingerprint
identifies the entropy model in a file header.

Quantization offsets (optional, ``NTCConfig.offsets``). Rounding every channel on the integer grid
``round(y)`` wastes rate when a channel's density is not centred on an integer: a density centred at
0.5 splits its mass evenly between two bins. As CompressAI's ``EntropyBottleneck`` does with its
``medians``, the grid can instead be centred on each channel's median ``m_c`` of the learned density
(:meth:`FactorizedPrior.medians`): the coded symbol is ``k = round(y − m_c)``, the decoder's latent is
``ŷ = k + m_c``, and symbol ``k``'s table entry is the density's mass on ``[k + m_c − ½, k + m_c + ½]``
(:meth:`FactorizedPrior.tables` with ``offsets=True``). The medians are derived from the prior's
parameters, so a personalized (client-local) entropy model has personal offsets at no cost in bytes:
nothing is transmitted, both ends compute them. They are found by bisection in float64 on the monotone
CDF logits and rounded to multiples of :data:`OFFSET_GRID` (``2**-16``, at most :data:`SUPPORT` in
magnitude, so exact in float32), and :class:`Tables` carries them (``Tables.offsets``) inside its
fingerprint: a file made with other offsets, or none, is refused as made with another entropy model.
Training is unchanged: additive uniform noise ``y + u`` has the same likelihood whatever grid is later
used for rounding. With offsets off (``Tables.offsets`` None) everything is exactly as before.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PayloadError

PRECISION = 20  # log2 of each channel's total count
SUPPORT = 255  # the table spans at most -SUPPORT..SUPPORT around zero
TAIL = 1e-7  # probability mass left to the escape symbol on each side of the support
RAW = 1 << 16  # escaped values travel as raw 16-bit numbers
RAW_MIN = -(1 << 15)
OFFSET_GRID = 2.0 ** -16  # medians are rounded to multiples of this, so both ends agree exactly
MEDIAN_STEPS = 80  # bisection steps (fixed: the result is a deterministic function of the parameters)


class FactorizedPrior(nn.Module):
    """Per-channel learned density over ``channels`` latent channels (dimension 1 of the latents)."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
        dims = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(dims) - 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(dims) - 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(dims) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def _logits(self, v: torch.Tensor) -> torch.Tensor:
        """``v``: (channels, 1, n) → the CDF's logits at those points, same shape."""
        for i, (m, b) in enumerate(zip(self.matrices, self.biases)):
            v = torch.matmul(F.softplus(m.to(v.dtype)), v) + b.to(v.dtype)
            if i < len(self.factors):
                v = v + torch.tanh(self.factors[i].to(v.dtype)) * torch.tanh(v)
        return v

    def _interval(self, v: torch.Tensor) -> torch.Tensor:
        """P(v − ½ < Y ≤ v + ½) for ``v`` of shape (channels, 1, n), computed on the side of the
        median where it is accurate."""
        lower, upper = self._logits(v - 0.5), self._logits(v + 0.5)
        sign = -torch.sign(lower + upper).detach()
        return torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """The probability of each entry of ``y`` (batch, channels, ...) under its channel's model."""
        if y.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got shape {tuple(y.shape)}")
        moved = y.transpose(0, 1)
        v = moved.reshape(self.channels, 1, -1)
        p = self._interval(v).clamp_min(1e-9)
        return p.reshape(moved.shape).transpose(0, 1)

    @torch.no_grad()
    def medians(self) -> np.ndarray:
        """Each channel's median of the learned density (the ``v`` whose CDF logit is 0) as float64,
        (channels,): bisection in float64 from a bracket grown until it holds the median, a fixed
        number of steps, then clamped to ±:data:`SUPPORT` and rounded to multiples of
        :data:`OFFSET_GRID`, so encoder and decoder derive the same offsets from the same parameters."""
        def logits(v: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(v).reshape(self.channels, 1, 1)
            return self._logits(t).reshape(-1).numpy()

        lo = np.full(self.channels, -float(SUPPORT))
        hi = np.full(self.channels, float(SUPPORT))
        for _ in range(64):  # grow each bracket until logit(lo) <= 0 <= logit(hi) (or give up far out)
            below, above = logits(lo) > 0, logits(hi) < 0
            if not (below.any() or above.any()):
                break
            lo = np.where(below, 2 * lo, lo)
            hi = np.where(above, 2 * hi, hi)
        for _ in range(MEDIAN_STEPS):
            mid = 0.5 * (lo + hi)
            up = logits(mid) > 0  # the median lies below mid
            hi, lo = np.where(up, mid, hi), np.where(up, lo, mid)
        m = np.clip(0.5 * (lo + hi), -SUPPORT, SUPPORT)
        m = np.where(np.isfinite(m), m, 0.0)
        return np.round(m / OFFSET_GRID) * OFFSET_GRID

    @torch.no_grad()
    def tables(self, offsets: bool = False) -> "Tables":
        """Integer frequency tables for coding (computed in float64 once, then exact integers); with
        ``offsets`` symbol ``k`` of channel ``c`` stands for ``k + medians()[c]`` (see the module
        docstring), without it for ``k``."""
        med = self.medians() if offsets else None
        grid = torch.arange(-SUPPORT, SUPPORT + 1, dtype=torch.float64).expand(self.channels, 1, -1)
        if med is not None:
            grid = grid + torch.from_numpy(med).reshape(self.channels, 1, 1)
        pmf = self._interval(grid.contiguous()).squeeze(1).numpy()
        los, counts = [], []
        for c in range(self.channels):
            p = pmf[c]
            cum = np.cumsum(p)
            lo = int(np.searchsorted(cum, TAIL))  # first index whose cumulative mass exceeds the tail
            hi = int(min(np.searchsorted(cum, cum[-1] - TAIL), len(p) - 1))
            hi = max(hi, lo)
            body = p[lo:hi + 1]
            escape = max(1.0 - float(body.sum()), 2.0 ** -(PRECISION - 4))
            counts.append(_quantize(np.append(body, escape)))
            los.append(lo - SUPPORT)
        return Tables(np.array(los, np.int32), counts, med)


def _quantize(p: np.ndarray) -> np.ndarray:
    """Probabilities → positive integer counts summing to ``2**PRECISION`` (every symbol ≥ 1)."""
    total = 1 << PRECISION
    p = np.maximum(p, 0.0) / max(float(np.sum(p)), 1e-300)
    counts = np.maximum(np.floor(p * (total - len(p))).astype(np.int64), 0) + 1
    counts[int(np.argmax(counts))] += total - int(counts.sum())  # the mode absorbs the rounding
    return counts


@dataclass
class Tables:
    """Coding tables: channel ``c`` codes symbols ``lo[c] .. lo[c] + len(counts[c]) − 2`` directly;
    the last symbol of ``counts[c]`` is the escape. Symbols are integers either way; with ``offsets``
    symbol ``k`` of channel ``c`` stands for the latent ``k + offsets[c]`` (the coder adds them)."""

    lo: np.ndarray
    counts: list[np.ndarray]
    #: each channel's quantization offset (float64, multiples of OFFSET_GRID), or None: the integer grid
    offsets: np.ndarray | None = None

    @property
    def fingerprint(self) -> bytes:
        """8 bytes naming the tables and, when present, the offsets (tables without offsets hash as
        they always did)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(self.lo.astype("<i4").tobytes())
        for c in self.counts:
            h.update(len(c).to_bytes(4, "little") + c.astype("<i8").tobytes())
        if self.offsets is not None:
            h.update(b"offsets" + np.asarray(self.offsets, "<f8").tobytes())
        return h.digest()

    def _models(self):
        import constriction

        return [constriction.stream.model.Categorical(c / float(1 << PRECISION), perfect=False)
                for c in self.counts]

    def encode(self, symbols: np.ndarray) -> bytes:
        """Integer latents (batch, channels, ...) → range-coded bytes."""
        import constriction

        sym = np.asarray(symbols, np.int64)
        enc = constriction.stream.queue.RangeEncoder()
        raws = []
        for c, model in enumerate(self._models()):
            v = sym[:, c].reshape(-1) - int(self.lo[c])
            size = len(self.counts[c]) - 1
            esc = (v < 0) | (v >= size)
            v = np.where(esc, size, v).astype(np.int32)
            enc.encode(v, model)
            raws.append(sym[:, c].reshape(-1)[esc])
        raw = np.concatenate(raws) if raws else np.zeros(0, np.int64)
        if raw.size:
            if raw.min() < RAW_MIN or raw.max() >= RAW_MIN + RAW:
                raise ValueError("latent value outside the 16-bit range; clamp before coding")
            enc.encode((raw - RAW_MIN).astype(np.int32), constriction.stream.model.Uniform(RAW))
        return enc.get_compressed().astype("<u4").tobytes()

    def decode(self, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`encode` for latents of ``shape``; a stream that does not decode to
        exactly ``shape`` raises :class:`PayloadError`."""
        import constriction

        if len(data) % 4:
            raise PayloadError("size", f"range-coded stream of {len(data)} bytes is not whole 32-bit words")
        if shape[1] != len(self.counts):
            raise PayloadError("shape", f"latents have {shape[1]} channels, the entropy model {len(self.counts)}")
        per_channel = int(np.prod(shape, dtype=np.int64)) // shape[1]
        out = np.empty((shape[1], per_channel), np.int64)
        try:
            dec = constriction.stream.queue.RangeDecoder(np.frombuffer(data, "<u4").astype(np.uint32))
            escaped = []
            for c, model in enumerate(self._models()):
                v = np.asarray(dec.decode(model, per_channel), np.int64)
                escaped.append(v == len(self.counts[c]) - 1)
                out[c] = v + int(self.lo[c])
            n_raw = int(sum(int(e.sum()) for e in escaped))
            if n_raw:
                raw = np.asarray(dec.decode(constriction.stream.model.Uniform(RAW), n_raw), np.int64) + RAW_MIN
                pos = 0
                for c, e in enumerate(escaped):
                    k = int(e.sum())
                    out[c][e] = raw[pos:pos + k]
                    pos += k
        except PayloadError:
            raise
        except Exception as err:  # constriction reports malformed streams with its own exceptions
            raise PayloadError("stream", f"range-coded stream does not decode: {err}") from None
        moved = (shape[1], shape[0], *shape[2:])
        return np.ascontiguousarray(out.reshape(moved).swapaxes(0, 1))
