"""Standard image codecs (JPEG, WebP through Pillow) as rate-distortion baselines.

Rates are the sizes of the real encoded files; distortion is measured in the same [0, 1] pixel scale
the learned codecs use, against the 8-bit original the standard codec actually saw.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, features

from fedcodec.errors import ConfigError

#: Quality sweeps that span roughly 0.1 to 3 bits per pixel on natural photos.
DEFAULT_QUALITIES: dict[str, list[int]] = {
    "jpeg": [5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95],
    "webp": [5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95],
}


def _check_format(fmt: str) -> None:
    """Raise ConfigError for an unknown format or a Pillow build without the needed encoder."""
    if fmt not in DEFAULT_QUALITIES:
        raise ConfigError(f"unknown image format {fmt!r}; choose one of {sorted(DEFAULT_QUALITIES)}")
    if fmt == "webp" and not features.check("webp"):
        raise ConfigError("this Pillow build has no WebP support; reinstall it from the official wheels "
                          "(`pip install --force-reinstall pillow`) or use fmt='jpeg'")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round an HxWx3 float image in [0, 1] to uint8 (values outside [0, 1] are clipped)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"expected an HxWx3 image, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ConfigError("image contains NaN or infinite values; fix the input before encoding")
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    """Encode a uint8 HxWx3 image to the bytes of a real JPEG or lossy WebP file."""
    _check_format(fmt)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ConfigError(f"encode expects a uint8 HxWx3 array, got {pixels.dtype} {pixels.shape}; use to_uint8()")
    buf = io.BytesIO()
    im = Image.fromarray(pixels)
    if fmt == "jpeg":
        im.save(buf, format="JPEG", quality=quality, subsampling="4:2:0", optimize=True)
    else:
        im.save(buf, format="WEBP", quality=quality, method=6, lossless=False)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Decode image file bytes to a uint8 HxWx3 array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def codec_curve(images: list[np.ndarray], fmt: str, qualities: list[int]) -> list[dict]:
    """Rate-distortion points of ``fmt`` over ``images``, one dict per quality.

    Each dict holds ``quality``, ``bytes`` (total encoded size), ``bpp`` (8 * bytes / total pixels),
    ``mse`` (pooled over every value of every image, [0, 1] scale) and ``psnr`` (10 log10(1 / mse)).
    """
    _check_format(fmt)
    if not images:
        raise ConfigError("codec_curve needs at least one image")
    bad = [q for q in qualities if not (isinstance(q, (int, np.integer)) and 1 <= q <= 100)]
    if not qualities or bad:
        raise ConfigError(f"qualities must be a non-empty list of integers in 1..100, got {qualities}")
    originals = [to_uint8(im) for im in images]
    pixels = sum(o.shape[0] * o.shape[1] for o in originals)
    values = sum(o.size for o in originals)
    points = []
    for q in qualities:
        total_bytes, sq_err = 0, 0.0
        for orig in originals:
            data = encode(orig, fmt, q)
            diff = (decode(data).astype(np.float64) - orig.astype(np.float64)) / 255.0
            total_bytes += len(data)
            sq_err += float(np.sum(diff * diff))
        mse = sq_err / values
        psnr = 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf
        points.append({"quality": int(q), "bytes": total_bytes, "bpp": 8.0 * total_bytes / pixels,
                       "mse": mse, "psnr": psnr})
    return points
