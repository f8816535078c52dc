"""The ClientApp side of fedcodec in any Flower app: :func:`codec_mod`.

Add it to the ClientApp's mods and wrap the ServerApp's strategy in
:class:`~fedcodec.flower.strategy.CompressedStrategy`; the app's own ``@app.train()`` and
``@app.evaluate()`` functions stay as they are. The server chooses the codec and sends it with every
message (:mod:`fedcodec.flower.protocol`), so the mod takes no arguments.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from ..codecs import CodecContext, ModelSpec, Update, Uplink
from ..errors import ConfigError, PayloadError
from ..fl import rng as rngs
from ..fl.downlink import Downlink
from .protocol import (PAYLOAD, RECORD, VERSION, CodecChoice, Layout, downlink_codec, float_tensors, model_record,
                       others, rebuild, spec_of, uplink_for_flower, changes_training)

log = logging.getLogger("fedcodec.flower.mod")

#: keys of the node's ``context.state`` the mod keeps (they never leave the node): error-feedback
#: memory, the node's copy of the model under a delta downlink, and the update
#: :func:`~fedcodec.flower.training.compressed_training` leaves for the mod to send
EF_STATE, DOWNLINK_STATE, PENDING = "fedcodec.ef", "fedcodec.downlink", "fedcodec.pending"


class Incoming:
    """A server's fedcodec record, checked: :class:`ConfigError` for anything missing or malformed."""

    def __init__(self, record: ConfigRecord, node: int):
        self.record = record
        if self._field("version", int) != VERSION:
            raise ConfigError(f"fedcodec message format {record.get('version')}, this node speaks {VERSION}: "
                              "install the same fedcodec version on the server and the nodes")
        self.node = node
        self.choice = CodecChoice.from_message(self._field("codec", str), self._field("options", str))
        self.round, self.seed = self._field("round", int), self._field("seed", int)
        if self.round < 0 or not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f"round {self.round} or seed {self.seed} out of range")
        self.arrays_key = self._field("arrays-key", str)
        name = self._field("downlink", str)
        self.downlink = CodecChoice.from_message(name, self._field("downlink-opts", str)) if name else None
        self.delta = self._field("downlink-delta", bool)

    def _field(self, name: str, kind: type):
        value = self.record.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"the fedcodec record's {name!r} is missing or not a {kind.__name__}")
        return value

    def uplink(self) -> Uplink:
        return uplink_for_flower(self.choice.codec, dict(self.choice.options))

    def context(self, spec: ModelSpec, reference: Update, state: dict | None, purpose: int) -> CodecContext:
        """The codec context of this node-round: the seed the server expects back, and a generator
        for ``purpose`` (:mod:`fedcodec.fl.rng`) derived from it."""
        return CodecContext(spec, client=self.node, round=self.round, seed=self.seed,
                            rng=rngs.torch_generator(rngs.derive_seed(self.seed, purpose)),
                            reference=reference, state=state, metrics={})


def incoming(msg: Message, node: int) -> Incoming | None:
    """The fedcodec record of ``msg``, checked; None when it has none (the server does not use fedcodec)."""
    record = msg.content.config_records.get(RECORD) if msg.has_content() else None
    return None if record is None else Incoming(record, node)


def load_state(context: Context, key: str) -> dict[str, torch.Tensor]:
    record = context.state.get(key)
    return record.to_torch_state_dict() if isinstance(record, ArrayRecord) else {}


def keep_state(context: Context, key: str, store: dict[str, torch.Tensor]) -> None:
    if store:
        context.state[key] = ArrayRecord(torch_state_dict={k: v.detach().contiguous() for k, v in store.items()})
    elif key in context.state:
        del context.state[key]


