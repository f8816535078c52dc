"""The ServerApp side of fedcodec in any Flower app: :class:`CompressedStrategy` and its
:class:`BandwidthLedger`.

The wrapper sits between a stock Flower strategy (FedAvg, FedAdam, FedProx, Krum, ...) and the
grid: the strategy builds and aggregates ordinary ArrayRecords, and only the wire carries codec bytes.
Its node half is :func:`~fedcodec.flower.mod.codec_mod`; the message format is
:mod:`fedcodec.flower.protocol`'s.
"""

from __future__ import annotations

import csv
from logging import INFO, WARNING
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log as flwr_log  # Flower's logger: the ledger's lines show with the strategy's

from ..codecs import CodecContext, ModelSpec, Update
from ..config import parse_options
from ..errors import ConfigError, PayloadError
from ..fl import rng as rngs
from ..fl.downlink import Downlink
from .protocol import (PAYLOAD, RECORD, CodecChoice, array_bytes, config_record, downlink_codec, entries_of,
                       float_tensors, layout_of, model_record, others, rebuild, spec_of, uplink_for_flower)


UP, DOWN = "up", "down"
#: ledger columns
FIELDS = ("round", "node", "direction", "message", "codec", "bytes", "uncompressed", "status", "reason")
#: the per-round summary's columns
ROUND_FIELDS = ("round", "up_messages", "up_bytes", "up_uncompressed", "up_ratio", "down_messages", "down_bytes",
                "down_uncompressed", "down_ratio", "refused")


class BandwidthLedger:
    """One row per message a :class:`CompressedStrategy` sent or received.

    Each row: ``round``, ``node``, ``direction`` (``down``: server → node, ``up``: node → server),
    ``message`` (``train`` or ``evaluate``), ``codec`` (the wire id, ``flower-arrays`` for an
    uncompressed broadcast), ``bytes`` (``len()`` of what carried the model: the codec payload, a
    compressed broadcast's layout, and any non-float arrays, serialized as Flower serializes them),
    ``uncompressed`` (what the unmodified app sends for the same arrays: the serialized bytes of its
    ArrayRecord), ``status`` (``ok``, ``rejected``: a reply the server refused, ``failed``: an error
    reply) and ``reason``. Flower's own message framing and fedcodec's few control fields (codec name,
    round, seed: under 200 bytes) are not counted, as Flower's metadata is not for the unmodified app.
    """

    def __init__(self, path: str | Path | None = None):
        self.rows: list[dict[str, Any]] = []
        self.path = Path(path) if path is not None else None

    def add(self, round_num: int, node: int, direction: str, message: str, codec: str, nbytes: int,
            uncompressed: int, status: str = "ok", reason: str = "") -> None:
        self.rows.append({"round": round_num, "node": node, "direction": direction, "message": message,
                          "codec": codec, "bytes": nbytes, "uncompressed": uncompressed, "status": status,
                          "reason": reason})

    def summary(self) -> list[dict[str, Any]]:
        """Per round: messages, bytes and uncompressed bytes each way, their ratio, and replies refused."""
        rounds: dict[int, dict[str, Any]] = {}
        for row in self.rows:
            r = rounds.setdefault(row["round"], {"round": row["round"], "up_messages": 0, "up_bytes": 0,
                                                 "up_uncompressed": 0, "down_messages": 0, "down_bytes": 0,
                                                 "down_uncompressed": 0, "refused": 0})
            if row["status"] != "ok":
                r["refused"] += row["status"] == "rejected"
                continue
            d = row["direction"]
            r[f"{d}_messages"] += 1
            r[f"{d}_bytes"] += row["bytes"]
            r[f"{d}_uncompressed"] += row["uncompressed"]
        out = []
        for r in sorted(rounds.values(), key=lambda r: r["round"]):
            for d in (UP, DOWN):
                r[f"{d}_ratio"] = r[f"{d}_uncompressed"] / r[f"{d}_bytes"] if r[f"{d}_bytes"] else None
            out.append(r)
        return out

    def totals(self) -> dict[str, Any]:
        """Bytes each way over the whole run, and the ratios to the unmodified app."""
        ok = [r for r in self.rows if r["status"] == "ok"]
        out: dict[str, Any] = {}
        for d in (UP, DOWN):
            sent = sum(r["bytes"] for r in ok if r["direction"] == d)
            plain = sum(r["uncompressed"] for r in ok if r["direction"] == d)
            out[f"{d}_bytes"], out[f"{d}_uncompressed"] = sent, plain
            out[f"{d}_ratio"] = plain / sent if sent else None
        return out

    def write(self, path: str | Path | None = None) -> Path | None:
        """Write the rows as CSV to ``path`` (default: the ledger's own), and :meth:`summary` beside it
        (``bandwidth.csv`` → ``bandwidth-rounds.csv``); returns the path of the rows."""
        target = Path(path) if path is not None else self.path
        if target is None:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(target, FIELDS, self.rows)
        _write_csv(target.with_name(f"{target.stem}-rounds{target.suffix}"), ROUND_FIELDS, self.summary())
        return target


