"""Real images: scikit-image and scikit-learn sample photographs, LFW faces, a moving-object stream.

Only images shipped inside the scikit-image and scikit-learn wheels are used (no pooch
downloads). Every image is returned as float32 ``[N, 3, size, size]``: pixels scaled to [0, 1],
grey images repeated over the three channels, then normalised per channel with the ImageNet
mean ``(0.485, 0.456, 0.406)`` and standard deviation ``(0.229, 0.224, 0.225)`` (what DINOv2
and most ViTs expect). Resizing is a whole-block mean for large reductions followed by
scikit-image's bilinear ``resize`` with anti-aliasing, the same on every machine.

- ``images``: 20 sample photographs (10 colour, 10 grey, listed in ``SOURCES``), each cut into
  ``CROPS_PER_IMAGE`` = 5 square crops: the largest centred square, and a 2x2 grid of squares
  of 0.6 times the short side. Whole photographs are assigned to a split by hashing their
  names (one third calib), so no photograph has crops in both splits.
- ``faces``: scikit-image's ``lfw_subset``, 200 grey 25x25 images: the first 100 are faces
  (label 1), the other 100 not (label 0). Split by hashing each image's index within each
  label, half calib.
- ``frame_stream``: a still background photograph with one square patch cut from another
  photograph moving over it in whole-pixel steps, bouncing off the edges.
"""

from __future__ import annotations

import functools

import numpy as np

from models.data_split import DataError, check_count, hash_rank, split_indices, split_stratified
from runtime.errors import ModelLoadError

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
COLOR = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
         "immunohistochemistry", "motorcycle", "sklearn_china", "sklearn_flower")
GREY = ("camera", "coins", "moon", "grass", "gravel", "brick", "cell", "clock", "page", "text")
SOURCES = COLOR + GREY
CALIB_FRACTION = 1 / 3
PROBE_FRACTION = 1 / 2
CROP_GRID = ((1.0, 1), (0.6, 2))  # (fraction of the short side, squares per side)
CROPS_PER_IMAGE = sum(k * k for _, k in CROP_GRID)
N_FACES = 100


def _skimage_data():
    try:
        import skimage.data
        import skimage.transform  # noqa: F401
    except ImportError:
        raise ModelLoadError("scikit-image is not installed; install carve with its `zoo` "
                             "extra (`pip install -e '.[zoo]'`).") from None
    return skimage.data


def _sklearn_image(name: str) -> np.ndarray:
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        raise ModelLoadError("scikit-learn is not installed; install carve with its `zoo` "
                             "extra (`pip install -e '.[zoo]'`).") from None
    return load_sample_image(name)


@functools.lru_cache(maxsize=len(SOURCES))
def photo(name: str) -> np.ndarray:
    """One sample photograph as float64 ``[H, W, 3]`` in [0, 1] (read-only)."""
    if name not in SOURCES:
        raise DataError(f"Unknown sample image {name!r}; use one of {', '.join(SOURCES)}.")
    data = _skimage_data()
    if name.startswith("sklearn_"):
        pixels = _sklearn_image(name[len("sklearn_"):] + ".jpg")
    elif name == "motorcycle":
        pixels = data.stereo_motorcycle()[0]
    else:
        pixels = getattr(data, name)()
    out = np.asarray(pixels, dtype=np.float64) / 255.0
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    out.flags.writeable = False
    return out


def block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks of ``[H, W, 3]``, dropping edges that fill no block."""
    h, w = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    blocks = pixels[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    return blocks.mean(axis=(1, 3))


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize ``[H, W, 3]`` to ``[size, size, 3]``.

    Images more than twice too large are first averaged over whole-pixel blocks (down to
    between 2x and 4x the target); then scikit-image's bilinear resize, anti-aliased when
    shrinking, gives the final size.
    """
    import skimage.transform

    factor = min(pixels.shape[:2]) // (2 * size)
    if factor >= 2:
        pixels = block_mean(pixels, factor)
    shrink = min(pixels.shape[:2]) > size
    return skimage.transform.resize(pixels, (size, size), order=1, mode="reflect",
                                    anti_aliasing=shrink, preserve_range=True)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """``[..., H, W, 3]`` in [0, 1] -> float32 ``[..., 3, H, W]`` with ImageNet mean/std."""
    out = (pixels - MEAN) / STD
    return np.ascontiguousarray(np.moveaxis(out, -1, -3), dtype=np.float32)


