"""Dense codecs that send every value: float32 (FedAvg's uplink, the default downlink) and float16.

Body: the values of every tensor of the model spec, in spec order, little-endian; 4 (fp32) or 2
(fp16) bytes per value. fp16 rounds to nearest-even and saturates nothing: a value beyond the
float16 range (65504) is an error at the sender, not an Inf on the wire.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..errors import ConfigError
from .base import Codec, CodecContext, Update
from .registry import register
from .wire import BodyReader


@register("fp32", "dense float32, lossless (FedAvg)")
class Float32Codec(Codec):
    codec_id = "fp32"
    lossless = True
    carries_models = True

    def encode_body(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        flat = ctx.spec.flatten(update, list(ctx.spec.tensors))
        return flat.astype("<f4", copy=False).tobytes()

    def decode_body(self, reader: BodyReader, ctx: CodecContext) -> Update:
        specs = list(ctx.spec.tensors)
        flat = reader.array("<f4", ctx.spec.numel(), "float32 values")
        return ctx.spec.unflatten(flat, specs)


@register("fp16", "dense float16 (half the bytes of fp32; relative error <= 2^-11)")
class Float16Codec(Codec):
    codec_id = "fp16"
    carries_models = True

    def encode_body(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        flat = ctx.spec.flatten(update, list(ctx.spec.tensors))
        half = flat.astype("<f2")
        if not np.isfinite(half).all() and np.isfinite(flat).all():
            raise ConfigError(f"a value of magnitude {float(np.abs(flat).max()):.4g} does not fit float16 "
                              "(max 65504); use fp32 for this model")
        return half.tobytes()

    def decode_body(self, reader: BodyReader, ctx: CodecContext) -> Update:
        flat = reader.array("<f2", ctx.spec.numel(), "float16 values").astype(np.float32)
        return ctx.spec.unflatten(flat, list(ctx.spec.tensors))