def _write_csv(target: Path, fields: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    tmp = target.with_suffix(target.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(target)


@dataclass
class _Sent:
    """What the server sent one node this round: what it needs to decode the reply."""

    key: str
    entries: list[tuple[str, str]]
    plain: dict[str, tuple[str, tuple[int, ...]]]  # the non-float arrays' dtype and shape
    spec: ModelSpec
    view: Update  # the float model the node holds after decoding the broadcast
    seed: int
    uncompressed: int


@dataclass
class _Broadcast:
    arrays: ArrayRecord
    spec: ModelSpec
    floats: Update
    nodes: list[int] = field(default_factory=list)


def _error(reply: Message, reason: str) -> Message:
    """``reply`` turned into a failed reply (the wrapped strategy counts it as a failure)."""
    return Message(error=Error(code=ErrorCode.UNKNOWN, reason=f"fedcodec: {reason}"), metadata=reply.metadata)


class CompressedStrategy(Strategy):
    """Wrap a Flower strategy so every model update travels as a fedcodec codec's bytes.

    The wrapped strategy samples nodes and aggregates as it always does; the wrapper adds the codec
    to each outgoing message, compresses the broadcast when a ``downlink`` codec is given, and turns
    each reply's codec payload back into the ArrayRecord the strategy expects (the model the node sent,
    as the server reconstructs it) before the strategy aggregates. A reply the server cannot decode
    (no payload, a corrupt or oversized one, values out of range, arrays that do not match, a second
    reply from one node) becomes a failed reply with the reason: the round goes on without it.
    Every message is written to the :attr:`ledger`.

    Nodes run :func:`~fedcodec.flower.mod.codec_mod` in their ClientApp's mods; codecs that change
    local training (``fedmrn``, ``fedbat``) also need
    :func:`~fedcodec.flower.training.compressed_training` around the node's training loop.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap (``FedAvg()``, ``FedAdam(...)``, ...).
    codec : str (default: ``"qsgd"``)
        The uplink codec (``fedcodec codecs`` lists them). Codecs a stock strategy cannot aggregate
        are refused: ``fedpm`` (Beta posterior), ``ae`` (learns its decoder first), signSGD with
        ``vote=true``.
    options : dict or str, optional
        The codec's options, plus ``ef`` (error feedback, kept on the node) and ``entropy`` (range
        coding), e.g. ``{"levels": 16, "ef": True}`` or, as in a run config, ``"levels=16 ef=true"``.
    downlink : str, optional
        A codec for the broadcast (``"fp16"``; with ``downlink_delta``, e.g. ``"qsgd"`` with
        ``{"levels": 255}``). None or ``""`` (default): the broadcast stays Flower arrays.
    downlink_options : dict or str, optional
        The downlink codec's options.
    downlink_delta : bool (default: False)
        Send each node the change of its own copy of the model instead of the model (the server
        keeps one copy per node; a node's first broadcast is the whole model in fp32).
    seed : int (default: 0)
        The run's seed, from which each node-round's codec seed is derived.
    ledger : str or Path, optional
        A CSV file the ledger is written to after every round.

    Examples
    --------
    ::

        from flwr.serverapp.strategy import FedAvg
        from fedcodec.flower import CompressedStrategy

        strategy = CompressedStrategy(FedAvg(), codec="qsgd", options={"levels": 16, "ef": True},
                                      ledger="bandwidth.csv")
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)
        print(strategy.ledger.totals())
    """

    def __init__(self, strategy: Strategy, codec: str = "qsgd", options: dict[str, Any] | str | None = None,
                 downlink: str | None = None, downlink_options: dict[str, Any] | str | None = None,
                 downlink_delta: bool = False, seed: int = 0, ledger: str | Path | None = None):
        if not isinstance(strategy, Strategy):
            raise ConfigError(f"CompressedStrategy wraps a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}")
        if isinstance(options, str):
            options = parse_options(options, "options")
        if isinstance(downlink_options, str):
            downlink_options = parse_options(downlink_options, "downlink_options")
        downlink = downlink or None
        self.strategy = strategy
        self.choice = CodecChoice(codec, dict(options or {}))
        self.uplink = uplink_for_flower(codec, dict(self.choice.options))
        CodecChoice.from_message(codec, self.choice.to_json())  # the options survive the trip as JSON
        if downlink is None and (downlink_options or downlink_delta):
            raise ConfigError("downlink_options or downlink_delta were given without a downlink codec")
        self.down_choice = CodecChoice(downlink, dict(downlink_options or {})) if downlink else None
        self.down_codec = downlink_codec(self.down_choice) if self.down_choice else None
        if self.down_codec is not None and not downlink_delta and not self.down_codec.carries_models:
            raise ConfigError(f"downlink codec {downlink!r} codes updates, not models: use it with "
                              "downlink_delta=True, or choose fp16/fp32 for the model itself")
        self.delta = bool(downlink_delta)
        self.seed = int(seed)
        self.ledger = BandwidthLedger(ledger)
        self._sent: dict[int, _Sent] = {}
        self._stores: dict[int, dict[str, torch.Tensor]] = {}  # per node: the server's codec and downlink state
        self._downlinks: dict[bytes, Downlink] = {}

    def __getattr__(self, name: str):
        """Anything else is the wrapped strategy's (``fraction_train``, FedOpt's ``current_arrays``, ...)."""
        if name == "strategy":  # not set yet (during __init__)
            raise AttributeError(name)
        return getattr(self.strategy, name)

    # -- the Strategy interface ---------------------------------------------------------------
    def summary(self) -> None:
        down = "Flower arrays" if self.down_choice is None else \
            f"{self.down_codec.codec_id} {self.down_choice.options or ''}{' (delta)' if self.delta else ''}"
        flwr_log(INFO, "\t├──> fedcodec: uplink %s %s, downlink %s", self.uplink.codec_id,
                 self.choice.options or "", down)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = {}
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        return self._outgoing(messages, server_round, train=True)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        decoded, seen = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._failed(server_round, node, "train", reply.error.reason)
                decoded.append(reply)
                continue
            try:
                if node in seen:
                    raise PayloadError("duplicate", "a second reply from this node in one round")
                seen.add(node)
                decoded.append(self._decode(reply, server_round))
            except Exception as err:  # noqa: BLE001  (anything a node sends must not stop the server)
                reason = err.args[0] if isinstance(err, ConfigError) and err.args else str(err)
                flwr_log(WARNING, "fedcodec: round %d, reply of node %d refused: %s", server_round, node, reason)
                self.ledger.add(server_round, node, UP, "train", self.uplink.codec_id, _reply_bytes(reply), 0,
                                "rejected", reason)
                decoded.append(_error(reply, reason))
        self._sent = {}
        result = self.strategy.aggregate_train(server_round, decoded)
        self._report(server_round)
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        return self._outgoing(messages, server_round, train=False)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                self._failed(server_round, reply.metadata.src_node_id, "evaluate", reply.error.reason)
        result = self.strategy.aggregate_evaluate(server_round, replies)
        self.ledger.write()
        return result

    # -- messages out -------------------------------------------------------------------------
    def _downlink(self, spec: ModelSpec) -> Downlink:
        if spec.fingerprint not in self._downlinks:
            zeros = {t.name: torch.zeros(t.shape) for t in spec.tensors}
            self._downlinks[spec.fingerprint] = Downlink(self.down_codec, self.delta, spec, self.seed, zeros)
        return self._downlinks[spec.fingerprint]

    def _outgoing(self, messages: list[Message], server_round: int, train: bool) -> list[Message]:
        kind = "train" if train else "evaluate"
        groups: dict[int, _Broadcast] = {}
        out = []
        for msg in messages:
            found = model_record(msg.content) if msg.has_content() else None
            if found is None:  # nothing of the model's in it: not ours to touch
                out.append(msg)
                continue
            if RECORD in msg.content:
                raise ConfigError(f"the wrapped strategy's message already holds a record named {RECORD!r}")
            arrays = found[1]
            if id(arrays) not in groups:
                spec = spec_of(arrays)
                groups[id(arrays)] = _Broadcast(arrays, spec, float_tensors(arrays, spec))
            groups[id(arrays)].nodes.append(msg.metadata.dst_node_id)
        payloads: dict[tuple[int, int], bytes] = {}
        views: dict[tuple[int, int], Update] = {}
        for gid, b in groups.items():
            if self.down_codec is None:
                for n in b.nodes:
                    views[gid, n] = b.floats
                continue
            down = self._downlink(b.spec)
            for n in b.nodes:
                store = self._stores.setdefault(n, {})
                if not any(k.startswith("down/") for k in store):
                    down.forget(self._stores, n)  # a node's first broadcast is the whole model
            p, v = down.send(b.floats, server_round, b.nodes, self._stores)
            for n in b.nodes:
                payloads[gid, n], views[gid, n] = p[n], v[n]
        for msg in messages:
            found = model_record(msg.content) if msg.has_content() else None
            if found is None:
                continue
            key, arrays = found
            gid, node = id(arrays), msg.metadata.dst_node_id
            b = groups[gid]
            seed = rngs.codec_seed(self.seed, server_round, node) & (2 ** 63 - 1)
            content = RecordDict({k: v for k, v in msg.content.items() if k != key or self.down_codec is None})
            plain = others(arrays)
            uncompressed = array_bytes(arrays)
            if self.down_codec is None:
                model, layout, nbytes, label = None, None, uncompressed, "flower-arrays"
            else:
                model, layout = payloads[gid, node], layout_of(arrays)
                if len(plain):
                    content[key] = plain
                nbytes = len(model) + len(layout.encode()) + array_bytes(plain)
                label = self._downlink(b.spec).codec_label(model)
            content[RECORD] = config_record(self.choice, server_round, seed, key, self.down_choice, self.delta,
                                            model, layout)
            self.ledger.add(server_round, node, DOWN, kind, label, nbytes, uncompressed)
            if train:
                self._sent[node] = _Sent(key, entries_of(arrays),
                                         {n: (a.dtype, tuple(a.shape)) for n, a in plain.items()},
                                         b.spec, views[gid, node], seed, uncompressed)
            md = msg.metadata
            out.append(Message(content, dst_node_id=node, message_type=md.message_type, ttl=md.ttl,
                               group_id=md.group_id or None))
        return out

    # -- replies in ---------------------------------------------------------------------------
    def _failed(self, server_round: int, node: int, kind: str, reason: str) -> None:
        """An error reply: under a delta downlink the node may not hold the server's copy any more."""
        if self.down_codec is not None and self.delta:
            self._downlinks_forget(node)
        self.ledger.add(server_round, node, UP, kind, "", 0, 0, "failed", str(reason)[:300])

    def _downlinks_forget(self, node: int) -> None:
        for down in self._downlinks.values():
            down.forget(self._stores, node)

    def _decode(self, reply: Message, server_round: int) -> Message:
        node = reply.metadata.src_node_id
        sent = self._sent.pop(node, None)
        if sent is None:
            raise PayloadError("unexpected", "no train message of this round went to this node")
        content = reply.content
        record = content.config_records.get(RECORD)
        if record is None:
            raise PayloadError("missing", "the reply holds no fedcodec payload: add fedcodec.flower.codec_mod "
                                          "to the ClientApp's mods")
        payload, key = record.get(PAYLOAD), record.get("arrays-key")
        if not isinstance(payload, bytes):
            raise PayloadError("type", f"the payload is a {type(payload).__name__}, not bytes")
        if key != sent.key:
            raise PayloadError("field", f"the reply names ArrayRecord {str(key)[:60]!r}; the model went out as "
                                        f"{sent.key!r}")
        extra = set(content.array_records) - {key}
        if extra:
            raise PayloadError("field", f"unexpected ArrayRecord(s) {sorted(extra)[:4]} in the reply")
        plain = content.array_records.get(key, ArrayRecord())
        got = {n: (a.dtype, tuple(a.shape)) for n, a in plain.items()}
        if got != sent.plain:
            raise PayloadError("field", "the reply's non-float arrays do not match the model sent")
        ctx = CodecContext(sent.spec, client=node, round=server_round, seed=sent.seed, reference=sent.view,
                           state=self._stores.setdefault(node, {}), metrics={})
        decoded = self.uplink.decode(payload, ctx)
        floats = decoded if self.uplink.codec.lossless else \
            {t.name: sent.view[t.name] + decoded[t.name] for t in sent.spec.tensors}
        for name, value in floats.items():
            if not torch.isfinite(value).all():
                raise PayloadError("nonfinite", f"the model rebuilt from the update holds Inf in {name!r}")
        rebuilt = rebuild(sent.entries, floats, plain)
        new = RecordDict({k: v for k, v in content.items() if k not in (RECORD, key)})
        new[key] = rebuilt
        reply.content = new
        self.ledger.add(server_round, node, UP, "train", self.uplink.codec_id, len(payload) + array_bytes(plain),
                        sent.uncompressed)
        return reply

    def _report(self, server_round: int) -> None:
        rows = [r for r in self.ledger.summary() if r["round"] == server_round]
        if rows:
            r = rows[0]
            up = f"{r['up_ratio']:.1f}x" if r["up_ratio"] else "-"
            down = f"{r['down_ratio']:.1f}x" if r["down_ratio"] else "-"
            flwr_log(INFO, "fedcodec: round %d: uplink %d replies, %s B (%s smaller); downlink %d messages, %s B (%s); "
                     "%d refused", server_round, r["up_messages"], f"{r['up_bytes']:,}", up, r["down_messages"],
                     f"{r['down_bytes']:,}", down, r["refused"])
        self.ledger.write()


def _reply_bytes(reply: Message) -> int:
    """The length of the payload a refused reply carried, when it has one of bytes."""
    try:
        record = reply.content.config_records.get(RECORD)
        payload = record.get(PAYLOAD) if record is not None else None
        return len(payload) if isinstance(payload, bytes) else 0
    except Exception:  # noqa: BLE001
        return 0
