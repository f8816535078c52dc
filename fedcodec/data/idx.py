"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the number of dimensions), one
big-endian ``uint32`` per dimension, then the elements in C order, big-endian. Files may be
gzip-compressed; :func:`read_idx` recognises compression by its magic bytes, not by the file
name (browsers sometimes decompress ``.gz`` downloads and keep the name).

The reader never trusts the header: it reads at most the declared number of bytes plus one and
compares, so a corrupted header declaring a huge size raises :class:`DatasetError` instead of
trying to allocate it.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedcodec.errors import ConfigError, DatasetError

#: IDX dtype code -> numpy dtype (IDX data is big-endian).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIMS = 4
_CHUNK = 1 << 20


def _open(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, transparently decompressing gzip."""
    with path.open("rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else path.open("rb")


def _read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    """Read exactly ``size`` bytes of a (small) header field or raise DatasetError."""
    data = stream.read(size)
    if len(data) != size:
        raise DatasetError(f"{what}: file ends inside the IDX header")
    return data


def _read_at_most(stream: BinaryIO, limit: int) -> bytearray:
    """Read up to ``limit`` bytes in chunks, so memory use is bounded by the real data size."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = stream.read(min(_CHUNK, limit - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a numpy array.

    Raises :class:`DatasetError` when the file is missing, is not valid gzip, has a bad magic,
    an unknown dtype code, an invalid number of dimensions, or when its payload size differs
    from the size the header declares (truncated file or trailing garbage).
    """
    path = Path(path)
    try:
        with _open(path) as stream:
            zero, code, ndim = struct.unpack(">HBB", _read_exact(stream, 4, str(path)))
            if zero != 0:
                raise DatasetError(f"{path}: not an IDX file (bad magic {zero:#06x})")
            if code not in IDX_DTYPES:
                raise DatasetError(f"{path}: unsupported IDX dtype code {code:#04x}")
            if not 1 <= ndim <= _MAX_DIMS:
                raise DatasetError(f"{path}: IDX header declares {ndim} dimensions (1..4 allowed)")
            shape = struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, str(path)))
            dtype = IDX_DTYPES[code]
            expected = dtype.itemsize
            for dim in shape:
                expected *= dim
            payload = _read_at_most(stream, expected + 1)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read file ({exc})") from exc
    if len(payload) < expected:
        raise DatasetError(
            f"{path}: truncated: header declares shape {shape} ({expected} bytes) "
            f"but only {len(payload)} bytes follow"
        )
    if len(payload) > expected:
        raise DatasetError(
            f"{path}: header declares shape {shape} ({expected} bytes) but more data follows"
        )
    array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends with ``.gz``.

    Supports the dtypes in :data:`IDX_DTYPES` and 1 to 4 dimensions; anything else raises
    :class:`ConfigError`. Mostly used to build test fixtures.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        supported = ", ".join(sorted(str(d) for d in codes))
        raise ConfigError(f"write_idx: unsupported dtype {array.dtype}; use one of {supported}")
    if not 1 <= array.ndim <= _MAX_DIMS:
        raise ConfigError(f"write_idx: array has {array.ndim} dimensions, IDX allows 1..4")
    code = codes[native]
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    body = np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as out:
        out.write(header)
        out.write(body)
