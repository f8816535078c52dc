"""Uncompressed float32: FedAvg's uplink and the default downlink. 4 bytes per value."""

from __future__ import annotations

from typing import Mapping

import torch

from .base import Codec, CodecContext, Update, register
from .wire import BodyReader


@register("fp32", "dense float32, lossless (FedAvg)")
class Float32Codec(Codec):
    codec_id = "fp32"
    lossless = True

    def encode_body(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        flat = ctx.spec.flatten(update, list(ctx.spec.tensors))
        return flat.astype("<f4", copy=False).tobytes()

    def decode_body(self, reader: BodyReader, ctx: CodecContext) -> Update:
        specs = list(ctx.spec.tensors)
        flat = reader.array("<f4", ctx.spec.numel(), "float32 values")
        return ctx.spec.unflatten(flat, specs)
