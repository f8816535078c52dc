"""Update codecs. Importing this package registers every built-in codec."""

from . import autoencoder, dense, factor, fedbat, fedmrn, fedpm, qsgd, signsgd, topk  # noqa: F401  (registration)
from .algorithms import Algorithm, FedAvg, Parametrization
from .base import Codec, CodecContext, KernelCodec, ModelSpec, Options, TensorSpec, Update
from .registry import available_codecs, build_codec, build_uplink, register
from .setup import Prepass, Setup
from .stages import ErrorFeedback, Uplink

__all__ = ["Algorithm", "Codec", "CodecContext", "ErrorFeedback", "FedAvg", "KernelCodec", "ModelSpec", "Options",
           "Parametrization", "Prepass", "Setup", "TensorSpec", "Update", "Uplink", "available_codecs",
           "build_codec", "build_uplink", "register"]
