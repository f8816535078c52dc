"""What :class:`~fedcodec.flower.strategy.CompressedStrategy` and :func:`~fedcodec.flower.mod.codec_mod`
agree on: the codec record in a message, the model spec of an ArrayRecord, and the codecs a stock
Flower strategy can aggregate.

Server → node (``train`` and ``evaluate`` messages): the wrapped strategy's RecordDict, plus a
``ConfigRecord`` named :data:`RECORD` (``"fedcodec"``):

=================  =======  ==================================================================
key                type     meaning
=================  =======  ==================================================================
``version``        int      :data:`VERSION`; a node refuses any other
``codec``          str      the uplink codec (``fedcodec codecs`` lists them)
``options``        str      its options as a JSON object (``{"levels": 16, "ef": true}``)
``round``          int      the server round
``seed``           int      this node's codec seed for the round (63 bits; FedMRN's noise)
``arrays-key``     str      the key of the model's ArrayRecord in the message and in the reply
``downlink``       str      the downlink codec, ``""`` when the model travels as Flower arrays
``downlink-opts``  str      the downlink codec's options as a JSON object
``downlink-delta`` bool     the broadcast is the change of the node's copy (17-byte header)
``model``          bytes    (compressed downlink only) the broadcast of the float arrays
``layout``         str      (compressed downlink only) JSON ``[[name, dtype, [dims...]], ...]`` of
                            every array of the model's ArrayRecord, in order, so the node can
                            rebuild it (:data:`MAX_LAYOUT` characters at most)
=================  =======  ==================================================================

With a compressed downlink, the ArrayRecord under ``arrays-key`` keeps only the arrays that are not
floating point (``num_batches_tracked``), or is left out when there are none; the mod decodes
``model`` and puts the full ArrayRecord back before the ClientApp sees the message.

Node → server (``train`` replies): the ClientApp's own RecordDict, its ArrayRecord replaced by a
``ConfigRecord "fedcodec" {"payload": bytes}`` (the codec's payload of the float arrays) and an
ArrayRecord with the non-float arrays only (their values, as is; left out when there are none).
Every other record (the MetricRecord with ``num-examples``) passes untouched.

The float arrays of an ArrayRecord make the :class:`~fedcodec.codecs.ModelSpec` both ends derive
from the broadcast (:func:`spec_of`): an array of two or more dimensions is a kernel (``weight``:
what lossy codecs compress), a name ending in ``running_mean`` or ``running_var`` is a BatchNorm
statistic (``buffer``), any other float array a ``param`` (sent as float32 by every codec).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ..codecs import ModelSpec, TensorSpec, Update, Uplink, build_codec, build_uplink
from ..codecs.algorithms import Algorithm
from ..errors import ConfigError

RECORD = "fedcodec"
VERSION = 1
#: a compressed reply's single field
PAYLOAD = "payload"
#: the codec options a message may carry, as JSON (bounded: a node parses what the server sent)
MAX_OPTIONS_JSON = 4096
#: bounds on a broadcast's layout: characters of JSON, arrays, dimensions per array, values in all
MAX_LAYOUT, MAX_ARRAYS, MAX_DIMS, MAX_VALUES = 1 << 20, 10_000, 8, 1 << 31
_BUFFERS = ("running_mean", "running_var")


def is_float(array: Array) -> bool:
    """Whether ``array`` holds float16, float32 or float64 values (what a codec carries)."""
    try:
        return np.dtype(array.dtype).kind == "f"
    except TypeError:  # a dtype numpy does not know (bfloat16)
        return False


def spec_of(arrays: ArrayRecord) -> ModelSpec:
    """The model spec of ``arrays``' floating-point arrays, in the record's order (module docstring)."""
    specs = []
    for name, array in arrays.items():
        if not is_float(array):
            continue
        shape = tuple(int(d) for d in array.shape)
        specs.append(TensorSpec(name, shape, _role(name, shape)))
    return ModelSpec(tuple(specs))


def float_tensors(arrays: ArrayRecord, spec: ModelSpec) -> Update:
    """The float arrays of ``arrays`` named in ``spec``, as float32 torch tensors."""
    return {t.name: torch.from_numpy(np.ascontiguousarray(arrays[t.name].numpy(), dtype=np.float32)).reshape(t.shape)
            for t in spec.tensors}


def others(arrays: ArrayRecord) -> ArrayRecord:
    """The arrays of ``arrays`` that are not floating point (travelling as Flower arrays)."""
    return ArrayRecord({name: a for name, a in arrays.items() if not is_float(a)})


def rebuild(entries: list[tuple[str, str]], floats: Update, rest: ArrayRecord) -> ArrayRecord:
    """An ArrayRecord of ``entries`` (``(name, dtype)`` in order): the arrays named in ``floats``
    from those float32 tensors, cast to their dtype; every other one taken from ``rest``."""
    out = {}
    for name, dtype in entries:
        if name in floats:
            out[name] = Array(floats[name].detach().numpy().astype(np.dtype(dtype), copy=False))
        else:
            out[name] = rest[name]
    return ArrayRecord(out)


def entries_of(arrays: ArrayRecord) -> list[tuple[str, str]]:
    return [(name, str(a.dtype)) for name, a in arrays.items()]


def array_bytes(arrays: ArrayRecord | None) -> int:
    """What Flower puts on the wire for ``arrays``' values: the serialized bytes of each Array."""
    return 0 if arrays is None else sum(len(a.data) for a in arrays.values())


