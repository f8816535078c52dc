"""The setup protocol of codecs that learn before they code (the AE codec).

Such a codec cannot encode until the client has fitted it to its own training (a pre-pass), and the
server cannot decode until it holds what the client fitted (a *setup message*, e.g. the AE's
decoder). A :class:`Setup` object, built around its codec, runs that exchange; the engine calls it
through the uplink bundle and never asks the codec itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PayloadError
from .base import Codec, CodecContext, Update


@dataclass(frozen=True)
class Prepass:
    """A request to see local training before the codec can encode (the AE codec's "weights
    dataset"): the client trains ``epochs`` epochs (None: its usual local epochs) from the model it
    received, records the update ``snapshots`` times at evenly spaced steps, and hands the snapshots
    to :meth:`Setup.fit`. The pre-pass model is thrown away; the round's own training follows."""

    epochs: int | None
    snapshots: int


class Setup:
    """The client-fits, server-accepts exchange of a learning codec ``codec``."""

    def __init__(self, codec: Codec):
        self.codec = codec

    def prepass(self, ctx: CodecContext) -> Prepass | None:
        """Client side, before local training: a :class:`Prepass` if this client must (re)fit its
        codec from local training snapshots this round (first selection, refresh), else None."""
        return None

    def fit(self, snapshots: list[Update], ctx: CodecContext) -> bytes:
        """Client side: fit the codec to the pre-pass ``snapshots``, keep what the client needs in
        ``ctx.state``, and return the setup message the server needs to decode this client's
        payloads. The engine sends it uplink and counts it in the ledger."""
        raise NotImplementedError

    def accept_setup(self, message: bytes, ctx: CodecContext) -> None:
        """Server side: validate a client's setup message and keep it in ``ctx.state`` (the server's
        store for that client). Raises :class:`PayloadError`; a rejected message changes nothing."""
        raise PayloadError("setup", f"codec {self.codec.codec_id!r} takes no setup messages", ctx.client)
