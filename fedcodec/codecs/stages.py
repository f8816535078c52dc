"""Composable stages that wrap any codec.

* :class:`ErrorFeedback` (``ef=true``): the client adds the error its codec made last time to this
  round's update before encoding, and keeps the new error (what the server will *not* see)
  for next time: ``c = u + e;  payload = encode(c);  e = c - decode(payload)``. The residual is
  computed from the very bytes sent, so it is exact. It lives in the client's own state
  (``ctx.state``) and never travels.
* Entropy coding (``entropy=true``) is not a wrapper: every symbol section a codec writes goes
  through :mod:`fedcodec.codecs.symbols`, which either bit-packs or range-codes it.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from ..errors import ConfigError, PayloadError
from .base import Codec, CodecContext, ModelSpec, Parametrization, Prepass, Update

RESIDUAL = "ef/"
log = logging.getLogger("fedcodec.stages")


class ErrorFeedback(Codec):
    """Error-feedback memory around a lossy codec; same wire format as the codec it wraps."""

    stateful = True

    def __init__(self, inner: Codec):
        self.inner = inner
        self.codec_id = inner.codec_id
        self.entropy = inner.entropy
        self.symbolic = inner.symbolic

    def __repr__(self) -> str:
        return f"ErrorFeedback({type(self.inner).__name__})"

    def parametrization(self, ctx: CodecContext, global_params: Update) -> Parametrization | None:
        return self.inner.parametrization(ctx, global_params)

    def init_global(self, params: Update, spec: ModelSpec) -> Update:
        return self.inner.init_global(params, spec)

    def prepass(self, ctx: CodecContext) -> Prepass | None:
        return self.inner.prepass(ctx)

    def fit(self, snapshots: list[Update], ctx: CodecContext) -> bytes:
        return self.inner.fit(snapshots, ctx)

    def accept_setup(self, message: bytes, ctx: CodecContext) -> None:
        self.inner.accept_setup(message, ctx)

    def aggregate(self, spec, global_params, updates):
        return self.inner.aggregate(spec, global_params, updates)

    def eval_params(self, params: Update, spec: ModelSpec, seed: int) -> Update:
        return self.inner.eval_params(params, spec, seed)

    def encode(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
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
        payload = self.inner.encode(compensated, ctx)
        # the client decodes with its own store: a codec whose decoder lives there (AE) needs it
        try:
            seen = self.inner.decode(payload, CodecContext(ctx.spec, ctx.client, ctx.round, reference=ctx.reference,
                                                           state=ctx.state))
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

    def decode(self, payload: bytes, ctx: CodecContext) -> Update:
        return self.inner.decode(payload, ctx)
