"""A new update codec in one file: ``ternary`` sends every kernel value as -s, 0 or +s.

This is all a codec is in fedcodec: a wire format (``encode_body`` / ``decode_body``). Error feedback,
the entropy stage, the ledger, Flower and the round loop come with it. Use it with::

    fedcodec run --set plugins=ternary_codec --method ternary-ef-ec       # this folder on PYTHONPATH
    flwr run flower_app CONN --run-config 'plugins="ternary_codec" method="ternary-ef-ec"'

Body (after the envelope every payload has): the kernels' scale ``s`` (float32, half their largest
magnitude), then one symbol section of alphabet 3 holding ``round(x / s)`` clipped to {-1, 0, 1},
plus one, per kernel value; then the biases and BatchNorm values as float32 (``KernelCodec`` writes
and reads those, the same side information as every fedcodec codec). With ``entropy=true`` the
symbols are range coded, which pays because most of an update rounds to 0.
"""

from __future__ import annotations

import numpy as np

from fedcodec.codecs import register
from fedcodec.codecs.base import KernelCodec
from fedcodec.config import METHODS, Method
from fedcodec.errors import PayloadError


@register("ternary", "three levels per kernel value, one scale (example plugin: examples/ternary_codec.py)")
class TernaryCodec(KernelCodec):
    codec_id = "ternary"
    symbolic = True

    def encode_kernels(self, flat, update, ctx, writer):
        s = np.float32(np.abs(flat).max() / 2) if flat.size else np.float32(0)
        q = np.clip(np.rint(flat / s), -1, 1) + 1 if s > 0 else np.ones(flat.size)
        writer.f32(s).symbols(q.astype(np.uint8), 3)

    def decode_kernels(self, reader, kernels, ctx):
        s = np.float32(reader.f32("scale"))
        if not (np.isfinite(s) and s >= 0):
            raise PayloadError("field", f"scale {s} is not a finite non-negative number")
        n = sum(t.numel for t in kernels)
        return (reader.symbols(n, 3, "levels").astype(np.float32) - 1) * s


METHODS["ternary-ef-ec"] = Method("ternary", {"ef": True, "entropy": True}, 0.03,
                                  "example plugin: ternary codec + error feedback + range coding")
