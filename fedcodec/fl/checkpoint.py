"""Crash-safe checkpoints: the whole run state in one safetensors file, replaced atomically.

Tensors are the file's tensors: the global model under its own names, each client's private store
under ``client/<id>/<key>``, the server's per-client store under ``server/<id>/<key>`` and the server
optimizer's state under ``opt/<key>`` (model tensor names never contain ``/``); everything else (round, records, ledger, config) is JSON in the
file's metadata. One file means one ``os.replace``: a process killed at any instant
leaves either the previous checkpoint or the new one, never a mix. RNG state needs no saving: every
random choice is a function of (seed, round, client).

:func:`load` trusts nothing in the file (it may be damaged, or not ours): see its docstring for the
checks, all made before a tensor is read; a failure is a :class:`~fedcodec.errors.CheckpointError`
(a ConfigError).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import save as serialize

from ..errors import CheckpointError, ConfigError
from ..safetensors_header import ABSOLUTE_MAX_HEADER, TORCH_DTYPE, load_tensors, read_header
from .ledger import Entry, Ledger

FORMAT = "fedcodec-checkpoint-1"
OPTIMIZER = "opt/"  # key prefix of the server optimizer's state
# keys that may differ between the run that saved a checkpoint and the one that resumes it
RESUMABLE_DIFFERENCES = ("rounds", "out_dir", "threads")
#: the JSON header of any checkpoint may be this large, plus a share per round and client
HEADER_BASE = 16 << 20
#: one store (a client's, the server's for a client, the server optimizer's) holds at most this many
#: times the model's elements (error feedback, a model copy, optimizer moments, codec state)
STORE_FACTOR = 8
#: ... and any tensor outside the model at most the model's elements, or this many if the model is smaller
TENSOR_FLOOR = 1 << 20
MAX_COUNT = 10**9  # rounds and client ids are below this
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
TORCH_NAME = {v: k for k, v in TORCH_DTYPE.items()}
_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,8})")  # 0 .. MAX_COUNT - 1, as str(int) writes it


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_config(saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse to continue (or reuse) a run saved at ``path`` with a config that differs from ``config``."""
    from ..config import Config

    # a key the saved config lacks was added to fedcodec later: the saved run used its default
    saved = Config().to_dict() | saved
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in RESUMABLE_DIFFERENCES and saved.get(k) != config.get(k))
    if differ:
        raise ConfigError(f"cannot resume from {path}: it was made with a different config "
                          f"({', '.join(f'{k}: {saved.get(k)!r} vs {config.get(k)!r}' for k in differ)}). "
                          "Use the same settings, another --name, or drop --resume to start over.")


def save(path: Path, config: dict[str, Any], state) -> None:
    """Write ``state`` (a :class:`~fedcodec.fl.simulation.RunState`) to ``path`` atomically."""
    meta = {
        "format": FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "round": str(state.round),
        "records": json.dumps(state.records),
        "ledger": json.dumps([[e.round, e.client, e.direction, e.codec, e.nbytes] for e in state.ledger.entries]),
    }
    tensors = {k: v.contiguous() for k, v in state.global_params.items()}
    for prefix, stores in (("client", state.client_states), ("server", state.server_states)):
        for owner, store in stores.items():
            tensors.update({f"{prefix}/{owner}/{k}": v.contiguous() for k, v in store.items()})
    tensors.update({f"{OPTIMIZER}{k}": v.contiguous() for k, v in state.optimizer_state.items()})
    atomic_write_bytes(path, serialize(tensors, metadata=meta))


def header_limit(config: Mapping[str, Any]) -> int:
    """The most JSON header bytes a checkpoint of a run of ``config`` may have: :data:`HEADER_BASE`
    (16 MiB) plus 8 KiB + 512 B per sampled client per round (records, ledger rows) and 64 KiB per
    client (store tensors' entries), at most 96 MiB (the safetensors library's own limit is 100 MB).
    Parsing that much JSON takes bounded time and memory (roughly 25x the bytes in the worst case)."""
    def count(key: str) -> int:
        v = config.get(key)
        return min(v, 10**7) if type(v) is int and v >= 1 else 1

    share = count("rounds") * (8192 + 512 * count("clients_per_round")) + count("num_clients") * (64 << 10)
    return min(ABSOLUTE_MAX_HEADER, HEADER_BASE + share)


