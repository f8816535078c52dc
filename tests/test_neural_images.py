"""Tests of the image side of fedcodec.neural: photo data, standard-codec baselines, BD metrics."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from PIL import Image

from fedcodec.errors import ConfigError, DatasetError
from fedcodec.neural import photos
from fedcodec.neural.bdrate import bd_psnr, bd_rate, psnr_from_mse
from fedcodec.neural.photos import crop_to_multiple, find_bundled_photos, load_photo, photo_set, random_crops
from fedcodec.neural.standard import codec_curve, decode, encode, to_uint8

RATES = [0.1, 0.25, 0.5, 1.0, 2.0]
PSNRS = [26.0, 29.0, 32.5, 36.0, 40.0]


def smooth_image(size: int = 64, seed: int = 0) -> np.ndarray:
    """A synthetic HxWx3 float image in [0, 1]: colour gradients, a disc, a square and mild noise."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    img = np.stack([x, y, 0.5 + 0.4 * np.sin(6 * x * y)], axis=-1)
    img[(x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.04] = (0.9, 0.2, 0.1)
    img[(x > 0.6) & (x < 0.85) & (y > 0.55) & (y < 0.8)] = (0.1, 0.3, 0.8)
    img += np.random.default_rng(seed).normal(0, 0.01, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def write_pngs(folder, count: int, size: int = 40) -> list[str]:
    """Write ``count`` distinct RGB PNGs into ``folder``; return their names."""
    names = []
    for i in range(count):
        pixels = to_uint8(smooth_image(size, seed=i) * (0.5 + 0.1 * i))
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


# --- BD metrics --------------------------------------------------------------------------------------------

def test_bd_rate_of_curve_against_itself_is_zero():
    assert bd_rate(RATES, PSNRS, RATES, PSNRS) == pytest.approx(0.0, abs=1e-9)
    assert bd_psnr(RATES, PSNRS, RATES, PSNRS) == pytest.approx(0.0, abs=1e-9)


def test_bd_rate_of_scaled_rates_is_the_scale_and_sign_is_symmetric():
    cheaper = [0.8 * r for r in RATES]
    assert bd_rate(RATES, PSNRS, cheaper, PSNRS) == pytest.approx(-20.0, abs=1e-6)
    assert bd_rate(cheaper, PSNRS, RATES, PSNRS) == pytest.approx(25.0, abs=1e-6)


def test_bd_rate_ignores_point_order_and_bd_psnr_sees_a_shift():
    order = [3, 0, 4, 1, 2]
    shuffled_r, shuffled_q = [RATES[i] for i in order], [PSNRS[i] for i in order]
    assert bd_rate(RATES, PSNRS, shuffled_r, shuffled_q) == pytest.approx(0.0, abs=1e-9)
    assert bd_psnr(RATES, PSNRS, RATES, [q + 1.5 for q in PSNRS]) == pytest.approx(1.5, abs=1e-9)


def test_bd_rate_drops_points_the_same_curve_dominates():
    """A point with more bits and no better PSNR than another of its curve is not an operating point:
    the BD-rate is the one of the curve without it (here −20%, the rates' scale), not a backward bend."""
    cheaper = [0.8 * r for r in RATES]
    worse = max(RATES) * 3, max(PSNRS) - 0.5  # 3x the top rate at a lower PSNR than the top point
    assert bd_rate(RATES + [worse[0]], PSNRS + [worse[1]], cheaper, PSNRS) == pytest.approx(-20.0, abs=1e-6)
    assert bd_rate(RATES, PSNRS, cheaper + [worse[0]], PSNRS + [worse[1]]) == pytest.approx(-20.0, abs=1e-6)
    assert bd_psnr(RATES + [worse[0]], PSNRS + [worse[1]], RATES, PSNRS) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ConfigError, match="at least 2 distinct"):  # one operating point left
        bd_rate([1.0, 2.0], [30.0, 29.0], RATES, PSNRS)


def test_bd_rate_rejects_bad_curves():
    with pytest.raises(ConfigError, match="do not overlap"):
        bd_rate(RATES, PSNRS, RATES, [q + 20 for q in PSNRS])
    with pytest.raises(ConfigError, match="at least 2"):
        bd_rate([1.0], [30.0], RATES, PSNRS)
    with pytest.raises(ConfigError, match="non-positive"):
        bd_rate([0.0, 1.0], [30.0, 35.0], RATES, PSNRS)


def test_psnr_from_mse():
    assert psnr_from_mse(0.01) == pytest.approx(20.0)
    assert psnr_from_mse(0.25, peak=0.5) == pytest.approx(0.0)
    assert math.isinf(psnr_from_mse(0.0))
    with pytest.raises(ConfigError):
        psnr_from_mse(-1.0)


# --- standard codecs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_codec_curve_rate_and_quality_fall_with_quality(fmt):
    img = smooth_image()
    curve = codec_curve([img], fmt, [90, 50, 10])
    bpps, psnrs = [p["bpp"] for p in curve], [p["psnr"] for p in curve]
    assert bpps[0] > bpps[1] > bpps[2] > 0
    assert psnrs[0] > psnrs[1] > psnrs[2] > 15
    for point in curve:
        assert point["psnr"] == pytest.approx(10 * math.log10(1 / point["mse"]))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_codec_curve_counts_real_file_bytes_and_pooled_mse(fmt):
    imgs = [smooth_image(64, seed=1), smooth_image(48, seed=2)]
    (point,) = codec_curve(imgs, fmt, [40])
    files = [encode(to_uint8(im), fmt, 40) for im in imgs]
    assert point["bytes"] == sum(len(f) for f in files)
    assert point["bpp"] == pytest.approx(8 * point["bytes"] / (64 * 64 + 48 * 48))
    errors = [(decode(f).astype(np.float64) - to_uint8(im)) / 255.0 for f, im in zip(files, imgs)]
    assert point["mse"] == pytest.approx(sum((e ** 2).sum() for e in errors) / sum(e.size for e in errors))


def test_codec_curve_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="unknown image format"):
        codec_curve([smooth_image()], "png", [50])
    with pytest.raises(ConfigError, match="qualities"):
        codec_curve([smooth_image()], "jpeg", [0])
    with pytest.raises(ConfigError, match="HxWx3"):
        codec_curve([np.zeros((8, 8))], "jpeg", [50])


