"""The Flower ClientApp: one SuperNode = one fedcodec client (its ``partition-id`` node config).

Messages (Message API):

- ``query`` → reply ``ConfigRecord {"partition-id", "num-partitions"}``: the ServerApp maps the
  clients it samples (partition ids) to node ids with these replies.
- ``train`` with ``ConfigRecord {"broadcast": bytes, "round": int, "client": int, "simulate": str}`` →
  runs :func:`fedcodec.fl.client.client_fit` and replies ``ConfigRecord {"payload": bytes, "client": int}``
  plus ``MetricRecord {"num-examples", "train-loss"}``. The payload is the codec's bitstream as raw
  bytes; no float tensors travel up. ``simulate = "dropout"`` (the config's simulated ``dropout``):
  the client takes in the broadcast and answers ``{"dropped": true, "client": int}`` without training;
  ``"straggler"`` changes nothing here (the server treats the answer as late). A broadcast the client
  cannot take in (out of sync with its copy of the model under a delta downlink, non-finite,
  malformed: :class:`~fedcodec.fl.downlink.DownlinkError`) leaves its state as it was, and it answers
  ``{"client": int, "refused-broadcast": reason, "detail": str}`` instead of training; the server
  then sends it the whole model. A ``train-loss`` or codec metric that is not finite is left out of
  the MetricRecord (the server takes a missing loss as NaN and refuses non-finite numbers). The
  message format is :mod:`fedcodec.flower.transport`'s.

- ``evaluate`` (learned-compression runs only, run config ``neural``) with ``ConfigRecord {"broadcast",
  "round", "client"}`` → ``ConfigRecord {"client"}`` plus ``MetricRecord {"rate", "rate-est", "mse",
  "bytes", "examples"}``: the node codes its test data with its own entropy model, which stays here.

Test hook: a SuperNode started with ``--node-config '... fedcodec-test-garbage=true'`` answers every
train message with a malformed reply (a different defect each round), as a broken or hostile node
would; the ServerApp must count it as failed and carry on.

The client's private store (error-feedback memory, its model copy under a delta downlink) lives in
the node's ``context.state`` as an ArrayRecord, which the SuperNode keeps between messages of a run;
it never leaves the node.
"""

from __future__ import annotations

import json
import logging
import math
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .common import METRICS, RECORD, SIMULATE_DROPOUT, build_simulation, ensure_logging, parse_run_config