def _fail(path: Path):
    def fail(message: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a usable fedcodec checkpoint: {message}. Delete it (or drop "
                               "--resume / resume=true) to start the run afresh.")
    return fail


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _json(meta: Mapping[str, str], key: str, kind: type, fail):
    if not isinstance(meta.get(key), str):
        raise fail(f"its metadata has no {key!r} entry")
    try:
        value = json.loads(meta[key])
    except RecursionError:
        raise fail(f"its {key!r} metadata nests JSON too deeply") from None
    except ValueError as err:
        raise fail(f"its {key!r} metadata is not valid JSON ({str(err)[:100]})") from None
    if not isinstance(value, kind):
        raise fail(f"its {key!r} metadata is a JSON {type(value).__name__}, expected a {kind.__name__}")
    return value


def _ledger_row(row: Any) -> bool:
    if not (isinstance(row, list) and len(row) == 5):
        return False
    rnd, client, direction, codec, nbytes = row
    return (all(type(v) is int and 0 <= v < MAX_COUNT for v in (rnd, client))
            and type(nbytes) is int and 0 <= nbytes < 2**62
            and direction in ("up", "down") and isinstance(codec, str) and 0 < len(codec) <= 200)


def _owner(text: str) -> int | None:
    return int(text) if _DECIMAL.fullmatch(text) else None


def load(path: Path, config: dict[str, Any], expected: Mapping[str, Any] | None = None):
    """Read a checkpoint, refusing one made with a different configuration.

    Nothing in the file is trusted: the JSON header is bounded (:func:`header_limit`) and read
    before any tensor; the metadata must have its types (round a decimal integer >= 0, records a
    list of objects, ledger rows ``[round, client, "up"|"down", codec, bytes]``); tensor keys must be
    model names (no ``/``), ``client/<id>/<key>`` or ``server/<id>/<key>`` with ``0 <= id <
    num_clients``, or ``opt/<key>``; the global tensors must be exactly ``expected`` (names, shapes,
    dtypes; the freshly built run's ``state.global_params``) when it is given, and every other tensor
    is bounded relative to the model's size (:data:`STORE_FACTOR`). Raises :class:`CheckpointError`
    (a :class:`ConfigError`) saying what is wrong.
    """
    from .simulation import RunState

    path = Path(path)
    fail = _fail(path)
    header = read_header(path, fail, max_header=header_limit(config))
    meta = header.metadata
    if meta.get("format") != FORMAT:
        fmt = meta.get("format")
        shown = repr(fmt if fmt is None or len(fmt) <= 60 else fmt[:60] + "...")
        raise CheckpointError(f"{path} is not a fedcodec checkpoint (format {shown})")
    saved = _json(meta, "config", dict, fail)
    if not all(_scalar(v) or isinstance(v, dict) and all(_scalar(w) for w in v.values()) for v in saved.values()):
        raise fail("its saved config holds values that are neither scalars nor tables of scalars")
    check_config(saved, config, path)
    text = meta.get("round")
    if not (isinstance(text, str) and _DECIMAL.fullmatch(text)):
        raise fail("its round is not a decimal integer >= 0")
    records = _json(meta, "records", list, fail)
    if not all(isinstance(r, dict) for r in records):
        raise fail("its records are not all JSON objects")
    rows = _json(meta, "ledger", list, fail)
    if not all(_ledger_row(r) for r in rows):
        raise fail("its ledger has a row that is not [round, client, \"up\" or \"down\", codec, bytes] "
                   "(non-negative integers and a codec name)")

    clients = config.get("num_clients")
    clients = clients if type(clients) is int and clients >= 1 else MAX_COUNT
    globals_, stores, optimizer = {}, {}, 0
    for name, e in header.tensors.items():
        if "/" not in name:
            globals_[name] = e
            continue
        prefix, _, rest = name.partition("/")
        if prefix == OPTIMIZER.rstrip("/") and rest:
            optimizer += e.numel
            continue
        owner, _, key = rest.partition("/")
        who = _owner(owner)
        if prefix not in ("client", "server") or who is None or not key:
            raise fail(f"tensor {name[:80]!r} is neither a model tensor, client/<id>/<key>, server/<id>/<key> "
                       "nor opt/<key>")
        if who >= clients:
            raise fail(f"tensor {name[:80]!r} belongs to client {who}, but the run has {clients} clients "
                       f"(0..{clients - 1})")
        stores[(prefix, who)] = stores.get((prefix, who), 0) + e.numel
    if expected is not None:
        want = {k: (TORCH_NAME.get(str(v.dtype).removeprefix("torch.")), tuple(v.shape)) for k, v in expected.items()}
        have = {k: (e.dtype, e.shape) for k, e in globals_.items()}
        if set(want) != set(have):
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            raise fail(f"its model tensors are not this run's model's (missing: {', '.join(missing[:5]) or '-'}; "
                       f"unexpected: {', '.join(x[:60] for x in extra[:5]) or '-'})")
        for k, (dtype, shape) in want.items():
            if have[k] != (dtype, shape):
                raise fail(f"model tensor {k!r} is {have[k][0]} of shape {have[k][1]}, this run's model has "
                           f"{dtype} of shape {shape}")
        model = sum(math.prod(shape) for _, shape in want.values())
    else:
        if not globals_:
            raise fail("it holds no model tensors")
        bad = [k for k, e in globals_.items() if e.dtype not in FLOAT_DTYPES]
        if bad:
            raise fail(f"model tensor {bad[0][:80]!r} has dtype {globals_[bad[0]].dtype}, not a float type")
        model = sum(e.numel for e in globals_.values())
    unit = max(model, TENSOR_FLOOR)
    for name, e in header.tensors.items():
        if "/" in name and e.numel > unit:
            raise fail(f"tensor {name[:80]!r} has {e.numel:,} elements, more than the model's {model:,} "
                       f"(or {TENSOR_FLOOR:,})")
    for (prefix, who), n in sorted(stores.items()):
        if n > STORE_FACTOR * unit:
            raise fail(f"the {prefix} store of client {who} holds {n:,} elements, more than {STORE_FACTOR} times "
                       f"the model's {unit:,}")
    if optimizer > STORE_FACTOR * unit:
        raise fail(f"the server optimizer's state holds {optimizer:,} elements, more than {STORE_FACTOR} times "
                   f"the model's {unit:,}")

    params, owned, opt = {}, {"client": {}, "server": {}}, {}
    for k, v in load_tensors(path, fail).items():
        if k.startswith(OPTIMIZER):
            opt[k[len(OPTIMIZER):]] = v
        elif k.startswith(("client/", "server/")):
            prefix, owner, key = k.split("/", 2)
            owned[prefix].setdefault(int(owner), {})[key] = v
        else:
            params[k] = v
    ledger = Ledger([Entry(*row) for row in rows])
    return RunState(int(text), params, ledger, records, owned["client"], owned["server"], opt)
