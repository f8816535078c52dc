"""Where a run computes: the ``device`` config key.

A run's models, the clients' training data and the test set live on one torch device, moved there
once when the simulation is built (:func:`fedcodec.fl.simulation.setup`). Everything else stays on the
CPU: codecs encode and decode CPU tensors (an update crosses to the CPU once before ``encode``, a
decoded model or update crosses to the device once after ``decode``), the server aggregates in float64
on the CPU, and every random choice is drawn from the CPU generators of :mod:`fedcodec.fl.rng`, then
moved. So the random streams of a client-round (its shuffling, FedMRN's noise and masks, FedPM's and
FedBAT's draws) are the same on every device; only the floating-point arithmetic of training and
evaluation differs.

What holds where:

- ``cpu``: a run is a pure function of its config, its seed and the torch thread count, bit for bit
  (the project's reproducibility promise; the tests pin it).
- ``cuda``, ``mps``: the same clients, batches and random draws, but convolutions and reductions may
  pick other kernels and summation orders, so models agree with the CPU run only to float tolerance,
  and two GPU runs agree bit for bit only where the kernels are deterministic
  (``torch.use_deterministic_algorithms`` is not switched on by fedcodec). The payloads' format and
  byte counts do not depend on the device.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

#: the values of the ``device`` config key
DEVICES = ("cpu", "cuda", "mps", "auto")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch device for config value ``name`` (one of :data:`DEVICES`, or ``cuda:N``).

    ``auto`` is the first available of CUDA, MPS and the CPU. A device this machine does not have
    raises :class:`ConfigError` saying why and how to fix it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device expects one of {', '.join(DEVICES)} (or cuda:N), got {name!r}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if torch.version.cuda is None or not torch.cuda.is_available():
            why = (f"this PyTorch ({torch.__version__}) was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            raise ConfigError(f"device {name!r} is not available: {why}; install a CUDA build of PyTorch on a "
                              "machine with an NVIDIA GPU, or run with --device cpu (or --device auto, which "
                              "uses a GPU only when there is one)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} is not available: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s), numbered from 0; choose one of them, or --device cuda")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ConfigError(f"device {name!r} is not available: MPS needs Apple silicon and a PyTorch built "
                              "with MPS; run with --device cpu (or --device auto)")
        return device
    raise ConfigError(f"device expects one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device``; on the device they are already on, the very same tensors (no copy)."""
    return {name: t.to(device) for name, t in tensors.items()}


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU (what codecs take); CPU tensors are returned as they are (no copy)."""
    return {name: t.cpu() for name, t in tensors.items()}
