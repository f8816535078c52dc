"""The Flower ClientApp: one SuperNode = one fedcodec client (its ``partition-id`` node config).

Messages (Message API):

- ``query`` → reply ``ConfigRecord {"partition-id", "num-partitions"}``: the ServerApp maps the
  clients it samples (partition ids) to node ids with these replies.
- ``train`` with ``ConfigRecord {"broadcast": bytes, "round": int, "client": int, "simulate": str}`` →
  runs :func:`fedcodec.fl.client.client_fit` and replies ``ConfigRecord {"payload": bytes, "client": int}``
  plus ``MetricRecord {"num-examples", "train-loss"}``. The payload is the codec's bitstream as raw
  bytes; no float tensors travel up. ``simulate = "dropout"`` (the config's simulated ``dropout``):
  the client takes in the broadcast and answers ``{"dropped": true, "client": int}`` without training;
  ``"straggler"`` changes nothing here (the server treats the answer as late). The message format is
  :mod:`fedcodec.flower.transport`'s.

The client's private store (error-feedback memory, its model copy under a delta downlink) lives in
the node's ``context.state`` as an ArrayRecord, which the SuperNode keeps between messages of a run;
it never leaves the node.
"""

from __future__ import annotations

import json
import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .common import METRICS, RECORD, SIMULATE_DROPOUT, ensure_logging, parse_run_config

log = logging.getLogger("fedcodec.flower.client")
app = ClientApp()
STATE = "fedcodec-client-state"

# The dataset, model and codecs are built once per run config and process. This helps in Flower's
# simulation engine, whose Ray actors serve many messages; in deployment, Flower 1.41 starts a fresh
# ClientApp process per message, so each message pays the imports and the data load (about 3 s for
# Fashion-MNIST on a small CPU).
_CACHE: dict[str, object] = {}


def partition_of(context: Context) -> tuple[int, int | None]:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config 'partition-id=<i> num-partitions=<n>'")
    pid, n = node["partition-id"], node.get("num-partitions")
    if isinstance(pid, bool) or not isinstance(pid, int) or not (n is None or isinstance(n, int)
                                                                 and not isinstance(n, bool)):
        raise ValueError(f"node config partition-id={pid!r} num-partitions={n!r}: both must be integers")
    return pid, n


def _simulation(context: Context):
    """The client's view of the run: ``fedcodec.fl.simulation.setup`` on the same config, so the
    model, codecs and data partition are those of the in-process engine."""
    cfg, settings = parse_run_config(context.run_config)
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key not in _CACHE:
        import torch

        from ..data import load_dataset
        from ..fl.simulation import setup

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        source = load_dataset(cfg.dataset, cfg.data_dir, allow_subset=cfg.allow_subset)
        _CACHE.clear()
        _CACHE[key] = setup(cfg, source)[0]
    return _CACHE[key], settings


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid, num = partition_of(context)
    rec = {"partition-id": pid} | ({"num-partitions": num} if num is not None else {})
    return Message(RecordDict({RECORD: ConfigRecord(rec)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    ensure_logging()
    from ..fl.client import client_fit, client_receive

    pid, num = partition_of(context)
    sim, settings = _simulation(context)
    t1 = time.perf_counter()
    if num is not None and num != sim.cfg.num_clients:
        raise ValueError(f"node config num-partitions={num} but the run has num-clients={sim.cfg.num_clients}")
    rec = msg.content[RECORD]
    round_num, client, broadcast = rec.get("round"), rec.get("client"), rec.get("broadcast")
    if not (isinstance(round_num, int) and isinstance(client, int) and isinstance(broadcast, bytes)):
        raise ValueError("a train message needs round (int), client (int) and broadcast (bytes)")
    if client != pid:
        raise ValueError(f"message for client {client} reached the node holding partition {pid}")
    store = context.state[STATE].to_torch_state_dict() if STATE in context.state else {}
    if rec.get("simulate") == SIMULATE_DROPOUT:  # the config's simulated failure: broadcast in, nothing out
        client_receive(sim.runtime, broadcast, round_num, pid, state=store)
        if store:
            context.state[STATE] = ArrayRecord(torch_state_dict=store)
        log.info("round %d, client %d: simulated dropout", round_num, pid)
        return Message(RecordDict({RECORD: ConfigRecord({"dropped": True, "client": pid})}), reply_to=msg)
    x, y = sim.client_data(pid)
    payload, info = client_fit(sim.runtime, broadcast, x, y, sim.training, round_num, pid, state=store)
    if store:
        context.state[STATE] = ArrayRecord(torch_state_dict=store)
    if settings.corrupt_partition == pid:  # test hook: a byte flipped in transit (same length)
        flipped = bytearray(payload)
        flipped[len(flipped) // 2] ^= 0xFF
        payload = bytes(flipped)
        log.warning("round %d: partition %d corrupts its payload (corrupt-partition)", round_num, pid)
    log.info("round %d, client %d: %d examples, setup %.1f s, training %.1f s, payload %d bytes", round_num, pid,
             len(x), t1 - t0, time.perf_counter() - t1, len(payload))
    reply = {"payload": payload, "client": pid}
    if "setup" in info:  # the codec's setup message (an AE client's decoder), sent with the payload
        reply["setup"] = info["setup"]
    codec_metrics = {f"codec-{k}": float(v) for k, v in info.get("codec", {}).items()}
    content = RecordDict({
        RECORD: ConfigRecord(reply),
        METRICS: MetricRecord({"num-examples": int(info["num_examples"]), "train-loss": float(info["train_loss"])}
                              | codec_metrics),
    })
    return Message(content, reply_to=msg)
