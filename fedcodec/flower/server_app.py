"""The Flower ServerApp: fedcodec's round loop over Flower's Grid (Message API).

Per round it does what :func:`fedcodec.fl.simulation.run_round` does, with the ClientApps on the
SuperNodes in place of in-process calls: sample clients (partition ids) with
:func:`fedcodec.fl.rng.sample_clients`, encode the broadcast with :func:`fedcodec.fl.server.broadcast`,
send it as bytes to the nodes holding those partitions, decode/reject/aggregate the replies with
:func:`fedcodec.fl.server.server_round` and evaluate with :func:`fedcodec.fl.simulation.evaluate`.
The ledger records ``len()`` of every payload that crossed the wire.

A client whose node is missing, fails, or does not answer before the round's deadline
(``round-timeout`` after the broadcast, or ``straggler-timeout`` after ``min-clients`` good replies)
is counted as ``dropped`` for the round; the round aggregates whatever decoded (``min-clients`` rule, as in the
simulator). Outputs under ``out-dir``: ``metrics.json``/``metrics.csv``/``ledger.csv`` (as
``fedcodec run`` writes them), ``model.pt`` (the global model after the last round) and
``flower.json`` (node map, per-round rejections and failures).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from .common import METRICS, QUERY, RECORD, TRAIN, FlowerSettings, ensure_logging, parse_run_config

log = logging.getLogger("fedcodec.flower.server")
app = ServerApp()


def discover(grid: Grid, num_clients: int, wait: float) -> dict[int, int]:
    """Ask every connected SuperNode for its ``partition-id``; return ``{partition: node_id}``.

    Waits up to ``wait`` seconds for ``num_clients`` distinct partitions. A partition claimed by
    two nodes keeps the lower node id; ids outside ``0..num_clients-1`` are ignored.
    """
    deadline = time.monotonic() + wait
    asked: set[int] = set()
    holders: dict[int, int] = {}
    while True:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            msgs = [Message(RecordDict(), dst_node_id=n, message_type=QUERY) for n in new]
            replies = collect(grid, msgs, len(msgs), max(deadline - time.monotonic(), 10.0), None)
            for node, reply in zip(new, replies):
                if reply is None:
                    log.warning("node %d did not report its partition in time", node)
                    continue
                if reply.has_error():
                    log.warning("node %d did not report its partition: %s", node, reply.error.reason)
                    continue
                pid = int(reply.content[RECORD]["partition-id"])
                if not 0 <= pid < num_clients:
                    log.warning("node %d holds partition %d, outside 0..%d: ignored", node, pid, num_clients - 1)
                elif pid in holders:
                    log.warning("partition %d is claimed by nodes %d and %d: using %d", pid, holders[pid], node,
                                min(holders[pid], node))
                    holders[pid] = min(holders[pid], node)
                else:
                    holders[pid] = node
            asked |= set(new)
        if len(holders) >= num_clients or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    missing = sorted(set(range(num_clients)) - set(holders))
    if missing:
        log.warning("no SuperNode holds partition(s) %s after %.0f s; those clients drop out when sampled",
                    missing, wait)
    log.info("partition → node: %s", dict(sorted(holders.items())))
    return holders


def collect(grid: Grid, msgs: list[Message], quorum: int, timeout: float | None,
            straggler_timeout: float | None, poll: float = 0.25) -> list[Message | None]:
    """Push ``msgs`` and pull their replies until all are in, ``timeout`` seconds have passed, or
    ``straggler_timeout`` seconds have passed since ``quorum`` good replies arrived. Returns the
    reply to each message, in order (``None``: none arrived). Replies are matched by the id of the
    message they answer: an error reply made by the SuperLink for a node it considers offline does
    not come from that node."""
    ids = list(grid.push_messages(msgs))
    pending, got = set(ids), {}
    start, quorum_at = time.monotonic(), None
    while pending:
        for reply in grid.pull_messages(pending):
            got[reply.metadata.reply_to_message_id] = reply
        pending -= set(got)
        now = time.monotonic()
        if quorum_at is None and sum(not r.has_error() for r in got.values()) >= quorum:
            quorum_at = now
        if not pending or (timeout is not None and now - start >= timeout) or (
                straggler_timeout is not None and quorum_at is not None and now - quorum_at >= straggler_timeout):
            break
        time.sleep(poll)
    return [got.get(i) for i in ids]


def run_rounds(grid: Grid, cfg, settings: FlowerSettings, out: Path) -> None:
    import torch

    from ..data import load_dataset
    from ..fl import rng as rngs
    from ..fl.simulation import finish_round, setup
    from ..report import summarize, write_method

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = load_dataset(cfg.dataset, cfg.data_dir, allow_subset=cfg.allow_subset)
    sim, state = setup(cfg, source)
    rt = sim.runtime
    holders = discover(grid, cfg.num_clients, settings.node_wait)
    events = {"nodes": {str(p): n for p, n in sorted(holders.items())}, "rounds": []}
    out.mkdir(parents=True, exist_ok=True)
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        clients = rngs.sample_clients(cfg.seed, rnd, cfg.num_clients, cfg.clients_per_round)
        failed: dict[int, str] = {c: "no SuperNode holds this partition" for c in clients if c not in holders}
        down, views = rt.downlink.send(state.global_params, rnd, [c for c in clients if c in holders],
                                       state.server_states)
        msgs, sent = [], []
        for c in clients:
            if c not in holders:
                continue
            state.ledger.record(rnd, c, "down", rt.downlink.codec.codec_id, down[c])
            content = RecordDict({RECORD: ConfigRecord({"broadcast": down[c], "round": rnd, "client": c})})
            msgs.append(Message(content, dst_node_id=holders[c], message_type=TRAIN, group_id=str(rnd)))
            sent.append(c)
        replies = collect(grid, msgs, cfg.min_clients, settings.round_timeout, settings.straggler_timeout)
        payloads, losses, setups, codec_metrics = {}, [], {}, []
        for c, reply in zip(sent, replies):
            if reply is None:
                failed[c] = "no reply before the round's deadline"
                continue
            if reply.has_error():
                failed[c] = f"error {reply.error.code}: {reply.error.reason}"
                continue
            rec = reply.content.config_records.get(RECORD, {})
            payload = rec.get("payload", b"")
            if "setup" in rec:  # a codec setup message (an AE client's decoder): counted as uplink
                setup_msg = rec["setup"] if isinstance(rec["setup"], bytes) else b""
                state.ledger.record(rnd, c, "up", f"{rt.uplink.codec_id}/setup", setup_msg)
                setups[c] = setup_msg
            # the ledger holds len() of the bytes that arrived; anything but bytes is rejected by the decoder
            state.ledger.record(rnd, c, "up", rt.uplink.codec_id, payload if isinstance(payload, bytes) else b"")
            metrics = reply.content.metric_records.get(METRICS, {})
            if "train-loss" in metrics:
                losses.append(float(metrics["train-loss"]))
            codec_metrics.append({k[len("codec-"):]: float(v) for k, v in metrics.items() if k.startswith("codec-")})
            # the weight is the partition's size, which the server knows (same seeded partition as every
            # node): a client cannot inflate its say in the aggregate by reporting more examples
            weight = len(sim.parts[c])
            if metrics.get("num-examples") != weight:
                log.warning("round %d: client %d reports %s examples, its partition has %d; using %d", rnd, c,
                            metrics.get("num-examples"), weight, weight)
            payloads[c] = (payload, float(weight))
        for c, why in sorted(failed.items()):
            log.warning("round %d: client %d dropped (%s)", rnd, c, why)
        state, outcome = finish_round(sim, state, rnd, t0, len(clients), payloads, losses, dropped=len(failed),
                                      references=views, setups=setups, codec_metrics=codec_metrics)
        record = state.records[-1]
        events["rounds"].append({"round": rnd, "sampled": clients, "accepted": outcome.accepted,
                                 "rejected": {str(c): r for c, r in outcome.rejected.items()},
                                 "dropped": {str(c): r for c, r in sorted(failed.items())}})
        log.info("round %d: %d/%d accepted, %d rejected, %d dropped, uplink %d B, accuracy %s", rnd,
                 len(outcome.accepted), len(clients), len(outcome.rejected), len(failed), record["uplink_bytes"],
                 f"{record['accuracy']:.4f}" if "accuracy" in record else "-")
        write_method(out, cfg.to_dict(), state.records, summarize(cfg.method, state.records, sim.spec), state.ledger)
        _write(out / "flower.json", json.dumps(events, indent=1).encode())
        tmp = out / ".model.pt.tmp"
        torch.save(state.global_params, tmp)
        os.replace(tmp, out / "model.pt")


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    ensure_logging()
    cfg, settings = parse_run_config(context.run_config)
    out = Path(cfg.out_dir).expanduser()
    log.info("fedcodec %s on Flower: %d rounds, %d of %d clients per round, output %s", cfg.method, cfg.rounds,
             cfg.clients_per_round, cfg.num_clients, out.resolve())
    run_rounds(grid, cfg, settings, out)
