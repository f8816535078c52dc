"""The codec registry: a name maps to its codec class, options type, algorithm and setup protocol.

:func:`build_uplink` builds what the engine holds for the uplink (:class:`~fedcodec.codecs.stages.Uplink`)
from a name and options; :func:`build_codec` builds a plain codec (the downlink's). Options are
checked once, into the codec's typed options object; the stage options ``ef`` (error feedback,
uplink only) and ``entropy`` (range-code the symbol sections) apply to any codec they make sense for.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError
from .algorithms import Algorithm
from .base import Codec, Options, flag
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
STAGE_OPTIONS = {"ef": False, "entropy": False}


def register(name: str, summary: str, algorithm: type[Algorithm] = Algorithm, setup: type[Setup] | None = None):
    """Class decorator: make codec class ``name`` buildable by :func:`build_uplink` and :func:`build_codec`,
    with ``algorithm`` (default: FedAvg) and ``setup`` (for codecs that learn before they code)."""

    def deco(cls: type[Codec]) -> type[Codec]:
        _REGISTRY[name] = CodecInfo(cls, summary, algorithm, setup)
        return cls

    return deco


def available_codecs() -> dict[str, CodecInfo]:
    return dict(_REGISTRY)


def _parts(name: str, options: dict) -> tuple[CodecInfo, Options, bool, bool]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    info = _REGISTRY[name]
    unknown = set(options) - set(info.defaults) - set(STAGE_OPTIONS)
    if unknown:
        raise ConfigError(f"codec {name!r} has no option(s) {sorted(unknown)}; "
                          f"its options are {sorted(info.defaults) + sorted(STAGE_OPTIONS)}")
    ef = flag("ef", options.pop("ef", False))
    entropy = flag("entropy", options.pop("entropy", False))
    return info, info.options(**options), ef, entropy


def build_uplink(name: str, **options) -> Uplink:
    """The uplink of codec ``name`` with ``options`` (its own, plus ``ef`` and ``entropy``)."""
    info, opts, ef, entropy = _parts(name, dict(options))
    codec = info.codec(opts, entropy=entropy)
    return Uplink(codec, info.algorithm(opts), info.setup(codec) if info.setup else None, ef)


def build_codec(name: str, **options) -> Codec:
    """Plain codec ``name`` (``entropy`` allowed; ``ef`` is an uplink stage, see :func:`build_uplink`).
    Its algorithm and setup, if any, are not built: use it where only bytes matter (the downlink)."""
    info, opts, ef, entropy = _parts(name, dict(options))
    if ef:
        raise ConfigError(f"codec option ef (error feedback) applies to the uplink only; build {name!r} with "
                          "build_uplink, or drop ef (a delta downlink sends its error next round anyway)")
    return info.codec(opts, entropy=entropy)
