"""One typed error hierarchy for everything fedcodec rejects.

Every error says what was wrong and, where it can, how to fix it. Payload errors also name the
client that sent the bytes, so a server log line is enough to find the culprit.
"""

from __future__ import annotations


class FedcodecError(Exception):
    """Base class of every error fedcodec raises on purpose."""


class ConfigError(FedcodecError, ValueError):
    """A configuration value is unknown, out of range or inconsistent."""


class DatasetError(FedcodecError):
    """A dataset is missing, incomplete or corrupt. The message says how to obtain it."""


class PayloadError(FedcodecError, ValueError):
    """A payload could not be decoded: bad magic, version, codec id, sizes, checksum or values.

    ``client`` names the sender when known (the engine fills it in), ``reason`` is a short
    machine-readable tag (``"truncated"``, ``"checksum"``, ``"size"``, ...).
    """

    def __init__(self, reason: str, detail: str, client: int | str | None = None):
        self.reason = reason
        self.detail = detail
        self.client = client
        super().__init__(self._message())

    def _message(self) -> str:
        who = f"client {self.client}: " if self.client is not None else ""
        return f"{who}rejected payload ({self.reason}): {self.detail}"

    def __reduce__(self):  # crosses process boundaries (compare --jobs) intact
        return type(self), (self.reason, self.detail, self.client)

    def for_client(self, client: int | str) -> "PayloadError":
        """Return the same error, attributed to ``client``."""
        err = type(self)(self.reason, self.detail, client)
        err.__cause__ = self.__cause__
        return err


class CodecFileError(PayloadError):
    """A learned-compression file (``.fcn``) cannot be decoded with this codec: corrupt, truncated,
    declaring sizes beyond the documented limits, or made with another model (``reason`` says which)."""


class CodecModelError(ConfigError):
    """A learned codec's saved model (``codec.safetensors``) is unreadable, damaged or not one."""


class ResultsFileError(ConfigError):
    """A run's results file (``metrics.json``) is unreadable, too large, or not one fedcodec wrote."""


class CheckpointError(ConfigError):
    """A run checkpoint is unreadable, damaged, or does not belong to this run's model."""