def _fail(msg: Message, reason: str) -> Message:
    log.error("codec_mod: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"fedcodec: {reason}"), reply_to=msg)


def received_model(msg: Message, setup: Incoming, context: Context) -> tuple[ArrayRecord, ModelSpec]:
    """The model the server sent and its spec. A compressed broadcast is decoded (updating the node's
    copy under a delta downlink) and its full ArrayRecord put back into ``msg``. Raises
    :class:`PayloadError` for a broadcast this node cannot take in (its copy stays as it was) and
    :class:`ConfigError` for a malformed message."""
    content = msg.content
    rest = content.array_records.get(setup.arrays_key)
    if setup.downlink is None:
        if rest is None:
            raise ConfigError(f"no ArrayRecord {setup.arrays_key!r} in the message")
        return rest, spec_of(rest)
    layout = Layout.parse(setup.record.get("layout"))
    payload = setup.record.get("model")
    if not isinstance(payload, bytes):
        raise ConfigError("a compressed broadcast without its 'model' bytes")
    rest = ArrayRecord() if rest is None else rest
    wanted = {name: (dt, shape) for name, dt, shape in layout.arrays if dt.kind != "f"}
    got = {name: (a.dtype, tuple(a.shape)) for name, a in rest.items()}
    if got != {name: (str(dt), shape) for name, (dt, shape) in wanted.items()}:
        raise ConfigError(f"the broadcast's plain arrays {sorted(got)} do not match its layout {sorted(wanted)}")
    spec = layout.spec
    store = load_state(context, DOWNLINK_STATE) if setup.delta else None
    zeros = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    down = Downlink(downlink_codec(setup.downlink), setup.delta, spec, 0, zeros)
    floats = down.receive(payload, setup.round, setup.node, store)
    if setup.delta:
        keep_state(context, DOWNLINK_STATE, store)
    arrays = rebuild([(name, dt.str) for name, dt, _ in layout.arrays], floats, rest)
    content[setup.arrays_key] = arrays
    return arrays, spec


def _update(uplink: Uplink, spec: ModelSpec, reference: Update, trained: Update, pending: Update) -> Update:
    """What the codec encodes: the trained values for a lossless codec (exact by construction),
    else the change from the received model, with a parametrization's update where
    :func:`~fedcodec.flower.training.compressed_training` left one."""
    if uplink.codec.lossless:
        return trained
    update = {t.name: trained[t.name] - reference[t.name] for t in spec.tensors}
    update.update(pending)
    return update


def codec_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Send the ClientApp's trained model as a fedcodec codec's bytes, and take in a compressed broadcast.

    A Flower mod for ``ClientApp(mods=[codec_mod])``, the node's half of
    :class:`~fedcodec.flower.strategy.CompressedStrategy`, which chooses the codec and sends it with
    each message. Messages without fedcodec's record pass through untouched.

    On the way in (``train`` and ``evaluate``), a compressed broadcast is decoded into the ArrayRecord
    the app expects. On the way out (``train``), the reply's single ArrayRecord is replaced by the
    codec's payload of the *update* (the reply's float arrays minus the ones received; the values
    themselves for a lossless codec); non-float arrays (``num_batches_tracked``) travel as they are,
    and every other record (the MetricRecord) is untouched. Error-feedback memory and the node's copy
    of the model under a delta downlink live in ``context.state``.

    Parameters
    ----------
    msg : Message
        The message from the ServerApp.
    context : Context
        The ClientApp's context; its ``state`` keeps the codec's memory between rounds.
    call_next : ClientAppCallable
        The next mod, or the ClientApp's function.

    Returns
    -------
    Message
        The ClientApp's reply with the compressed update, or an error reply (its reason starting
        with ``"fedcodec:"``) when the message or the reply cannot be handled: an unknown codec, a
        broadcast out of sync with the node's copy, a reply without exactly one ArrayRecord or whose
        arrays differ from the model received.

    Examples
    --------
    ::

        from fedcodec.flower import codec_mod

        app = ClientApp(mods=[codec_mod])
    """
    try:
        setup = incoming(msg, context.node_id)
        if setup is None:
            return call_next(msg, context)
        received, spec = received_model(msg, setup, context)
        if not msg.metadata.message_type.startswith("train"):
            return call_next(msg, context)
        uplink = setup.uplink()
    except (ConfigError, PayloadError) as err:
        return _fail(msg, str(err))
    reference = float_tensors(received, spec)
    if PENDING in context.state:
        del context.state[PENDING]
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    pending = load_state(context, PENDING)
    keep_state(context, PENDING, {})
    found = model_record(reply.content)
    if found is None:
        return _fail(msg, "the ClientApp's reply must hold exactly one ArrayRecord (the trained model)")
    key, arrays = found
    if RECORD in reply.content:
        return _fail(msg, f"the ClientApp's reply already holds a record named {RECORD!r}")
    if spec_of(arrays) != spec or set(others(arrays).keys()) != set(others(received).keys()):
        return _fail(msg, "the reply's arrays (names, shapes or dtypes) differ from the model received")
    if changes_training(uplink) and not pending:
        return _fail(msg, f"codec {setup.choice.codec!r} changes local training: run the training loop inside "
                          "`with fedcodec.flower.compressed_training(model, msg, context):`")
    update = _update(uplink, spec, reference, float_tensors(arrays, spec), pending)
    store = load_state(context, EF_STATE) if uplink.error_feedback else None
    try:
        payload = uplink.encode(update, setup.context(spec, reference, store, rngs.CLIENT_CODEC))
    except (ConfigError, PayloadError) as err:
        return _fail(msg, str(err))
    if store is not None:
        keep_state(context, EF_STATE, store)
    del reply.content[key]
    rest = others(arrays)
    if len(rest):
        reply.content[key] = rest
    reply.content[RECORD] = ConfigRecord({PAYLOAD: payload, "arrays-key": key})
    return reply
