"""An in-process Flower Grid: a ServerApp's strategy and a ClientApp in one Python process, every
message through a protobuf round trip as on the wire, one Context per node kept across rounds.

For tests and benchmarks of an app (``tests/test_flower_mods.py``, ``benchmarks/flower_example.py``):
deterministic (nodes answer in order, replies come back sorted by node id) and fast (no processes).
``flwr run`` is what deploys the same app."""

from __future__ import annotations

from typing import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


def wire(message: Message) -> tuple[Message, int]:
    """``message`` after serialization and parsing, and its size on the wire in bytes."""
    data = message_to_proto(message).SerializeToString()
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto), len(data)


class InProcessGrid(Grid):
    """``num_nodes`` nodes (ids 101, 102, ...; ``partition-id`` 0, 1, ...) answering through ``client_app``.

    ``tamper(node, reply)`` may replace a reply before the server sees it (a hostile node). Replies
    come back sorted by node id, so aggregation order is fixed. ``sizes`` records each message's wire
    size as ``(node, direction, message_type, bytes)``; ``phases`` each ``send_and_receive`` call as
    ``(message_type, replies)``; ``received`` every reply as ``(message_type, reply)``. Besides the
    Strategy API's ``send_and_receive``, ``push_messages``/``pull_messages`` (what fedcodec's own
    ServerApp uses) answer each pushed message at once, so a whole ``fedcodec.flower.server_app``
    run fits in one process."""

    def __init__(self, client_app, num_nodes: int, run_config: dict,
                 tamper: Callable[[int, Message], Message] | None = None):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.app = client_app
        self.nodes = [101 + i for i in range(num_nodes)]
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": num_nodes},
                                    state=RecordDict(), run_config=dict(run_config))
                         for i, n in enumerate(self.nodes)}
        self.tamper = tamper
        self.sizes: list[tuple[int, str, str, int]] = []
        self.phases: list[tuple[str, list[Message]]] = []  # each call's replies, as the server received them
        self.received: list[tuple[str, Message]] = []  # every reply the server got: (message type, reply)
        self._pushed = 0
        self._waiting: dict[str, Message] = {}

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message at once (its reply waits for :meth:`pull_messages`); message ids are
        ``m1``, ``m2``, ... in push order."""
        ids = []
        for msg in messages:
            self._pushed += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._pushed}"
            ids.append(msg.metadata.message_id)
            self._waiting[msg.metadata.message_id] = self._answer(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._waiting.pop(mid) for mid in list(message_ids) if mid in self._waiting]

    def _answer(self, msg: Message) -> Message:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        received, size = wire(msg)
        self.sizes.append((node, "down", kind, size))
        reply = self.app(received, self.contexts[node])
        if self.tamper is not None:
            reply = self.tamper(node, reply)
        reply, size = wire(reply)
        self.sizes.append((node, "up", kind, size))
        self.received.append((kind, reply))
        return reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies, kind = [], ""
        for msg in messages:
            kind = msg.metadata.message_type
            replies.append(self._answer(msg))
        replies.sort(key=lambda m: m.metadata.src_node_id)
        self.phases.append((kind, replies))
        return replies
