"""Natural photographs for training and evaluating learned image codecs.

The bundled set is the handful of RGB photographs that matplotlib, scikit-image and scikit-learn ship
inside their wheels; they are found on disk without importing those packages. A folder of images
(e.g. the Kodak set) can be used instead.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fedcodec.errors import ConfigError, DatasetError

#: (package, folder inside the package) that hold sample photographs.
BUNDLED_DIRS: tuple[tuple[str, str], ...] = (
    ("matplotlib", "mpl-data/sample_data"),
    ("skimage", "data"),
    ("sklearn", "datasets/images"),
)
#: Colour images in those folders that are not camera photographs (or near-duplicates of one).
NOT_PHOTOS: frozenset[str] = frozenset({
    "color.png",  # skimage: synthetic colour wheel
    "phantom.png",  # skimage: synthetic Shepp-Logan phantom
    "motorcycle_right.png",  # skimage: stereo twin of motorcycle_left.png, would leak into the holdout
})
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
MIN_SIDE = 256
MAX_PIXELS = 50_000_000


def _package_dir(name: str) -> Path | None:
    """Directory of the installed top-level package ``name`` (not imported), or None if absent."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _is_photo(path: Path) -> bool:
    """True for a readable 3-channel image with both sides >= MIN_SIDE (reads the header only)."""
    if path.suffix.lower() not in IMAGE_SUFFIXES or path.name in NOT_PHOTOS:
        return False
    try:
        with Image.open(path) as im:
            return len(im.getbands()) == 3 and min(im.size) >= MIN_SIDE
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        return False


def find_bundled_photos() -> list[Path]:
    """Paths of the photographs shipped with matplotlib, scikit-image and scikit-learn, if installed.

    Sorted by package (in BUNDLED_DIRS order) then file name, so the list is deterministic.
    """
    found: list[Path] = []
    for package, sub in BUNDLED_DIRS:
        root = _package_dir(package)
        folder = root / sub if root is not None else None
        if folder is not None and folder.is_dir():
            found += sorted((p for p in folder.iterdir() if p.is_file() and _is_photo(p)), key=lambda p: p.name)
    return found


def load_photo(path: str | Path) -> np.ndarray:
    """Decode an image file to float32 HxWx3 in [0, 1]; greyscale, palette and RGBA become RGB."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise DatasetError(f"{path}: {im.width}x{im.height} exceeds {MAX_PIXELS:,} pixels; "
                                   "downscale the image or leave it out of the folder")
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise DatasetError(f"cannot read image {path} ({exc}); remove or re-save the file") from exc
    return np.asarray(rgb, dtype=np.float32) / np.float32(255.0)


@dataclass
class PhotoSet:
    """Photos split into a training part and a held-out part used for evaluation only."""

    train: list[tuple[str, np.ndarray]]
    holdout: list[tuple[str, np.ndarray]]
    source: str


def _folder_images(folder: Path) -> list[Path]:
    """Every image file (by suffix) directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        raise DatasetError(f"photo folder {folder} does not exist; pass a directory of .png/.jpg images")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def photo_set(folder: str | Path | None = None, holdout: int = 3, seed: int = 0) -> PhotoSet:
    """Load the bundled photos (or every image in ``folder``) and split them by a seeded permutation."""
    if holdout < 0:
        raise ConfigError(f"holdout must be >= 0, got {holdout}")
    paths = find_bundled_photos() if folder is None else _folder_images(Path(folder))
    source = "bundled" if folder is None else str(folder)
    if not paths:
        raise DatasetError(f"no photos found ({source}); run `pip install scikit-image scikit-learn` for the "
                           "bundled photos, or pass a folder of images (e.g. the Kodak set)")
    if len(paths) < holdout + 1:
        raise DatasetError(f"{len(paths)} photos ({source}) cannot give {holdout} held-out photos and at least "
                           f"one training photo; lower holdout or add images")
    order = np.random.default_rng(seed).permutation(len(paths))
    held = set(order[:holdout].tolist())
    photos = [(p.name, load_photo(p)) for p in paths]
    return PhotoSet(train=[ph for i, ph in enumerate(photos) if i not in held],
                    holdout=[ph for i, ph in enumerate(photos) if i in held], source=source)


def _check_hwc(image: np.ndarray) -> None:
    """Raise ConfigError unless ``image`` is an HxWx3 array."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"expected an HxWx3 image, got shape {image.shape}; load it with load_photo()")


def random_crops(image: np.ndarray, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random ``size``x``size`` crops of an HxWx3 image, float32 of shape (count, 3, size, size)."""
    _check_hwc(image)
    if count < 1 or size < 1:
        raise ConfigError(f"count and size must be >= 1, got count={count}, size={size}")
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ConfigError(f"image {h}x{w} is smaller than the crop size {size}; use a smaller crop size")
    ys = rng.integers(0, h - size + 1, size=count)
    xs = rng.integers(0, w - size + 1, size=count)
    crops = [image[y:y + size, x:x + size] for y, x in zip(ys, xs)]
    return np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2), dtype=np.float32)


def crop_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Centre crop of an HxWx3 image whose height and width are multiples of ``multiple``."""
    _check_hwc(image)
    if multiple < 1:
        raise ConfigError(f"multiple must be >= 1, got {multiple}")
    h, w = image.shape[:2]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    if nh == 0 or nw == 0:
        raise ConfigError(f"image {h}x{w} is smaller than multiple={multiple}; use a larger image")
    top, left = (h - nh) // 2, (w - nw) // 2
    return image[top:top + nh, left:left + nw]
