"""What the ServerApp and the ClientApp share: the run config → Config mapping and message keys.

Flower's run config (``[tool.flwr.app.config]`` in ``flower_app/pyproject.toml``, overridden with
``flwr run --run-config``) uses hyphenated keys (:data:`RUN_CONFIG_KEYS`): every
:class:`fedcodec.config.Config` key with ``-`` for ``_`` (``num-clients`` → ``num_clients``), and the
few keys only the Flower apps read (the fields of :class:`FlowerSettings`). Values are parsed and
checked by :func:`fedcodec.config.coerce`, as ``--set`` values are: the codec options are one string
(``codec-options = "noise=gaussian pm=false"``; ``codec.NAME`` keys are taken too), and an empty
string means "unset" (``None``) for optional keys such as ``lr`` or ``data-dir``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import CONFIG_KEYS, Config, build_config, coerce, describe, option_value, setting

#: message types (Flower routes ``train`` to ``@app.train()``, ``query`` to ``@app.query()``,
#: ``evaluate`` to ``@app.evaluate()``: the final evaluation of a learned-compression run)
TRAIN, QUERY, EVALUATE = "train", "query", "evaluate"
#: record names inside a message's RecordDict
RECORD, METRICS = "fedcodec", "metrics"
#: the ``simulate`` field of a train message: the config's simulated failures, acted out by the client
SIMULATE_NONE, SIMULATE_DROPOUT, SIMULATE_STRAGGLER = "", "dropout", "straggler"


@dataclass(frozen=True)
class FlowerSettings:
    """The run-config keys only the Flower apps read (``corrupt-partition``, ``round-timeout``, ...),
    described like :class:`~fedcodec.config.Config`'s. A timeout of 0 (or unset) is no limit: None."""

    corrupt_partition: int = setting(-1, "test hook: this partition's ClientApp flips a byte of its payload")
    round_timeout: float | None = setting(0.0, "seconds to wait for replies in a round; 0 = until every reply "
                                          "is in", at_least=0)
    straggler_timeout: float | None = setting(0.0, "once min-clients replies are in, seconds to wait for the "
                                              "rest; 0 = no limit", at_least=0)
    node_wait: float = setting(120.0, "seconds the ServerApp waits for num-clients SuperNodes to connect",
                               at_least=0)
    resume: bool = setting(False, "continue from out-dir/checkpoint.safetensors (a restarted ServerApp)")
    neural: str = setting("", "train a learned data compressor instead of a classifier: space-separated options, "
                          "e.g. \"source=clusters lambda=300 samples_per_client=30\" (fedcodec.neural.deploy); "
                          "\"\" = classification")

    def __post_init__(self):
        for name in ("round_timeout", "straggler_timeout"):
            if not getattr(self, name):
                object.__setattr__(self, name, None)


#: every key the Flower app's run config takes (and ``flower_app/pyproject.toml`` declares), hyphenated
RUN_CONFIG_KEYS = {name.replace("_", "-"): key for name, key in {**CONFIG_KEYS, **describe(FlowerSettings)}.items()}


def parse_run_config(run_config: Mapping[str, Any]) -> tuple[Config, FlowerSettings]:
    """Split Flower's run config into a validated :class:`Config` and the Flower-only settings."""
    config: dict[str, Any] = {}
    flower: dict[str, Any] = {}
    codec: dict[str, Any] = {}
    for name, value in run_config.items():
        if name.startswith("codec."):
            codec[name[len("codec."):]] = option_value(value, name)
            continue
        field, value = coerce(name, value, keys=RUN_CONFIG_KEYS, what="run-config key")
        if value is not None:
            (flower if field in describe(FlowerSettings) else config)[field] = value
    config["codec_options"] = {**config.get("codec_options", {}), **codec}
    return build_config(None, None, config), FlowerSettings(**flower)


def build_simulation(cfg: Config, settings: FlowerSettings):
    """The run's simulation and initial state, built alike on the ServerApp and every SuperNode:
    a learned compressor's (``settings.neural``, :class:`fedcodec.neural.deploy.NeuralRun`) or the
    classification run of ``cfg`` (:func:`fedcodec.fl.simulation.setup`)."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if settings.neural:
        from ..neural.deploy import NeuralRun

        return NeuralRun.parse(settings.neural).simulation(cfg)
    from ..data import load_dataset
    from ..fl.simulation import setup

    return setup(cfg, load_dataset(cfg.dataset, cfg.data_dir, allow_subset=cfg.allow_subset))


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
