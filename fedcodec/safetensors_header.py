"""Checking a safetensors file's header before the safetensors library (or anyone) trusts it.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (an object
mapping each tensor name to ``{"dtype", "shape", "data_offsets"}``, plus an optional
``"__metadata__"`` object of strings), then the tensors' bytes. :func:`read_header` reads only the
first ``8 + N`` bytes, and only after checking ``N`` against a caller's limit and the file's real
size; it then checks every entry (known dtype from an allow-list, a shape of non-negative integers
whose byte size equals its offsets, offsets that tile the data section exactly, the data section
ending where the file ends) so that loading a tensor afterwards allocates at most what the file
holds. Every failure is the caller's typed error (``fail(message)``), with a message saying what is
wrong.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

#: bytes per element of each safetensors dtype
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: the dtypes fedcodec writes (model tensors, optimizer moments, codec state, fingerprints)
FEDCODEC_DTYPES = frozenset({"BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "I64", "F64"})
#: the safetensors library refuses headers over 100 MB; nothing of fedcodec's comes close
ABSOLUTE_MAX_HEADER = 96 << 20
MAX_NDIM = 8
MAX_NAME = 1024  # characters of a tensor name

#: a torch dtype name per safetensors dtype (what ``get_tensor`` returns)
TORCH_DTYPE = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "F16": "float16", "BF16": "bfloat16",
               "I32": "int32", "F32": "float32", "I64": "int64", "F64": "float64"}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    tensors: dict[str, Entry]
    metadata: dict[str, str]
    header_bytes: int
    file_bytes: int

    @property
    def data_bytes(self) -> int:
        return self.file_bytes - 8 - self.header_bytes


def _short(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def read_header(path: str | Path, fail: Callable[[str], Exception], *, max_header: int,
                dtypes: Collection[str] = FEDCODEC_DTYPES, max_tensors: int = 1 << 20) -> Header:
    """The checked header of the safetensors file at ``path`` (see the module docstring).

    ``max_header`` bounds the JSON header's bytes (at most :data:`ABSOLUTE_MAX_HEADER`), ``dtypes``
    the element types accepted, ``max_tensors`` the number of tensors. Raises ``fail(message)``.
    """
    max_header = min(max_header, ABSOLUTE_MAX_HEADER)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise fail(f"the file is {size} bytes long, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > max_header:
                raise fail(f"its header declares {n:,} bytes of JSON, more than the {max_header:,} allowed")
            if 8 + n > size:
                raise fail(f"its header declares {n:,} bytes of JSON but the file holds {size - 8:,} after the "
                           "length field (truncated?)")
            raw = f.read(n)
    except FileNotFoundError:
        raise fail("the file does not exist") from None
    except IsADirectoryError:
        raise fail("it is a directory, not a file") from None
    except OSError as err:
        raise fail(f"the file cannot be read ({err.strerror or err})") from None
    if len(raw) != n:
        raise fail("the file changed while it was read")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise fail("its header is not UTF-8 text") from None
    except RecursionError:
        raise fail("its header nests JSON too deeply") from None
    except ValueError as err:  # json.JSONDecodeError, and int() of over-long digit strings
        raise fail(f"its header is not valid JSON ({str(err)[:100]})") from None
    if not isinstance(doc, dict):
        raise fail(f"its header is a JSON {type(doc).__name__}, not an object")
    meta = doc.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise fail("its __metadata__ is not an object of strings")
    if len(doc) > max_tensors:
        raise fail(f"it declares {len(doc):,} tensors, more than the {max_tensors:,} allowed")
    entries: dict[str, Entry] = {}
    for name, spec in doc.items():
        entries[name] = _entry(name, spec, dtypes, fail)
    data = size - 8 - n
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != pos:
            raise fail(f"tensor {_short(e.name)} starts at byte {e.start:,} of the data, expected {pos:,} "
                       "(overlapping tensors or a gap)")
        pos = e.end
    if pos != data:
        raise fail(f"its tensors cover {pos:,} bytes of data but the file holds {data:,} "
                   f"({'truncated' if pos > data else 'trailing bytes'})")
    return Header(entries, meta, n, size)


def _entry(name: str, spec: object, dtypes: Collection[str], fail: Callable[[str], Exception]) -> Entry:
    if not name or len(name) > MAX_NAME:
        raise fail(f"tensor name {_short(name)} is empty or longer than {MAX_NAME} characters")
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise fail(f"tensor {_short(name)} is not described by exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtypes or dtype not in ITEMSIZE:
        shown = _short(dtype) if isinstance(dtype, str) else f"a JSON {type(dtype).__name__}"
        raise fail(f"tensor {_short(name)} has dtype {shown}; allowed: {', '.join(sorted(dtypes))}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(type(d) is int and 0 <= d < 2**63 for d in shape)):
        raise fail(f"tensor {_short(name)} has a malformed shape (a list of at most {MAX_NDIM} "
                   "non-negative integers is expected)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and 0 <= o < 2**63 for o in offsets) or offsets[0] > offsets[1]):
        raise fail(f"tensor {_short(name)} has malformed data_offsets")
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if nbytes != offsets[1] - offsets[0]:
        raise fail(f"tensor {_short(name)} of dtype {dtype} and shape {tuple(shape)} needs {nbytes:,} bytes, "
                   f"its offsets span {offsets[1] - offsets[0]:,}")
    return Entry(name, dtype, tuple(shape), offsets[0], offsets[1])


def load_tensors(path: str | Path, fail: Callable[[str], Exception]) -> dict:
    """Every tensor of a file whose header :func:`read_header` accepted, as torch tensors in the
    library's key order. Whatever the safetensors library raises (the file changed since it was
    checked, an I/O error) becomes ``fail``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, RuntimeError: all mean a bad file
        raise fail(f"its tensors cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
