"""Reading files from outside with a size bound decided before anything is parsed."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


def read_bounded(path: str | Path, limit: int, what: str = "") -> bytes:
    """At most ``limit + 1`` bytes of ``path`` (one more than allowed, so the caller can tell a
    file that is too large, and say so with its own error). A missing or unreadable file is a
    :class:`ConfigError` (``what`` names the file's role: "config file")."""
    label = f"{what} {path}".strip()
    try:
        with Path(path).open("rb") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"{label} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{label} is a directory, not a file") from None
    except OSError as err:
        raise ConfigError(f"{label} cannot be read ({err.strerror or err})") from None
