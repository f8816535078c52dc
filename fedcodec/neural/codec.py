"""Compress data with a trained NTC model to real bytes, and back.

File format (``.fcn``; all integers little-endian)::

    b"FCNC" | version u8 | kind u8 (0 image, 1 array) | transform fingerprint 8B |
    entropy-model fingerprint 8B | ndim u8 | ndim x u32 data shape | latent ndim u8 |
    latent ndim x u32 latent shape | u32 stream length | range-coded stream | BLAKE2b-8 checksum

The checksum covers everything before it, so a corrupted file is reported, never decoded to
garbage; the two fingerprints name the synthesis transform and the entropy model (its integer
tables), so decoding with another client's codec is refused with a message saying so.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PayloadError
from .entropy import RAW, RAW_MIN, Tables
from .models import NTC

MAGIC = b"FCNC"
VERSION = 1
KINDS = {"image": 0, "array": 1}
MAX_ELEMENTS = 1 << 28  # refuse declared shapes larger than this before allocating anything


class CodecFileError(PayloadError):
    """A compressed file cannot be decoded with this codec (corrupt, foreign or wrong model)."""


@dataclass
class Coder:
    """One client's codec: the model (shared transforms + that client's prior) and its tables."""

    model: NTC
    tables: Tables

    @classmethod
    def of(cls, model: NTC) -> "Coder":
        model.eval()
        return cls(model, model.prior.tables())

    # ---- latents ---------------------------------------------------------------------------
    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> np.ndarray:
        y = self.model.g_a(x)
        return torch.round(y).clamp(RAW_MIN, RAW_MIN + RAW - 1).to(torch.int64).numpy()

    @torch.no_grad()
    def reconstruct(self, symbols: np.ndarray) -> torch.Tensor:
        return self.model.g_s(torch.from_numpy(symbols.astype(np.float32)))

    @torch.no_grad()
    def estimate_bits(self, symbols: np.ndarray) -> float:
        """−log2 p(ŷ) under the continuous model: what an ideal coder would spend."""
        lik = self.model.prior.likelihood(torch.from_numpy(symbols.astype(np.float32)))
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
            return (int(np.prod(shape[:-1], dtype=np.int64)), cfg.latent) if shape and shape[-1] == cfg.dim else None
        if len(shape) not in (3, 4) or shape[-3] != cfg.dim:
            return None
        m = self.model.multiple
        return (shape[0] if len(shape) == 4 else 1, cfg.latent, -(-shape[-2] // m), -(-shape[-1] // m))

    def compress(self, data: np.ndarray, kind: str = "array") -> bytes:
        """A whole array (an image as (C, H, W) in [0, 1], or vectors (..., dim)) → file bytes."""
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
        if len(blob) < 4 + 2 + 16 + 1 + 4 + 8 or blob[:4] != MAGIC:
            raise CodecFileError("magic", "not a fedcodec neural-compression file")
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
            n = body[pos]
            if n > 8 or pos + 1 + 4 * n > len(body):
                raise CodecFileError("header", "malformed shape in header")
            shapes.append(struct.unpack_from(f"<{n}I", body, pos + 1))
            pos += 1 + 4 * n
        shape, lat_shape = shapes
        if pos + 4 > len(body):
            raise CodecFileError("truncated", "header ends early")
        (length,) = struct.unpack_from("<I", body, pos)
        stream = body[pos + 4:]
        if length != len(stream):
            raise CodecFileError("size", f"header declares a {length}-byte stream, the file holds {len(stream)}")
        for s in (shape, lat_shape):
            if np.prod(s, dtype=np.float64) > MAX_ELEMENTS:
                raise CodecFileError("size", f"declared shape {s} is too large")
        if tuple(lat_shape) != self.latent_shape(shape):
            raise CodecFileError("shape", f"latent shape {lat_shape} does not fit data shape {shape}")
        try:
            sym = self.tables.decode(stream, tuple(lat_shape))
        except PayloadError as err:
            raise CodecFileError(err.reason, err.detail) from None
        x = self.reconstruct(sym)
        if self.model.cfg.kind == "image":
            x = x[..., :shape[-2], :shape[-1]]
        return x.reshape(shape).numpy(), kind
