"""Compress data with a trained NTC model to real bytes, and back.

File format (``.fcn``; all integers little-endian)::

    b"FCNC" | version u8 | kind u8 (0 image, 1 array) | transform fingerprint 8B |
    entropy-model fingerprint 8B | ndim u8 | ndim x u32 data shape | latent ndim u8 |
    latent ndim x u32 latent shape | u32 stream length | range-coded stream | BLAKE2b-8 checksum

The checksum covers everything before it, so a corrupted file is reported, never decoded to
garbage; the two fingerprints name the synthesis transform and the entropy model (its integer
tables and, for a model with ``offsets``, its quantization offsets: see
:mod:`fedcodec.neural.entropy`), so decoding with another client's codec, or with the same model
quantizing on another grid, is refused with a message saying so. The stream holds integer symbols
either way; with offsets the decoder adds each channel's offset before the synthesis transform.

A checksum only proves the file is intact, not that its maker was friendly, so every declared size
is checked before anything is allocated: at most :data:`MAX_ELEMENTS` data values and
:data:`MAX_LATENT` latent values, a stream of at most 5 bytes per latent value (what the largest
escaped value costs) and at least half of what the entropy model makes the cheapest values cost
(:meth:`Coder.min_stream_bits`), every dimension >= 1, and an estimate of the synthesis
transform's activation memory per decoded chunk (:func:`decode_bytes`) of at most
:data:`MAX_DECODE_BYTES`; larger batches are decoded in chunks. :meth:`Coder.compress` refuses data
beyond the same limits, so every file it writes can be decoded. :func:`read_file` reads at most
:data:`MAX_FILE_BYTES`. Failures raise :class:`~fedcodec.errors.CodecFileError`.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CodecFileError, ConfigError, PayloadError
from ..files import read_bounded
from .entropy import PRECISION, RAW, RAW_MIN, Tables
from .models import NTC

__all__ = ["Coder", "CodecFileError", "read_file", "MAX_ELEMENTS", "MAX_LATENT", "MAX_DECODE_BYTES"]

MAGIC = b"FCNC"
VERSION = 1
KINDS = {"image": 0, "array": 1}
#: data values one file may hold (float32: 256 MiB decoded)
MAX_ELEMENTS = 1 << 26
#: latent values one file may hold (int64 symbols: 128 MiB)
MAX_LATENT = 1 << 24
#: estimated peak activation memory of the synthesis transform on one decoded chunk; a single image
#: needing more is refused (its size is what it is), batches are decoded in chunks below it
MAX_DECODE_BYTES = 1 << 30
#: the most stream bytes per latent value (an escape costs at most 20 bits, its raw value 16), plus slack
STREAM_BYTES_PER_LATENT, STREAM_SLACK = 5, 64
MAX_HEADER = 4 + 2 + 16 + 2 * (1 + 4 * 8) + 4
MAX_FILE_BYTES = MAX_HEADER + STREAM_BYTES_PER_LATENT * MAX_LATENT + STREAM_SLACK + 8
IMAGE_CHANNELS = (1, 3, 4)  # an "image" file decodes to grey, RGB or RGBA


def read_file(path: str | Path) -> bytes:
    """The bytes of a ``.fcn`` file, refusing (before reading) one larger than :data:`MAX_FILE_BYTES`;
    a missing or unreadable file is a :class:`ConfigError`."""
    path = Path(path)
    data = read_bounded(path, MAX_FILE_BYTES)
    if len(data) > MAX_FILE_BYTES:
        raise CodecFileError("size", f"{path} is larger than any .fcn file ({MAX_FILE_BYTES:,} bytes at most)")
    return data


@dataclass
class Coder:
    """One client's codec: the model (shared transforms + that client's prior) and its tables.

    ``tables`` may be None where nothing is coded (rate estimates in evaluation); the quantization
    offsets are then derived from the model (``prior.medians()`` when ``model.cfg.offsets``), and
    otherwise are the tables' (``Tables.offsets``, None: the integer grid)."""

    model: NTC
    tables: Tables | None

    @classmethod
    def of(cls, model: NTC) -> "Coder":
        model.eval()
        return cls(model, model.prior.tables(offsets=model.cfg.offsets))

    def __post_init__(self) -> None:
        # without tables, the model's own offsets, derived once (the model is not expected to change)
        self._derived = self.model.prior.medians() if self.tables is None and self.model.cfg.offsets else None

    @property
    def offsets(self) -> np.ndarray | None:
        """Each latent channel's quantization offset (float64), or None for the integer grid."""
        return self.tables.offsets if self.tables is not None else self._derived

    def _shift(self, ndim: int) -> torch.Tensor | None:
        """The offsets as float32 (exact: multiples of 2**-16 below 256), shaped to broadcast over
        latents of ``ndim`` dimensions (channels are dimension 1); None without offsets."""
        off = self.offsets
        if off is None:
            return None
        return torch.from_numpy(np.asarray(off, np.float64).astype(np.float32)).reshape(1, -1, *([1] * (ndim - 2)))

    def latents(self, symbols: np.ndarray) -> torch.Tensor:
        """The decoded latents ``ŷ`` of integer ``symbols``: the symbols, plus each channel's offset."""
        y = torch.from_numpy(symbols.astype(np.float32))
        shift = self._shift(y.dim())
        return y if shift is None else y + shift

    # ---- latents ---------------------------------------------------------------------------
    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> np.ndarray:
        y = self.model.g_a(x)
        shift = self._shift(y.dim())
        if shift is not None:
            y = y - shift
        return torch.round(y).clamp(RAW_MIN, RAW_MIN + RAW - 1).to(torch.int64).numpy()

    @torch.no_grad()
    def reconstruct(self, symbols: np.ndarray) -> torch.Tensor:
        return self.model.g_s(self.latents(symbols))

    @torch.no_grad()
    def estimate_bits(self, symbols: np.ndarray) -> float:
        """−log2 p(ŷ) under the continuous model: what an ideal coder would spend."""
        lik = self.model.prior.likelihood(self.latents(symbols))
        return float(-torch.log2(lik.double()).sum())

    # ---- batches (evaluation) --------------------------------------------------------------
    def code_batch(self, x: torch.Tensor) -> tuple[bytes, torch.Tensor, float]:
        """Encode ``x`` (a batch) to one stream, decode it back; (bytes, reconstruction, estimated bits)."""
        sym = self.quantize(x)
        data = self.tables.encode(sym)
        back = self.tables.decode(data, sym.shape)
        if not np.array_equal(back, sym):  # cannot happen unless the coder is broken: say so loudly
            raise RuntimeError("range coder round trip is not exact")
        return data, self.reconstruct(back), self.estimate_bits(sym)

    # ---- files ---------------------------------------------------------------------------------
    def _prepare(self, data: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(data, np.float32))
        if self.model.cfg.kind == "vector":
            if x.shape[-1] != self.model.cfg.dim:
                raise PayloadError("shape", f"this codec compresses {self.model.cfg.dim}-vectors, "
                                            f"the array has shape {tuple(data.shape)}")
            return x.reshape(-1, self.model.cfg.dim)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.model.cfg.dim:
            raise PayloadError("shape", f"this codec compresses {self.model.cfg.dim}-channel images "
                                        f"((C, H, W) or (N, C, H, W)), got shape {tuple(data.shape)}")
        m = self.model.multiple
        ph, pw = (-x.shape[2]) % m, (-x.shape[3]) % m
        return torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The latent shape data of ``shape`` has under this model (None: it does not fit)."""
        cfg = self.model.cfg
        if cfg.kind == "vector":
            return (math.prod(shape[:-1]), cfg.latent) if shape and shape[-1] == cfg.dim else None
        if len(shape) not in (3, 4) or shape[-3] != cfg.dim:
            return None
        m = self.model.multiple
        return (shape[0] if len(shape) == 4 else 1, cfg.latent, -(-shape[-2] // m), -(-shape[-1] // m))

    def decode_bytes(self, lat_shape: tuple[int, ...]) -> int:
        """Estimated peak memory (bytes) of the synthesis transform on ONE sample (an image) or ONE
        row (a vector) of latents ``lat_shape``: per layer, its input plus ten times its output
        (transposed-convolution columns, GDN's temporaries), float32. Measured peaks are about half."""
        cfg = self.model.cfg
        if cfg.kind == "vector":
            layers = [(cfg.latent, cfg.hidden), (cfg.hidden, cfg.hidden), (cfg.hidden, cfg.dim)]
            return 4 * max(i + 10 * o for i, o in layers)
        pixels = lat_shape[-2] * lat_shape[-1]
        peak, channels = 0, cfg.latent
        for i in range(cfg.downs):
            out = cfg.dim if i == cfg.downs - 1 else cfg.hidden
            peak = max(peak, channels * pixels + 10 * out * pixels * 4)
            channels, pixels = out, pixels * 4
        return 4 * peak

    def min_stream_bits(self, lat_shape: tuple[int, ...]) -> float:
        """A lower bound on the bits any stream of latents ``lat_shape`` costs under these tables:
        each value of channel ``c`` costs at least ``-log2`` of the channel's largest probability
        (so a few bytes cannot make the decoder produce millions of values)."""
        if self.tables is None or len(lat_shape) < 2 or lat_shape[1] != len(self.tables.counts):
            return 0.0
        per_channel = math.prod(lat_shape) // lat_shape[1]
        bits = 0.0
        for counts in self.tables.counts:
            # constriction re-quantizes to 24 bits, leaving every other symbol at least 2**-24
            p_max = min(float(counts.max()) / (1 << PRECISION) * 1.001, 1.0 - (len(counts) - 1) * 2.0 ** -24)
            bits += per_channel * -math.log2(p_max)
        return bits

    def check_sizes(self, shape: tuple[int, ...], lat_shape: tuple[int, ...], kind: str) -> None:
        """Refuse (:class:`CodecFileError`) data of ``shape`` beyond the module's limits."""
        if not shape or min(shape) < 1 or min(lat_shape) < 1:
            raise CodecFileError("shape", f"shape {tuple(shape)}: every dimension must be >= 1")
        n, n_lat = math.prod(shape), math.prod(lat_shape)
        if n > MAX_ELEMENTS:
            raise CodecFileError("size", f"shape {tuple(shape)} has {n:,} values, more than the {MAX_ELEMENTS:,} "
                                         "one .fcn file may hold; split the data")
        if n_lat > MAX_LATENT:
            raise CodecFileError("size", f"latent shape {tuple(lat_shape)} has {n_lat:,} values, more than the "
                                         f"{MAX_LATENT:,} one .fcn file may hold; split the data")
        need = self.decode_bytes(lat_shape)
        if need > MAX_DECODE_BYTES:
            raise CodecFileError("size", f"decoding one sample of shape {tuple(shape[-3:])} would need about "
                                         f"{need / 2**20:,.0f} MiB of activations, more than the "
                                         f"{MAX_DECODE_BYTES / 2**20:,.0f} MiB allowed; downscale or tile the image")
        if kind == "image" and (len(shape) != 3 or shape[0] not in IMAGE_CHANNELS):
            raise CodecFileError("shape", f"an image is (C, H, W) with C in {IMAGE_CHANNELS}, got {tuple(shape)}")

    def compress(self, data: np.ndarray, kind: str = "array") -> bytes:
        """A whole array (an image as (C, H, W) in [0, 1], or vectors (..., dim)) → file bytes.
        Data beyond the decoder's limits (see the module docstring) raises :class:`CodecFileError`."""
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not 1 <= data.ndim <= 8:
            raise CodecFileError("shape", f"a .fcn file holds arrays of 1..8 dimensions, got {data.ndim}")
        lat = self.latent_shape(tuple(data.shape))
        if lat is not None:
            self.check_sizes(tuple(data.shape), lat, kind)
        x = self._prepare(data)
        sym = self.quantize(x)
        stream = self.tables.encode(sym)
        head = MAGIC + bytes([VERSION, KINDS[kind]]) + self.model.transform_fingerprint() + self.tables.fingerprint
        head += bytes([data.ndim]) + struct.pack(f"<{data.ndim}I", *data.shape)
        head += bytes([sym.ndim]) + struct.pack(f"<{sym.ndim}I", *sym.shape)
        body = head + struct.pack("<I", len(stream)) + stream
        return body + hashlib.blake2b(body, digest_size=8).digest()

    def decompress(self, blob: bytes) -> tuple[np.ndarray, str]:
        """File bytes → (array of the original shape, kind). Raises :class:`CodecFileError`."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise CodecFileError("type", f"expected the file's bytes, got a {type(blob).__name__}")
        blob = bytes(blob)
        if len(blob) < 4 + 2 + 16 + 1 + 1 + 4 + 8 or blob[:4] != MAGIC:
            raise CodecFileError("magic", "not a fedcodec neural-compression file")
        if len(blob) > MAX_FILE_BYTES:
            raise CodecFileError("size", f"{len(blob):,} bytes: larger than any .fcn file ({MAX_FILE_BYTES:,} at most)")
        body, check = blob[:-8], blob[-8:]
        if hashlib.blake2b(body, digest_size=8).digest() != check:
            raise CodecFileError("checksum", "the file is corrupted (checksum mismatch)")
        if body[4] != VERSION:
            raise CodecFileError("version", f"format version {body[4]}, this fedcodec reads {VERSION}")
        kind = {v: k for k, v in KINDS.items()}.get(body[5])
        if kind is None:
            raise CodecFileError("kind", f"unknown content kind {body[5]}")
        if body[6:14] != self.model.transform_fingerprint():
            raise CodecFileError("model-mismatch", "the file was made with another model's transforms; "
                                                   "decode it with the model (run) that compressed it")
        if body[14:22] != self.tables.fingerprint:
            raise CodecFileError("entropy-mismatch", "the file was made with another entropy model (another "
                                                     "client's codec?); decode it with the same --client")
        pos = 22
        shapes = []
        for _ in range(2):
            if pos >= len(body):
                raise CodecFileError("truncated", "header ends early")
            n = body[pos]
            if not 1 <= n <= 8 or pos + 1 + 4 * n > len(body):
                raise CodecFileError("header", "malformed shape in header (1..8 dimensions of 4 bytes each)")
            shapes.append(tuple(struct.unpack_from(f"<{n}I", body, pos + 1)))
            pos += 1 + 4 * n
        shape, lat_shape = shapes
        if pos + 4 > len(body):
            raise CodecFileError("truncated", "header ends early")
        (length,) = struct.unpack_from("<I", body, pos)
        stream = body[pos + 4:]
        if length != len(stream):
            raise CodecFileError("size", f"header declares a {length}-byte stream, the file holds {len(stream)}")
        if lat_shape != self.latent_shape(shape):
            raise CodecFileError("shape", f"latent shape {lat_shape} does not fit data shape {shape}")
        self.check_sizes(shape, lat_shape, kind)
        if len(stream) > STREAM_BYTES_PER_LATENT * math.prod(lat_shape) + STREAM_SLACK:
            raise CodecFileError("size", f"a {len(stream):,}-byte stream is longer than {math.prod(lat_shape):,} "
                                         "latent values can need")
        need = self.min_stream_bits(lat_shape)
        if 8 * len(stream) < need / 2 - 64:  # half the bound, and a coder state's worth of slack
            raise CodecFileError("size", f"a {len(stream):,}-byte stream is too short for {math.prod(lat_shape):,} "
                                         f"latent values under this entropy model (at least {need / 8:,.0f} bytes)")
        try:
            sym = self.tables.decode(stream, lat_shape)
        except PayloadError as err:
            raise CodecFileError(err.reason, err.detail) from None
        if self.model.cfg.kind == "image":
            n = sym.shape[0]
            per = max(1, MAX_DECODE_BYTES // self.decode_bytes(lat_shape))
            if per >= n:
                x = self.reconstruct(sym)[..., :shape[-2], :shape[-1]]
            else:  # a large batch: chunks of at most MAX_DECODE_BYTES of activations
                x = torch.empty((n, shape[-3], shape[-2], shape[-1]))
                for i in range(0, n, per):
                    x[i:i + per] = self.reconstruct(sym[i:i + per])[..., :shape[-2], :shape[-1]]
        else:
            rows = len(sym)
            per = max(1, MAX_DECODE_BYTES // self.decode_bytes(lat_shape))
            if per >= rows:
                x = self.reconstruct(sym)
            else:
                x = torch.empty((rows, self.model.cfg.dim))
                for i in range(0, rows, per):
                    x[i:i + per] = self.reconstruct(sym[i:i + per])
        return x.reshape(shape).numpy(), kind
