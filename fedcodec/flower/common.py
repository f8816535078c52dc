"""What the ServerApp and the ClientApp share: the run config → Config mapping and message keys.

Flower's run config (``[tool.flwr.app.config]`` in ``flower_app/pyproject.toml``, overridden with
``flwr run --run-config``) uses hyphenated keys; each one is a :class:`fedcodec.config.Config` field
with ``-`` for ``_`` (``num-clients`` → ``num_clients``), except the few keys only the Flower apps
read (:data:`FLOWER_KEYS`) and the codec options (``codec-options = "noise=gaussian pm=false"``, or
``codec.NAME`` keys). An empty string means "unset" (``None``) for optional fields such as ``lr``
or ``data-dir``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import Config, build_config, parse_assignments
from ..errors import ConfigError

#: message types (Flower routes ``train`` to ``@app.train()``, ``query`` to ``@app.query()``)
TRAIN, QUERY = "train", "query"
#: record names inside a message's RecordDict
RECORD, METRICS = "fedcodec", "metrics"
#: the ``simulate`` field of a train message: the config's simulated failures, acted out by the client
SIMULATE_NONE, SIMULATE_DROPOUT, SIMULATE_STRAGGLER = "", "dropout", "straggler"

#: run-config keys read by the Flower apps only, with their defaults
FLOWER_KEYS: dict[str, Any] = {
    "corrupt-partition": -1,  # test hook: this partition's ClientApp flips a byte of its payload
    "round-timeout": 0.0,     # seconds to wait for replies in a round; 0 = until every reply is in
    "straggler-timeout": 0.0,  # once min-clients replies are in, seconds to wait for the rest; 0 = no limit
    "node-wait": 120.0,       # seconds the ServerApp waits for num-clients SuperNodes to connect
    "resume": False,          # continue from out-dir/checkpoint.safetensors (a restarted ServerApp)
}
#: a string of space-separated ``NAME=VALUE`` codec options, e.g. ``"noise=gaussian pm=false"``
#: (``flwr run --run-config`` can only override keys the app's pyproject declares, so the codec
#: options travel as one string key rather than one key per option)
CODEC_OPTIONS_KEY = "codec-options"
DOWNLINK_OPTIONS_KEY = "downlink-options"


@dataclass(frozen=True)
class FlowerSettings:
    corrupt_partition: int
    round_timeout: float | None
    straggler_timeout: float | None
    node_wait: float
    resume: bool = False


def parse_run_config(run_config: Mapping[str, Any]) -> tuple[Config, FlowerSettings]:
    """Split Flower's run config into a validated :class:`Config` and the Flower-only settings."""
    overrides: dict[str, Any] = {}
    codec: dict[str, Any] = {}
    flower = dict(FLOWER_KEYS)
    for key, value in run_config.items():
        if key in FLOWER_KEYS:
            flower[key] = value
        elif key.startswith("codec."):
            codec[key[len("codec."):]] = value
        elif key == CODEC_OPTIONS_KEY:
            codec.update(parse_assignments([f"codec.{item}" for item in str(value).split()])[1])
        elif key == DOWNLINK_OPTIONS_KEY:
            overrides["downlink_options"] = parse_assignments([f"downlink.{item}" for item in
                                                               str(value).split()])[0].get("downlink_options", {})
        else:
            overrides[key.replace("-", "_")] = None if value == "" else value
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = build_config(None, None, {**overrides, "codec_options": codec})
    except TypeError as err:  # a value of the wrong type that _coerce let through
        raise ConfigError(f"invalid Flower run config: {err}") from None
    timeout, straggler = float(flower["round-timeout"]), float(flower["straggler-timeout"])
    resume = flower["resume"]
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    if not isinstance(resume, bool):
        raise ConfigError(f"run config key resume expects true or false, got {resume!r}")
    return cfg, FlowerSettings(int(flower["corrupt-partition"]), timeout if timeout > 0 else None,
                               straggler if straggler > 0 else None, float(flower["node-wait"]), resume)


def run_config_items(cfg_overrides: Mapping[str, Any]) -> list[str]:
    """``{"num_clients": 3, ...}`` → ``["num-clients=3", ...]`` for ``flwr run --run-config``."""
    out = []
    for key, value in cfg_overrides.items():
        key = key.replace("_", "-")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{key}={text}")
    return out


def ensure_logging() -> None:
    """Send fedcodec's log lines (rejected payloads, dropped clients, per-round summaries) to stderr
    of the ServerApp/ClientApp process, which Flower shows (``flwr run --stream``, ``flwr log``, the
    SuperNode's output)."""
    root = logging.getLogger("fedcodec")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s fedcodec: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
