"""Bjøntegaard delta rate and delta PSNR between two rate-distortion curves.

Quality is PSNR in dB (higher is better). Each curve is first cut to its operational points
(:func:`operational`: a point with a higher rate and no better PSNR than another of the same curve
is dropped, as a user of the codec would never pick it), then fitted with a monotone piecewise cubic
(PCHIP) interpolant, log10(rate) as a function of PSNR for BD-rate and PSNR as a function of
log10(rate) for BD-PSNR, and the two fits are averaged over the interval where both curves have data.

For sources that are not images (e.g. model-update vectors) pass ``psnr_from_mse(mse)`` with the
default peak 1, i.e. -10 log10(MSE): quality in dB relative to unit variance. Only differences
between the curves enter the result, so the choice of peak does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcodec.errors import ConfigError


def psnr_from_mse(mse: float | np.ndarray, peak: float = 1.0) -> float | np.ndarray:
    """PSNR in dB, 10 log10(peak**2 / mse); an MSE of zero gives +inf."""
    arr = np.asarray(mse, dtype=np.float64)
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise ConfigError(f"mse must be finite and >= 0, got {mse}")
    if peak <= 0:
        raise ConfigError(f"peak must be > 0, got {peak}")
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(peak * peak / arr)
    return float(out) if out.ndim == 0 else out


def _points(rate: Sequence[float], psnr: Sequence[float], label: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (log10 rate, PSNR) arrays of one curve."""
    r = np.asarray(rate, dtype=np.float64).ravel()
    q = np.asarray(psnr, dtype=np.float64).ravel()
    if r.size != q.size:
        raise ConfigError(f"curve {label}: {r.size} rates but {q.size} PSNR values; pass one of each per point")
    if r.size < 2:
        raise ConfigError(f"curve {label} needs at least 2 points, got {r.size}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(q))):
        raise ConfigError(f"curve {label} has NaN or infinite values (e.g. a lossless point); drop them")
    if np.any(r <= 0):
        raise ConfigError(f"curve {label} has non-positive rates {r[r <= 0].tolist()}; rates must be > 0")
    return np.log10(r), q


def operational(log_rate: np.ndarray, psnr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points no other point of the same curve dominates (one with a rate at most as high and a
    PSNR at least as high, better in one of the two), in their original order. A codec trained at
    several λ can be run at any of them, so a dominated point is never the codec's best: keeping it
    would bend the fitted curve backwards (a client whose PSNR stops rising while its rate keeps
    changing gave BD-rates of several hundred percent)."""
    keep = [i for i in range(log_rate.size)
            if not np.any((log_rate <= log_rate[i]) & (psnr >= psnr[i])
                          & ((log_rate < log_rate[i]) | (psnr > psnr[i])))]
    return log_rate[keep], psnr[keep]


def _fit(x: np.ndarray, y: np.ndarray, label: str, low_y_wins: bool):
    """PCHIP interpolant of y(x); of points with equal x only the best y (lowest or highest) is kept."""
    try:
        from scipy.interpolate import PchipInterpolator
    except ImportError as exc:  # scipy is not a hard dependency of fedcodec
        raise ConfigError("BD metrics need scipy; run `pip install scipy`") from exc
    order = np.lexsort((y if low_y_wins else -y, x))
    xs, first = np.unique(x[order], return_index=True)
    if xs.size < 2:
        raise ConfigError(f"curve {label} needs at least 2 distinct points, got {xs.size}")
    return PchipInterpolator(xs, y[order][first]), float(xs[0]), float(xs[-1])


def _mean_gap(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray, axis: str,
              low_y_wins: bool) -> float:
    """Average of fit_b - fit_a over the overlap of the x ranges of both curves."""
    fa, lo_a, hi_a = _fit(xa, ya, "a", low_y_wins)
    fb, lo_b, hi_b = _fit(xb, yb, "b", low_y_wins)
    lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
    if hi <= lo:
        raise ConfigError(f"the curves do not overlap in {axis}: a spans [{lo_a:.4g}, {hi_a:.4g}], "
                          f"b spans [{lo_b:.4g}, {hi_b:.4g}]; extend the sweeps so they share a range")
    return float((fb.integrate(lo, hi) - fa.integrate(lo, hi)) / (hi - lo))


def bd_rate(rate_a: Sequence[float], dist_a: Sequence[float],
            rate_b: Sequence[float], dist_b: Sequence[float]) -> float:
    """Average rate difference (percent) of curve b against anchor a at equal PSNR.

    ``dist_*`` are PSNR values in dB (higher is better). Negative means b needs fewer bits.
    """
    la, qa = operational(*_points(rate_a, dist_a, "a"))
    lb, qb = operational(*_points(rate_b, dist_b, "b"))
    d = _mean_gap(qa, la, qb, lb, "PSNR (dB)", low_y_wins=True)
    return (10.0 ** d - 1.0) * 100.0


def bd_psnr(rate_a: Sequence[float], dist_a: Sequence[float],
            rate_b: Sequence[float], dist_b: Sequence[float]) -> float:
    """Average PSNR difference (dB) of curve b against anchor a at equal rate; positive means b is better."""
    la, qa = operational(*_points(rate_a, dist_a, "a"))
    lb, qb = operational(*_points(rate_b, dist_b, "b"))
    return _mean_gap(la, qa, lb, qb, "log10(rate)", low_y_wins=False)
