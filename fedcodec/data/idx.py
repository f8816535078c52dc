"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the number of dimensions), one
big-endian ``uint32`` per dimension, then the elements in C order, big-endian. Files may be
gzip-compressed; :func:`read_idx` recognises compression by its magic bytes, not by the file
name (browsers sometimes decompress ``.gz`` downloads and keep the name).

The reader never trusts the header. A caller that knows what it expects (a dtype, fixed dimensions,
at most so many items: :func:`read_idx`'s ``dtype``, ``shape`` and ``max_items``) has the declared
header checked against that before anything else is read. The payload is then decompressed
incrementally, in 1 MiB chunks, and at most ``min(declared size, max_bytes) + 1`` bytes are ever
produced (``max_bytes`` defaults to :data:`MAX_IDX_BYTES`): a corrupted header declaring a huge size,
or a small gzip "bomb" that expands to gigabytes, raises :class:`DatasetError` after bounded work and
memory; a declared size beyond ``max_bytes`` is counted (not kept) to tell a truncated file from an
oversized one.
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
#: the largest IDX payload read by default (Fashion-MNIST's largest file holds 47 MB)
MAX_IDX_BYTES = 256 << 20


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


def _count_at_most(stream: BinaryIO, limit: int) -> int:
    """How many bytes (up to ``limit``) the stream still holds, keeping none of them."""
    n = 0
    while n < limit:
        chunk = stream.read(min(_CHUNK, limit - n))
        if not chunk:
            break
        n += len(chunk)
    return n


def _describe(dtype: np.dtype | None, shape: tuple[int | None, ...] | None) -> str:
    """``uint8 data of shape (N, 28, 28)``: what a caller expects, for a message."""
    text = f"{dtype.name} data" if dtype is not None else "data"
    if shape is not None:
        dims = ["N" if d is None else str(d) for d in shape]
        text += f" of shape ({', '.join(dims)}{',' if len(dims) == 1 else ''})"
    return text


def read_idx(path: str | Path, *, dtype: np.dtype | str | None = None, shape: tuple[int | None, ...] | None = None,
             max_items: int | None = None, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a numpy array.

    ``dtype`` (numpy, native order), ``shape`` (dimensions, ``None`` for any) and ``max_items`` (a
    bound on the first dimension) are what the caller expects; the header is checked against them
    before any payload is read. At most ``max_bytes`` of payload are read (see the module docstring).

    Raises :class:`DatasetError` when the file is missing, is not valid gzip, has a bad magic,
    an unknown dtype code, an invalid number of dimensions, a header that differs from what the
    caller expects, a payload over ``max_bytes``, or when its payload size differs from the size
    the header declares (truncated file or trailing garbage).
    """
    path = Path(path)
    want = np.dtype(dtype) if dtype is not None else None
    try:
        with _open(path) as stream:
            zero, code, ndim = struct.unpack(">HBB", _read_exact(stream, 4, str(path)))
            if zero != 0:
                raise DatasetError(f"{path}: not an IDX file (bad magic {zero:#06x})")
            if code not in IDX_DTYPES:
                raise DatasetError(f"{path}: unsupported IDX dtype code {code:#04x}")
            if not 1 <= ndim <= _MAX_DIMS:
                raise DatasetError(f"{path}: IDX header declares {ndim} dimensions (1..4 allowed)")
            dims = struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, str(path)))
            file_dtype = IDX_DTYPES[code]
            if (want is not None and file_dtype.newbyteorder("=") != want.newbyteorder("=")) or (
                    shape is not None and (len(dims) != len(shape)
                                           or any(w is not None and d != w for d, w in zip(dims, shape)))):
                raise DatasetError(f"{path}: expected {_describe(want, shape)}, the IDX header declares "
                                   f"{file_dtype.newbyteorder('=').name} of shape {dims}")
            if max_items is not None and dims[0] > max_items:
                raise DatasetError(f"{path}: the IDX header declares {dims[0]:,} items, at most {max_items:,} "
                                   "expected")
            expected = file_dtype.itemsize
            for dim in dims:
                expected *= dim
            if expected > max_bytes:
                held = _count_at_most(stream, max_bytes + 1)
                payload = None
            else:
                payload = _read_at_most(stream, expected + 1)
                held = len(payload)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read file ({exc})") from exc
    if payload is None and held > max_bytes:
        raise DatasetError(f"{path}: header declares shape {dims} ({expected:,} bytes), more than the "
                           f"{max_bytes:,} bytes an IDX file may hold here")
    if payload is None or held < expected:
        raise DatasetError(
            f"{path}: truncated: header declares shape {dims} ({expected} bytes) "
            f"but only {held} bytes follow"
        )
    if held > expected:
        raise DatasetError(
            f"{path}: header declares shape {dims} ({expected} bytes) but more data follows"
        )
    array = np.frombuffer(payload, dtype=file_dtype).reshape(dims)
    return array.astype(file_dtype.newbyteorder("="), copy=False)


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