def crop_boxes(height: int, width: int) -> list[tuple[int, int, int]]:
    """``(top, left, side)`` of the square crops of an image, in a fixed order."""
    boxes = []
    for fraction, k in CROP_GRID:
        side = int(round(fraction * min(height, width)))
        tops = np.linspace(0, height - side, k) if k > 1 else [(height - side) / 2]
        lefts = np.linspace(0, width - side, k) if k > 1 else [(width - side) / 2]
        boxes += [(int(round(t)), int(round(lo)), side) for t in tops for lo in lefts]
    return boxes


def crops(name: str, size: int, count: int | None = None) -> list[np.ndarray]:
    """The first ``count`` (default all) resized square crops of a photograph, in [0, 1]."""
    pixels = photo(name)
    boxes = crop_boxes(*pixels.shape[:2])[:count]
    return [resize(pixels[t:t + s, lo:lo + s], size) for t, lo, s in boxes]


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise DataError(f"Image size {size!r} is too small; ask for a whole number of at least 8.")
    return int(size)


@functools.lru_cache(maxsize=4)
def _images(split: str, size: int) -> np.ndarray:
    names = [SOURCES[i] for i in split_indices(SOURCES, split, CALIB_FRACTION)]
    keys = [f"{name}:{j}" for name in names for j in range(CROPS_PER_IMAGE)]
    pixels = [c for name in names for c in crops(name, size)]
    out = normalize(np.stack([pixels[i] for i in hash_rank(keys)]))
    out.flags.writeable = False
    return out


def images(split: str, size: int = 224, n: int | None = None) -> np.ndarray:
    """Crops of the sample photographs in ``split`` (hash order), float32 ``[N, 3, size, size]``."""
    return np.array(_images(split, _check_size(size))[: check_count(n)])


@functools.lru_cache(maxsize=4)
def _faces(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.asarray(_skimage_data().lfw_subset(), dtype=np.float64)
    labels = [int(i < N_FACES) for i in range(len(raw))]
    idx = split_stratified([f"lfw_subset:{i}" for i in range(len(raw))], labels, split,
                           PROBE_FRACTION)
    grey = [resize(np.repeat(raw[i][:, :, None], 3, axis=2), size) for i in idx]
    x = normalize(np.stack(grey))
    y = np.array([labels[i] for i in idx], dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def faces(split: str, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """LFW faces (label 1) and non-faces (label 0) of ``split``: ``[N, 3, size, size]``, ``[N]``."""
    x, y = _faces(split, _check_size(size))
    return np.array(x), np.array(y)


def _trajectory(rng: np.random.Generator, n: int, room: int) -> np.ndarray:
    """``[n, 2]`` integer (top, left) positions moving 2-6 px per step, bouncing in [0, room]."""
    pos = rng.integers(0, room + 1, size=2)
    vel = rng.integers(2, 7, size=2) * rng.choice([-1, 1], size=2)
    out = np.empty((n, 2), dtype=np.int64)
    for t in range(n):
        out[t] = pos
        nxt = pos + vel
        vel = np.where((nxt < 0) | (nxt > room), -vel, vel)
        pos = np.clip(pos + vel, 0, room)
    return out


def frame_stream(n_frames: int, size: int = 224, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A moving patch over a still photo: frames ``[n, 3, size, size]``, masks ``[n, size, size]``.

    ``seed`` picks the background photograph and the object photograph (two different colour
    photographs), the start position and the velocity. The object is the centred square crop of
    its photograph resized to ``size // 4`` pixels a side. ``masks[t]`` is True exactly where the
    object lies in frame ``t``; every pixel outside ``masks[t - 1] | masks[t]`` is bitwise equal
    in frames ``t - 1`` and ``t``, and outside ``masks[t]`` frame ``t`` equals the background.
    Frames are normalised like :func:`images`.
    """
    size = _check_size(size)
    if not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise DataError(f"Asked for {n_frames!r} frames; ask for a whole number of at least 1.")
    rng = np.random.default_rng(seed)
    back_name, obj_name = rng.choice(len(COLOR), size=2, replace=False)
    background = normalize(crops(COLOR[back_name], size, 1)[0])
    side = size // 4
    patch = normalize(crops(COLOR[obj_name], side, 1)[0])
    frames = np.repeat(background[None], n_frames, axis=0)
    masks = np.zeros((n_frames, size, size), dtype=bool)
    for t, (top, left) in enumerate(_trajectory(rng, n_frames, size - side)):
        frames[t, :, top:top + side, left:left + side] = patch
        masks[t, top:top + side, left:left + side] = True
    return frames, masks