def model_record(content: RecordDict) -> tuple[str, ArrayRecord] | None:
    """(key, record) of the single ArrayRecord in ``content``; None if there is not exactly one."""
    records = list(content.array_records.items())
    return records[0] if len(records) == 1 else None


@dataclass(frozen=True)
class CodecChoice:
    """A codec and its options as a strategy wrapper sends them (and a node checks them)."""

    codec: str
    options: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(self.options, sort_keys=True)

    @classmethod
    def from_message(cls, name: Any, options: Any) -> "CodecChoice":
        """Parse what a message says; :class:`ConfigError` for anything malformed."""
        if not isinstance(name, str) or not isinstance(options, str):
            raise ConfigError("the fedcodec record's codec and options must be strings")
        if len(options) > MAX_OPTIONS_JSON:
            raise ConfigError(f"codec options of {len(options)} characters (at most {MAX_OPTIONS_JSON})")
        try:
            parsed = json.loads(options)
        except ValueError as err:
            raise ConfigError(f"codec options are not JSON: {err}") from None
        if not isinstance(parsed, dict) or not all(
                isinstance(v, (bool, int, float, str)) and not (isinstance(v, float) and not math.isfinite(v))
                for v in parsed.values()):
            raise ConfigError("codec options must be a JSON object of booleans, numbers and strings")
        return cls(name, parsed)


def uplink_for_flower(codec: str, options: dict[str, Any]) -> Uplink:
    """The uplink of ``codec`` with ``options``, checked to fit a stock Flower strategy: the server
    step must be the (weighted) mean of what clients send, which every codec gives except those
    whose algorithm aggregates by its own rule (signSGD's ``vote``, FedPM's Beta posterior) or that
    learn a decoder first (``ae``)."""
    uplink = build_uplink(codec, **options)
    algorithm = uplink.algorithm
    if uplink.setup is not None:
        raise ConfigError(f"codec {codec!r} learns a decoder before it codes (a setup exchange a stock Flower "
                          "strategy does not make); run it with `fedcodec flower` instead")
    if not algorithm.additive_step or type(algorithm).init_global is not Algorithm.init_global:
        raise ConfigError(f"codec {codec!r} builds the global model by its own rule (FedPM: a Beta posterior over "
                          "mask probabilities), which a stock Flower strategy cannot aggregate; run it with "
                          "`fedcodec flower` instead")
    if getattr(uplink.codec.options, "learned", 0):
        raise ConfigError(f"codec {codec!r} with learned rows derives them from the run's initial model, which a "
                          "stock Flower app does not share with fedcodec; use learned=0 here, or `fedcodec flower`")
    probe = ModelSpec((TensorSpec("w", (2, 2), "weight"),))
    if algorithm.own_aggregate(probe):
        raise ConfigError(f"codec {codec!r} with these options aggregates by its own rule (majority vote), which "
                          "a stock Flower strategy does not do; drop vote=true")
    return uplink


