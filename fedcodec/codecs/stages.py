"""The uplink bundle and the stages that compose with any codec.

* :class:`ErrorFeedback` (``ef=true``): a memory the uplink keeps around a lossy codec. The client
  adds the error its codec made last time to this round's update before encoding, and keeps the new
  error (what the server will *not* see) for next time: ``c = u + e;  payload = encode(c);
  e = c - decode(payload)``. The residual is computed from the very bytes sent, so it is exact. It
  lives in the client's own state (``ctx.state``, keys ``ef/<tensor>``) and never travels. It wraps
  no codec: it calls the codec's own ``encode`` and ``decode``, so no codec hook can be bypassed.
* Entropy coding (``entropy=true``) is no wrapper either: the codec is *built* with it
  (``Codec(options, entropy=True)``), and every symbol section it writes goes through
  :mod:`fedcodec.codecs.symbols`, which either bit-packs or range-codes it.
* :class:`Uplink` is what the engine holds for the client → server direction: the codec, the
  algorithm, the codec's setup protocol (or None) and whether error feedback is on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import ConfigError, PayloadError
from .algorithms import Algorithm
from .base import Codec, CodecContext, Update
from .setup import Setup

RESIDUAL = "ef/"
log = logging.getLogger("fedcodec.stages")


class ErrorFeedback:
    """Error-feedback memory around the lossy codec ``codec``; the payload is the codec's own."""

    def __init__(self, codec: Codec):
        if codec.lossless:
            raise ConfigError(f"codec {codec.codec_id!r} is lossless: error feedback would always carry zero; "
                              "drop ef=true")
        self.codec = codec

    def encode(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        """``codec.encode(update + memory)``, leaving the new memory in ``ctx.state``."""
        if ctx.state is None:
            raise ConfigError("error feedback needs the client's state store (CodecContext.state); "
                              "run it through fedcodec's client function")
        # trained tensors only: running statistics (BatchNorm buffers) are estimates that each round
        # replaces, not steps that add up, so carrying their error forward only adds stale error (and
        # under the AE's log-coded variances it diverged)
        names = [t.name for t in ctx.spec.tensors if t.role != "buffer"]
        compensated = dict(update)  # extra entries (a parametrization's side values) pass through
        for n in names:
            if RESIDUAL + n in ctx.state:
                compensated[n] = update[n] + ctx.state[RESIDUAL + n]
        payload = self.codec.encode(compensated, ctx)
        # the client decodes with its own store: a codec whose decoder lives there (AE) needs it
        try:
            seen = self.codec.decode(payload, CodecContext(ctx.spec, ctx.client, ctx.round, seed=ctx.seed,
                                                           reference=ctx.reference, state=ctx.state))
        except PayloadError as err:  # the server will reject it too; start the memory afresh, don't crash
            log.warning("client %s, round %d: own payload does not decode (%s); error-feedback memory reset",
                        ctx.client, ctx.round, err.detail)
            for n in names:
                ctx.state.pop(RESIDUAL + n, None)
            return payload
        for n in names:
            err = compensated[n] - seen[n]
            if torch.count_nonzero(err):
                ctx.state[RESIDUAL + n] = err.contiguous()
            else:
                ctx.state.pop(RESIDUAL + n, None)  # exact tensors (float32 side values) keep no memory
        return payload


@dataclass(frozen=True)
class Uplink:
    """The client → server side of a method: what the engine holds and calls.

    ``codec`` makes the bytes, ``algorithm`` says how clients train and how the server aggregates,
    ``setup`` runs a learning codec's pre-pass and setup messages (None for every other codec), and
    ``error_feedback`` applies :class:`ErrorFeedback` around the codec on the client.
    """

    codec: Codec
    algorithm: Algorithm
    setup: Setup | None = None
    error_feedback: bool = False

    def __post_init__(self) -> None:
        if self.error_feedback:
            ErrorFeedback(self.codec)  # refuses a lossless codec

    @property
    def codec_id(self) -> str:
        """The wire id of the payloads (what the ledger records)."""
        return self.codec.codec_id

    @property
    def stateful(self) -> bool:
        """Whether clients keep state for it between rounds (the engine must supply a store)."""
        return self.error_feedback or self.setup is not None

    def bind_initial(self, params: Mapping[str, torch.Tensor]) -> None:
        """Give the codec and its algorithm the run's initial model, which both ends build from the
        run's seed, if they define symbols against the model's history (``factor`` with learned
        rows: ``bind_initial``). The engine calls it once per process, at setup."""
        for part in (self.codec, self.algorithm):
            bind = getattr(part, "bind_initial", None)
            if bind is not None:
                bind(params)

    def encode(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        """The client's payload, through the error-feedback memory when it is on."""
        if self.error_feedback:
            return ErrorFeedback(self.codec).encode(update, ctx)
        return self.codec.encode(update, ctx)

    def decode(self, payload: bytes, ctx: CodecContext) -> Update:
        return self.codec.decode(payload, ctx)