# --- photos ------------------------------------------------------------------------------------------------

def test_photo_set_splits_a_folder_deterministically(tmp_path):
    names = write_pngs(tmp_path, 5)
    first, again = photo_set(tmp_path, holdout=3, seed=0), photo_set(tmp_path, holdout=3, seed=0)
    assert len(first.train) == 2 and len(first.holdout) == 3
    split = ([n for n, _ in first.train], [n for n, _ in first.holdout])
    assert split == ([n for n, _ in again.train], [n for n, _ in again.holdout])
    assert sorted(split[0] + split[1]) == names
    splits = {tuple(n for n, _ in photo_set(tmp_path, holdout=3, seed=s).holdout) for s in range(8)}
    assert len(splits) > 1
    name, arr = first.train[0]
    assert arr.shape == (40, 40, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1


def test_photo_set_rejects_empty_or_small_folders(tmp_path):
    with pytest.raises(DatasetError, match="pip install scikit-image scikit-learn"):
        photo_set(tmp_path)
    write_pngs(tmp_path, 3)
    with pytest.raises(DatasetError, match="lower holdout"):
        photo_set(tmp_path, holdout=3)
    with pytest.raises(DatasetError, match="does not exist"):
        photo_set(tmp_path / "missing")


def test_load_photo_converts_modes_and_refuses_huge_images(tmp_path, monkeypatch):
    Image.new("L", (30, 20), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (30, 20), (255, 0, 0, 10)).save(tmp_path / "rgba.png")
    grey, rgba = load_photo(tmp_path / "grey.png"), load_photo(tmp_path / "rgba.png")
    assert grey.shape == rgba.shape == (20, 30, 3)
    assert np.allclose(grey, 128 / 255) and np.allclose(rgba[..., 0], 1.0)
    monkeypatch.setattr(photos, "MAX_PIXELS", 500)
    with pytest.raises(DatasetError, match="exceeds"):
        load_photo(tmp_path / "grey.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cannot read"):
        load_photo(tmp_path / "junk.png")


def test_random_crops_shape_content_and_determinism():
    img = smooth_image(64)
    a = random_crops(img, 5, 16, np.random.default_rng(3))
    b = random_crops(img, 5, 16, np.random.default_rng(3))
    assert a.shape == (5, 3, 16, 16) and a.dtype == np.float32
    assert np.array_equal(a, b)
    windows = np.lib.stride_tricks.sliding_window_view(img, (16, 16), axis=(0, 1))  # (49, 49, 3, 16, 16)
    assert all(np.any(np.all(windows == crop, axis=(2, 3, 4))) for crop in a)
    with pytest.raises(ConfigError, match="smaller than the crop size"):
        random_crops(img, 1, 65, np.random.default_rng(0))


def test_crop_to_multiple_is_centred():
    img = np.random.default_rng(0).random((70, 45, 3)).astype(np.float32)
    out = crop_to_multiple(img, 16)
    assert out.shape == (64, 32, 3)
    assert np.array_equal(out, img[3:67, 6:38])
    assert crop_to_multiple(img, 1).shape == img.shape
    with pytest.raises(ConfigError):
        crop_to_multiple(img, 128)


def test_bundled_photos_are_rgb_photographs():
    if not any(importlib.util.find_spec(p) for p in ("matplotlib", "skimage", "sklearn")):
        pytest.skip("none of matplotlib, scikit-image, scikit-learn is installed")
    paths = find_bundled_photos()
    assert paths == find_bundled_photos()
    assert len({p.name for p in paths}) == len(paths)
    for path in paths:
        assert path.is_file()
        arr = load_photo(path)
        assert arr.ndim == 3 and arr.shape[2] == 3 and min(arr.shape[:2]) >= 256
