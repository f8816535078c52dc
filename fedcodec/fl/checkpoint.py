"""Crash-safe checkpoints: the whole run state in one safetensors file, replaced atomically.

Tensors are the file's tensors: the global model under its own names, each client's private store
under ``client/<id>/<key>``, the server's per-client store under ``server/<id>/<key>`` and the server
optimizer's state under ``opt/<key>`` (model tensor names never contain ``/``); everything else (round, records, ledger, config) is JSON in the
file's metadata. One file means one ``os.replace``: a process killed at any instant
leaves either the previous checkpoint or the new one, never a mix. RNG state needs no saving: every
random choice is a function of (seed, round, client).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save as serialize

from ..errors import ConfigError
from .ledger import Entry, Ledger

FORMAT = "fedcodec-checkpoint-1"
OPTIMIZER = "opt/"  # key prefix of the server optimizer's state
# keys that may differ between the run that saved a checkpoint and the one that resumes it
RESUMABLE_DIFFERENCES = ("rounds", "out_dir", "threads")


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


def load(path: Path, config: dict[str, Any]):
    """Read a checkpoint, refusing one made with a different configuration."""
    from .simulation import RunState

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a fedcodec checkpoint (format {meta.get('format')!r})")
        check_config(json.loads(meta["config"]), config, path)
        params, stores, optimizer = {}, {"client": {}, "server": {}}, {}
        for k in f.keys():
            if k.startswith(OPTIMIZER):
                optimizer[k[len(OPTIMIZER):]] = f.get_tensor(k)
            elif k.startswith(("client/", "server/")):
                prefix, owner, key = k.split("/", 2)
                stores[prefix].setdefault(int(owner), {})[key] = f.get_tensor(k)
            else:
                params[k] = f.get_tensor(k)
    ledger = Ledger([Entry(*row) for row in json.loads(meta["ledger"])])
    return RunState(int(meta["round"]), params, ledger, json.loads(meta["records"]), stores["client"],
                    stores["server"], optimizer)