def changes_training(uplink: Uplink) -> bool:
    """Whether ``uplink``'s algorithm trains something other than the weights (FedMRN's masks,
    FedBAT's binarization): the node must train through :func:`~fedcodec.flower.training.compressed_training`."""
    return type(uplink.algorithm).parametrization is not Algorithm.parametrization


def downlink_codec(choice: CodecChoice):
    """The downlink codec ``choice`` names."""
    return build_codec(choice.codec, **choice.options)


def layout_of(arrays: ArrayRecord) -> str:
    """The JSON layout of ``arrays`` (name, dtype and shape of each array, in order)."""
    return json.dumps([[name, str(a.dtype), [int(d) for d in a.shape]] for name, a in arrays.items()],
                      separators=(",", ":"))


@dataclass(frozen=True)
class Layout:
    """A parsed layout: ``(name, dtype, shape)`` per array, and the float arrays' model spec."""

    arrays: tuple[tuple[str, np.dtype, tuple[int, ...]], ...]
    spec: ModelSpec

    @classmethod
    def parse(cls, text: Any) -> "Layout":
        """Check and parse what a server sent; :class:`ConfigError` for anything malformed or too large."""
        if not isinstance(text, str) or len(text) > MAX_LAYOUT:
            raise ConfigError(f"a broadcast layout must be a JSON string of at most {MAX_LAYOUT} characters")
        try:
            items = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"the broadcast layout is not JSON: {err}") from None
        if not isinstance(items, list) or len(items) > MAX_ARRAYS:
            raise ConfigError(f"the broadcast layout must list at most {MAX_ARRAYS} arrays")
        arrays, specs, names, total = [], [], set(), 0
        for item in items:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], str)
                    and isinstance(item[2], list) and len(item[2]) <= MAX_DIMS
                    and all(isinstance(d, int) and not isinstance(d, bool) for d in item[2])):
                raise ConfigError(f"malformed layout entry {str(item)[:80]!r}: expected [name, dtype, [dims...]] "
                                  f"with at most {MAX_DIMS} integer dimensions")
            if not all(0 <= d < MAX_VALUES for d in item[2]):
                raise ConfigError(f"layout entry {item[0][:60]!r}: a dimension out of range (0 to {MAX_VALUES - 1}; "
                                  "at most this many values in all)")
            name, dtype, shape = item[0], item[1], tuple(item[2])
            try:
                dt = np.dtype(dtype)
            except TypeError:
                raise ConfigError(f"layout entry {name!r}: unknown dtype {dtype[:40]!r}") from None
            if name in names:
                raise ConfigError(f"layout names array {name!r} twice")
            names.add(name)
            total += int(np.prod(shape, dtype=np.int64)) if shape else 1
            if total > MAX_VALUES:
                raise ConfigError(f"the broadcast layout holds more than {MAX_VALUES} values")
            arrays.append((name, dt, shape))
            if dt.kind == "f":
                specs.append(TensorSpec(name, shape, _role(name, shape)))
        return cls(tuple(arrays), ModelSpec(tuple(specs)))


def _role(name: str, shape: tuple[int, ...]) -> str:
    return "buffer" if name.rsplit(".", 1)[-1] in _BUFFERS else "weight" if len(shape) >= 2 else "param"


def config_record(choice: CodecChoice, round_num: int, seed: int, arrays_key: str, downlink: CodecChoice | None,
                  delta: bool, model: bytes | None, layout: str | None) -> ConfigRecord:
    fields: dict[str, Any] = {"version": VERSION, "codec": choice.codec, "options": choice.to_json(),
                              "round": int(round_num), "seed": int(seed), "arrays-key": arrays_key,
                              "downlink": downlink.codec if downlink else "",
                              "downlink-opts": downlink.to_json() if downlink else "{}", "downlink-delta": bool(delta)}
    if model is not None:
        fields["model"] = model
        fields["layout"] = layout
    return ConfigRecord(fields)