log = logging.getLogger("fedcodec.flower.client")
app = ClientApp()
STATE = "fedcodec-client-state"
TEST_GARBAGE = "fedcodec-test-garbage"  # node-config key of the test hook (module docstring)

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
    """The client's view of the run: the same simulation the ServerApp builds
    (:func:`fedcodec.flower.common.build_simulation`: classification or a learned compressor), so
    the model, codecs and data partition are those of the in-process engine."""
    cfg, settings = parse_run_config(context.run_config)
    key = json.dumps([cfg.to_dict(), settings.neural], sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_simulation(cfg, settings)[0]
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
    from ..fl.downlink import DownlinkError

    sim, settings = _simulation(context)
    t1 = time.perf_counter()
    pid, round_num, broadcast, rec = _opened(msg, context, sim, "train")
    if context.node_config.get(TEST_GARBAGE) is True:
        return garbage_reply(msg, pid, round_num)
    store = _store(context)
    try:
        if rec.get("simulate") == SIMULATE_DROPOUT:  # the config's simulated failure: broadcast in, nothing out
            client_receive(sim.runtime, broadcast, round_num, pid, state=store)
            if store:
                context.state[STATE] = ArrayRecord(torch_state_dict=store)
            log.info("round %d, client %d: simulated dropout", round_num, pid)
            return Message(RecordDict({RECORD: ConfigRecord({"dropped": True, "client": pid})}), reply_to=msg)
        x, y = sim.client_data(pid)
        payload, info = client_fit(sim.runtime, broadcast, x, y, sim.training, round_num, pid, state=store)
    except DownlinkError as err:  # nothing was stored: context.state keeps the old copy
        log.warning("round %d: %s", round_num, err)
        return _refused(msg, pid, err)
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
    numbers = {"train-loss": float(info["train_loss"])} | {f"codec-{k}": float(v)
                                                           for k, v in info.get("codec", {}).items()}
    content = RecordDict({
        RECORD: ConfigRecord(reply),
        METRICS: MetricRecord({"num-examples": int(info["num_examples"])}
                              | {k: v for k, v in numbers.items() if math.isfinite(v)}),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The final evaluation of a learned-compression run (run config ``neural``): the client takes
    in the final shared tensors, codes its own test data with its own entropy model (which never
    leaves this node) and answers with numbers only: ``MetricRecord {"rate", "rate-est", "mse",
    "bytes", "examples"}`` (:func:`fedcodec.neural.deploy.evaluate_client`)."""
    ensure_logging()
    from ..fl.downlink import DownlinkError
    from ..neural.deploy import evaluate_client

    sim, settings = _simulation(context)
    if not settings.neural:
        raise ValueError("evaluate messages belong to learned-compression runs (run config 'neural'); "
                         "a classification run is evaluated by the ServerApp")
    pid, round_num, broadcast, _ = _opened(msg, context, sim, "evaluate")
    store = _store(context)
    try:
        point = evaluate_client(sim, broadcast, round_num, pid, store)
    except DownlinkError as err:
        log.warning("evaluation: %s", err)
        return _refused(msg, pid, err)
    if store:
        context.state[STATE] = ArrayRecord(torch_state_dict=store)
    log.info("evaluation, client %d: %d test samples in %d bytes (%.4g per unit), MSE %.4g", pid,
             point["examples"], point["bytes"], point["rate"], point["mse"])
    return Message(RecordDict({RECORD: ConfigRecord({"client": pid}), METRICS: MetricRecord(point)}), reply_to=msg)


def _opened(msg: Message, context: Context, sim, kind: str) -> tuple[int, int, bytes, ConfigRecord]:
    """(partition, round, broadcast, record) of a ``kind`` message to this node, checked: the node
    config's partition matches the run, the message names that client and has its fields' types."""
    pid, num = partition_of(context)
    if num is not None and num != sim.cfg.num_clients:
        raise ValueError(f"node config num-partitions={num} but the run has num-clients={sim.cfg.num_clients}")
    rec = msg.content[RECORD]
    round_num, client, broadcast = rec.get("round"), rec.get("client"), rec.get("broadcast")
    if not (isinstance(round_num, int) and isinstance(client, int) and isinstance(broadcast, bytes)):
        raise ValueError(f"a {kind} message needs round (int), client (int) and broadcast (bytes)")
    if client != pid:
        raise ValueError(f"message for client {client} reached the node holding partition {pid}")
    return pid, round_num, broadcast, rec


def _store(context: Context) -> dict:
    """The client's private store, as this node's context state keeps it (empty at first)."""
    return context.state[STATE].to_torch_state_dict() if STATE in context.state else {}


def _refused(msg: Message, pid: int, err) -> Message:
    """The answer of a client that could not take in its broadcast (a DownlinkError): its store is as it was."""
    return Message(RecordDict({RECORD: ConfigRecord({"client": pid, "refused-broadcast": err.reason,
                                                     "detail": err.detail})}), reply_to=msg)


def garbage_reply(msg: Message, pid: int, round_num: int) -> Message:
    """The test hook's malformed answer (``fedcodec-test-garbage``): a different defect each round."""
    kind = round_num % 4
    log.warning("round %d: partition %d answers garbage #%d (%s)", round_num, pid, kind, TEST_GARBAGE)
    if kind == 0:  # a payload that is not bytes, a metric that is a list
        content = RecordDict({RECORD: ConfigRecord({"payload": "not bytes", "client": pid}),
                              METRICS: MetricRecord({"num-examples": [1, 2], "train-loss": 0.5})})
    elif kind == 1:  # a well-formed reply for another client
        content = RecordDict({RECORD: ConfigRecord({"payload": b"\0" * 64, "client": pid + 1}),
                              METRICS: MetricRecord({"num-examples": 10, "train-loss": 0.5})})
    elif kind == 2:  # a non-finite loss
        content = RecordDict({RECORD: ConfigRecord({"payload": b"\0" * 64, "client": pid}),
                              METRICS: MetricRecord({"num-examples": 10, "train-loss": float("inf")})})
    else:  # the record under the wrong type, and no metrics
        content = RecordDict({RECORD: MetricRecord({"client": pid, "payload": 1.0})})
    return Message(content, reply_to=msg)
