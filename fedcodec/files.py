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


def npy_header(path: Path) -> tuple[tuple[int, ...], "numpy.dtype", int]:
    """``(shape, dtype, data bytes in the file)`` of a ``.npy`` file, read from its header alone (no
    array is allocated); a file that is not a ``.npy`` of format 1.0 or 2.0 raises :class:`ConfigError`
    naming ``path``. Callers check the declared size against ``data bytes`` and their own bounds."""
    from numpy.lib import format as npy

    try:
        with path.open("rb") as f:
            try:
                version = npy.read_magic(f)
            except ValueError:
                raise ConfigError(f"{path} is not a .npy file (no .npy magic string); write it with "
                                  "np.save(path, x)") from None
            if version not in ((1, 0), (2, 0)):
                raise ConfigError(f"{path}: .npy format version {version} is not supported (1.0 or 2.0); "
                                  "write it with np.save(path, x)")
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read(f)
            return shape, dtype, path.stat().st_size - f.tell()
    except (ValueError, OSError, EOFError) as err:
        raise ConfigError(f"{path} is not a readable .npy file: {err}") from None
