"""A pickle reader for data files: plain values and numpy arrays, nothing else, with bounded work.

:func:`loads` interprets the pickle opcodes itself instead of handing the bytes to :mod:`pickle`,
so nothing in a file is ever called: it builds ``None``, booleans, ints, floats, ``str``, ``bytes``,
``bytearray``, tuples, lists and dicts, and numpy arrays and dtypes from the exact patterns numpy
writes (``_reconstruct`` + ``BUILD`` with the raw bytes, and protocol 5's ``_frombuffer``), checking
an array's declared shape and dtype against the bytes it comes with before creating it. Any other
global (``os.system``, ``builtins.eval``, ...) is refused by name.

The work is bounded: at most ``max_ops`` opcodes (each does O(1) work beyond copying bytes that
are in the file), integers of at most 64 bytes, a small allow-list of array dtypes, and nothing
that copies or expands a value: a reference to a memoized object (``BINGET``) is a reference, so
a tiny file that refers to one big list a million times (the pickle "billion laughs") costs a
million references, never a million lists, and the caller's type checks reject it. Dict keys must
be scalars (no hashing of nested tuples). Python 2 byte strings (``STRING`` opcodes) become
``bytes``, as ``pickle.load(..., encoding="bytes")`` does; like :func:`pickle.load`, reading
stops at the STOP opcode. Every failure is
:class:`PickleRejected` with a message saying what was wrong.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

#: opcodes a file may hold (a CIFAR batch needs about 40,000)
MAX_OPS = 1 << 20
#: bytes of one pickled integer (LONG1/LONG4)
MAX_LONG_BYTES = 64
#: array element types a file may declare
DTYPES = ("b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8")


class PickleRejected(Exception):
    """The bytes are not a pickle of plain data this reader accepts (the message says why)."""


class _Global:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_RECONSTRUCT, _NDARRAY, _DTYPE = _Global("numpy _reconstruct"), _Global("numpy.ndarray"), _Global("numpy.dtype")
_ENCODE, _BYTES, _FROMBUFFER = _Global("_codecs.encode"), _Global("builtins.bytes"), _Global("numpy _frombuffer")
GLOBALS: dict[tuple[str, str], _Global] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): _ENCODE,
    ("builtins", "bytes"): _BYTES,
    ("__builtin__", "bytes"): _BYTES,
}


class _Pending:
    """An array or dtype made by REDUCE and waiting for its BUILD state."""

    def __init__(self, what: _Global, value: Any = None):
        self.what = what
        self.value = value
        self.memo_keys: list[int] = []


def _shown(name: str) -> str:
    """A name from the file, for a message: as it is if printable, else escaped (and short)."""
    name = name[:80]
    return name if name.isprintable() else ascii(name)


def _text(v: Any, what: str) -> str:
    if isinstance(v, bytes):
        return v.decode("latin-1")
    if isinstance(v, str):
        return v
    raise PickleRejected(f"{what} is a {type(v).__name__}, not text")


def _dtype(typestr: Any, order: Any = "|") -> np.dtype:
    text, order = _text(typestr, "a dtype name"), _text(order, "a dtype byte order")
    if len(text) > 8 or text.lstrip("<>|=") not in DTYPES or order not in ("<", ">", "|", "="):
        raise PickleRejected(f"array dtype {text[:8]!r} (order {order[:2]!r}) is not one of {', '.join(DTYPES)}")
    dtype = np.dtype(text)
    return dtype.newbyteorder(order) if order in "<>" and dtype.itemsize > 1 else dtype


def _shape(v: Any) -> tuple[int, ...]:
    if not (isinstance(v, tuple) and len(v) <= 8 and all(type(d) is int and 0 <= d < 2**62 for d in v)):
        raise PickleRejected("array shape is not a tuple of at most 8 non-negative integers")
    return v


def _array(raw: Any, dtype: Any, shape: Any, fortran: bool, max_elements: int) -> np.ndarray:
    if isinstance(dtype, _Pending) and dtype.what is _DTYPE:
        dtype = dtype.value
    if not isinstance(dtype, np.dtype):
        raise PickleRejected("array dtype is not a dtype")
    shape = _shape(shape)
    if not isinstance(raw, (bytes, bytearray)):
        raise PickleRejected(f"array data is a {type(raw).__name__}, not bytes (object arrays are not accepted)")
    n = math.prod(shape)
    if n > max_elements:
        raise PickleRejected(f"array of shape {shape} has {n:,} elements, more than {max_elements:,}")
    if n * dtype.itemsize != len(raw):
        raise PickleRejected(f"array of shape {shape} and dtype {dtype} needs {n * dtype.itemsize:,} bytes, "
                             f"the file gives {len(raw):,}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def loads(data: bytes, *, max_ops: int = MAX_OPS, max_elements: int | None = None) -> Any:
    """The value pickled in ``data`` (see the module docstring). ``max_elements`` bounds each array
    (default: what ``data`` could hold). Raises :class:`PickleRejected`."""
    view = memoryview(data)
    size = len(view)
    max_elements = size if max_elements is None else max_elements
    pos = 0
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def take(n: int) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise PickleRejected("the pickle ends early (truncated file?)")
        chunk = view[pos:pos + n]
        pos += n
        return chunk

    def uint(n: int) -> int:
        return int.from_bytes(take(n), "little")

    def pop_mark() -> list[Any]:
        if not marks:
            raise PickleRejected("an opcode needs a MARK that is not there")
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def pop() -> Any:
        if len(stack) <= (marks[-1] if marks else 0):
            raise PickleRejected("an opcode needs a value the stack does not hold")
        return stack.pop()

    def top() -> Any:
        if len(stack) <= (marks[-1] if marks else 0):
            raise PickleRejected("an opcode needs a value the stack does not hold")
        return stack[-1]

    def put(key: int) -> None:
        v = top()
        if len(memo) >= max_ops and key not in memo:
            raise PickleRejected("too many memo entries")
        memo[key] = v
        if isinstance(v, _Pending):
            v.memo_keys.append(key)

    def get(key: int) -> None:
        if key not in memo:
            raise PickleRejected(f"memo entry {key} is used before it is defined")
        stack.append(memo[key])

    def key_ok(k: Any) -> Any:
        if k is None or isinstance(k, (bool, int, float, str, bytes)):
            return k
        raise PickleRejected(f"a dict key is a {type(k).__name__}; only scalars are accepted")

    def setitems(target: Any, items: list[Any]) -> None:
        if not isinstance(target, dict):
            raise PickleRejected(f"SETITEM(S) on a {type(target).__name__}")
        if len(items) % 2:
            raise PickleRejected("SETITEMS with an odd number of values")
        for i in range(0, len(items), 2):
            target[key_ok(items[i])] = items[i + 1]

    def append(target: Any, items: list[Any]) -> None:
        if not isinstance(target, list):
            raise PickleRejected(f"APPEND(S) on a {type(target).__name__}")
        target.extend(items)

    def reduce(func: Any, args: Any) -> Any:
        if not isinstance(func, _Global):
            raise PickleRejected(f"REDUCE calls a {type(func).__name__}; only allow-listed globals are called")
        if not isinstance(args, tuple):
            raise PickleRejected("REDUCE arguments are not a tuple")
        if func is _RECONSTRUCT:
            if len(args) != 3 or args[0] is not _NDARRAY:
                raise PickleRejected("numpy _reconstruct is only accepted as _reconstruct(ndarray, shape, b'b')")
            return _Pending(_RECONSTRUCT)
        if func is _DTYPE:
            if not 1 <= len(args) <= 3:
                raise PickleRejected("numpy.dtype takes (name, align, copy)")
            return _Pending(_DTYPE, _dtype(args[0]))
        if func is _FROMBUFFER:
            if len(args) != 4:
                raise PickleRejected("numpy _frombuffer takes (buffer, dtype, shape, order)")
            buf, dtype, shape, order = args
            return _array(buf, dtype, shape, _text(order, "array order") == "F", max_elements)
        if func is _ENCODE:
            if (len(args) != 2 or not isinstance(args[0], str)
                    or _text(args[1], "encoding") not in ("latin1", "latin-1")):
                raise PickleRejected("_codecs.encode is only accepted as encode(str, 'latin1')")
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError:
                raise PickleRejected("_codecs.encode of text that is not latin-1") from None
        if func is _BYTES:
            if args:
                raise PickleRejected("bytes(...) is only accepted without arguments")
            return b""
        raise PickleRejected(f"{func.name} cannot be called")

    def build(obj: Any, state: Any) -> Any:
        if not isinstance(obj, _Pending) or obj.value is not None and obj.what is not _DTYPE:
            raise PickleRejected(f"BUILD on a {type(obj).__name__}; only numpy arrays and dtypes take a state")
        if obj.what is _DTYPE:
            if not (isinstance(state, tuple) and len(state) >= 2):
                raise PickleRejected("numpy dtype state is not a tuple")
            done = _dtype(obj.value.str.lstrip("<>|="), state[1])
        else:
            if isinstance(state, tuple) and len(state) == 5:
                state = state[1:]
            if not (isinstance(state, tuple) and len(state) == 4):
                raise PickleRejected("numpy array state is not (version, shape, dtype, fortran, data)")
            shape, dtype, fortran, raw = state
            if not isinstance(fortran, (bool, int)):
                raise PickleRejected("numpy array state: the Fortran-order flag is not a boolean")
            done = _array(raw, dtype, shape, bool(fortran), max_elements)
        for k in obj.memo_keys:
            memo[k] = done
        return done

    def string(n: int, kind: str) -> Any:
        raw = bytes(take(n))
        if kind == "bytes":
            return raw
        if kind == "bytearray":
            return bytearray(raw)
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise PickleRejected("a text value is not UTF-8") from None

    for _ in range(max_ops):
        op = uint(1)
        if op == 0x80:  # PROTO
            if uint(1) > 5:
                raise PickleRejected("unknown pickle protocol")
        elif op == 0x95:  # FRAME: a length hint only
            take(8)
        elif op == 0x2E:  # STOP
            if len(stack) != 1 or marks:
                raise PickleRejected("the pickle does not end with exactly one value")
            result = stack.pop()
            if isinstance(result, (_Pending, _Global)):
                raise PickleRejected("the pickle's value is an unfinished object")
            return result
        elif op == 0x28:  # MARK
            marks.append(len(stack))
        elif op == 0x30:  # POP
            if marks and len(stack) == marks[-1]:
                marks.pop()
            else:
                pop()
        elif op == 0x31:  # POP_MARK
            pop_mark()
        elif op == 0x32:  # DUP
            stack.append(top())
        elif op == 0x4E:  # NONE
            stack.append(None)
        elif op in (0x88, 0x89):  # NEWTRUE, NEWFALSE
            stack.append(op == 0x88)
        elif op == 0x4A:  # BININT
            stack.append(int.from_bytes(take(4), "little", signed=True))
        elif op == 0x4B:  # BININT1
            stack.append(uint(1))
        elif op == 0x4D:  # BININT2
            stack.append(uint(2))
        elif op in (0x8A, 0x8B):  # LONG1, LONG4
            n = uint(1 if op == 0x8A else 4)
            if n > MAX_LONG_BYTES:
                raise PickleRejected(f"an integer of {n:,} bytes (at most {MAX_LONG_BYTES})")
            stack.append(int.from_bytes(take(n), "little", signed=True))
        elif op == 0x47:  # BINFLOAT
            stack.append(struct.unpack(">d", take(8))[0])
        elif op == 0x55:  # SHORT_BINSTRING (Python 2 str: bytes)
            stack.append(string(uint(1), "bytes"))
        elif op == 0x54:  # BINSTRING
            stack.append(string(int.from_bytes(take(4), "little", signed=True), "bytes"))
        elif op == 0x43:  # SHORT_BINBYTES
            stack.append(string(uint(1), "bytes"))
        elif op == 0x42:  # BINBYTES
            stack.append(string(uint(4), "bytes"))
        elif op == 0x8E:  # BINBYTES8
            stack.append(string(uint(8), "bytes"))
        elif op == 0x96:  # BYTEARRAY8
            stack.append(string(uint(8), "bytearray"))
        elif op == 0x8C:  # SHORT_BINUNICODE
            stack.append(string(uint(1), "str"))
        elif op == 0x58:  # BINUNICODE
            stack.append(string(uint(4), "str"))
        elif op == 0x8D:  # BINUNICODE8
            stack.append(string(uint(8), "str"))
        elif op == 0x5D:  # EMPTY_LIST
            stack.append([])
        elif op == 0x61:  # APPEND
            v = pop()
            append(top(), [v])
        elif op == 0x65:  # APPENDS
            items = pop_mark()
            append(top(), items)
        elif op == 0x6C:  # LIST
            stack.append(pop_mark())
        elif op == 0x29:  # EMPTY_TUPLE
            stack.append(())
        elif op == 0x74:  # TUPLE
            stack.append(tuple(pop_mark()))
        elif op in (0x85, 0x86, 0x87):  # TUPLE1..3
            n = op - 0x84
            items = [pop() for _ in range(n)][::-1]
            stack.append(tuple(items))
        elif op == 0x7D:  # EMPTY_DICT
            stack.append({})
        elif op == 0x64:  # DICT
            items = pop_mark()
            d: dict = {}
            setitems(d, items)
            stack.append(d)
        elif op == 0x73:  # SETITEM
            v = pop()
            k = pop()
            setitems(top(), [k, v])
        elif op == 0x75:  # SETITEMS
            items = pop_mark()
            setitems(top(), items)
        elif op == 0x71:  # BINPUT
            put(uint(1))
        elif op == 0x72:  # LONG_BINPUT
            put(uint(4))
        elif op == 0x94:  # MEMOIZE
            put(len(memo))
        elif op == 0x68:  # BINGET
            get(uint(1))
        elif op == 0x6A:  # LONG_BINGET
            get(uint(4))
        elif op in (0x63, 0x93):  # GLOBAL, STACK_GLOBAL
            if op == 0x63:
                names = []
                for _ in range(2):
                    end = bytes(view[pos:pos + 256]).find(b"\n")
                    if end < 0:
                        raise PickleRejected("malformed GLOBAL opcode")
                    names.append(bytes(take(end + 1))[:-1].decode("latin-1"))
                module, name = names
            else:
                name, module = pop(), pop()
                if not (isinstance(module, str) and isinstance(name, str)):
                    raise PickleRejected("STACK_GLOBAL names are not text")
            found = GLOBALS.get((module, name))
            if found is None:
                raise PickleRejected(f"refusing to load global {_shown(module)}.{_shown(name)}: not allowed in a "
                                     "data file")
            stack.append(found)
        elif op == 0x52:  # REDUCE
            args = pop()
            stack.append(reduce(pop(), args))
        elif op == 0x62:  # BUILD
            state = pop()
            obj = pop()
            stack.append(build(obj, state))
        else:
            raise PickleRejected(f"opcode {bytes([op])!r} at byte {pos - 1:,} is not accepted in a data file")
    raise PickleRejected(f"more than {max_ops:,} opcodes")
