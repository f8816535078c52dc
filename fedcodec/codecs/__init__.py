"""Update codecs. Importing this package registers every built-in codec."""

from . import autoencoder, dense, fedbat, fedmrn, fedpm, qsgd, signsgd, topk  # noqa: F401  (registration)
from .base import (Codec, CodecContext, ModelSpec, Parametrization, Prepass, TensorSpec, Update, available_codecs,
                   build_codec, register)

__all__ = ["Codec", "CodecContext", "ModelSpec", "Parametrization", "Prepass", "TensorSpec", "Update",
           "available_codecs", "build_codec", "register"]
