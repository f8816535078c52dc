"""The codec registry: a name maps to its codec class, options type, algorithm and setup protocol.

:func:`build_uplink` builds what the engine holds for the uplink (:class:`~fedcodec.codecs.stages.Uplink`)
from a name and options; :func:`build_codec` builds a plain codec (the downlink's). Options are
checked once, into the codec's typed options object; the stage options ``ef`` (error feedback,
uplink only), ``entropy`` (range-code the symbol sections) and ``dense_levels`` (send a
:class:`~fedcodec.codecs.base.KernelCodec`'s biases and BatchNorm tensors as low-bit deltas,
:mod:`fedcodec.codecs.densequant`; wire id suffix ``+dq<levels>``) apply to any codec they make sense for.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError
from .algorithms import Algorithm
from .base import Codec, KernelCodec, Options, _typed, flag
from .setup import Setup
from .stages import Uplink


@dataclass(frozen=True)
class CodecInfo:
    codec: type[Codec]
    summary: str
    algorithm: type[Algorithm] = Algorithm
    setup: type[Setup] | None = None

    @property
    def options(self) -> type[Options]:
        return self.codec.options_type

    @property
    def defaults(self) -> dict:
        return {f.name: f.default for f in fields(self.options)}


_REGISTRY: dict[str, CodecInfo] = {}

#: options every codec accepts: the composable stages
STAGE_OPTIONS = {"ef": False, "entropy": False, "dense_levels": 0}


def register(name: str, summary: str, algorithm: type[Algorithm] = Algorithm, setup: type[Setup] | None = None):
    """Class decorator: make codec class ``name`` buildable by :func:`build_uplink` and :func:`build_codec`,
    with ``algorithm`` (default: FedAvg) and ``setup`` (for codecs that learn before they code)."""

    def deco(cls: type[Codec]) -> type[Codec]:
        _REGISTRY[name] = CodecInfo(cls, summary, algorithm, setup)
        return cls

    return deco


def available_codecs() -> dict[str, CodecInfo]:
    return dict(_REGISTRY)


def _parts(name: str, options: dict) -> tuple[CodecInfo, Options, bool, bool, int]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    info = _REGISTRY[name]
    unknown = set(options) - set(info.defaults) - set(STAGE_OPTIONS)
    if unknown:
        raise ConfigError(f"codec {name!r} has no option(s) {sorted(unknown)}; "
                          f"its options are {sorted(info.defaults) + sorted(STAGE_OPTIONS)}")
    ef = flag("ef", options.pop("ef", False))
    entropy = flag("entropy", options.pop("entropy", False))
    # a codec with its own dense_levels option (factor) keeps it; for the others it is the stage
    dense = 0 if "dense_levels" in info.defaults else _typed("dense_levels", "int", options.pop("dense_levels", 0))
    return info, info.options(**options), ef, entropy, dense


def _make(info: CodecInfo, opts: Options, entropy: bool, dense: int) -> Codec:
    codec = info.codec(opts, entropy=entropy)
    if dense:
        if not isinstance(codec, KernelCodec):
            raise ConfigError(f"codec {codec.codec_id!r} sends no float32 dense values of its own (only the "
                              "kernel codecs do), so dense_levels does not apply; drop it")
        if not 1 <= dense <= 255:
            raise ConfigError(f"dense_levels must be 0 (float32) or an integer in 1..255, got {dense!r}")
        codec.dense_levels = dense
        codec.codec_id = f"{codec.codec_id}+dq{dense}"  # the other end must be built the same way
    return codec


def build_uplink(name: str, **options) -> Uplink:
    """The uplink of codec ``name`` with ``options`` (its own, plus ``ef``, ``entropy`` and ``dense_levels``)."""
    info, opts, ef, entropy, dense = _parts(name, dict(options))
    codec = _make(info, opts, entropy, dense)
    return Uplink(codec, info.algorithm(opts), info.setup(codec) if info.setup else None, ef)


def build_codec(name: str, **options) -> Codec:
    """Plain codec ``name`` (``entropy`` allowed; ``ef`` is an uplink stage, see :func:`build_uplink`).
    Its algorithm and setup, if any, are not built: use it where only bytes matter (the downlink)."""
    info, opts, ef, entropy, dense = _parts(name, dict(options))
    if ef:
        raise ConfigError(f"codec option ef (error feedback) applies to the uplink only; build {name!r} with "
                          "build_uplink, or drop ef (a delta downlink sends its error next round anyway)")
    return _make(info, opts, entropy, dense)
