"""Polyp segmentation data: Kvasir-SEG, CVC-ClinicDB and the synthetic set (:mod:`polydice.synthetic`).

Every dataset is decoded and resized once, at load time, and held in memory as uint8 arrays:
``images (N, S, S, 3)`` RGB and ``masks (N, S, S)`` in {0, 1}. On top of that sit the
cross-validation folds (by image, or by video sequence for CVC-ClinicDB), the augmentation of the
thesis (flips and brightness/contrast, each p = 0.5) and seeded data loaders that yield uint8
tensors, so that host-to-device copies stay small; conversion to float happens on the device.
"""

from __future__ import annotations

import copy
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .config import DATASETS

MIN_IMAGE_SIZE = 8

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_TIFF_SUFFIXES = (".tif", ".tiff")

# (image folder, mask folder) of the CVC-ClinicDB releases, tried in this order.
CVC_LAYOUTS = (
    ("Original", "Ground Truth"),
    ("PNG/Original", "PNG/Ground Truth"),
    ("TIF/Original", "TIF/Ground Truth"),
    ("images", "masks"),
)
# Last frame of each of the 29 video sequences of CVC-ClinicDB (official ranges, 1-based frames).
CVC_SEQUENCE_ENDS = np.array(
    [25, 50, 67, 78, 103, 126, 151, 177, 199, 205, 227, 252, 277, 297, 317,
     342, 363, 383, 408, 428, 447, 466, 478, 503, 528, 546, 571, 591, 612]
)
CVC_N_FRAMES = 612


class DataError(ValueError):
    """A dataset, file or split request that cannot be used; the message names the path."""


@dataclass
class SegmentationData:
    """A whole dataset, decoded and resized, in memory.

    Attributes:
        name: ``'synthetic'``, ``'kvasir'`` or ``'cvc'``.
        images: ``(N, S, S, 3)`` uint8 RGB.
        masks: ``(N, S, S)`` uint8 in {0, 1}.
        groups: ``(N,)`` int64, the unit that folds never split: the video sequence for
            CVC-ClinicDB, one distinct group per image otherwise.
        names: ``N`` file stems (or ids for the synthetic set).

    Raises:
        DataError: if the arrays do not have these shapes and dtypes or disagree on N.
    """

    name: str
    images: np.ndarray
    masks: np.ndarray
    groups: np.ndarray
    names: list[str]
    # (n_folds, seed, val_fraction) -> make_folds' result; see folds().
    _folds: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] != 3:
            raise DataError(f"images must be (N, S, S, 3) uint8, got {self.images.shape} {self.images.dtype}")
        if self.masks.dtype != np.uint8 or self.masks.shape != self.images.shape[:3]:
            raise DataError(
                f"masks must be {self.images.shape[:3]} uint8 to match the images, "
                f"got {self.masks.shape} {self.masks.dtype}"
            )
        if self.groups.shape != (n,) or len(self.names) != n:
            raise DataError(
                f"{n} images need {n} groups and names, got {self.groups.shape} groups, {len(self.names)} names"
            )

    @property
    def n_groups(self) -> int:
        """Number of distinct groups (video sequences for CVC-ClinicDB)."""
        return int(np.unique(self.groups).size)

    def __len__(self) -> int:
        return len(self.images)

    def folds(self, n_folds: int = 5, seed: int = 0, val_fraction: float = 0.2) -> list:
        """:func:`make_folds` of this dataset's groups, computed once per argument set and kept
        with the data: a study computes its folds in the driver before the data goes to the
        trials, which then neither split again nor load scikit-learn (about 1 s per trial process)."""
        key = (int(n_folds), int(seed), float(val_fraction))
        if key not in self._folds:
            self._folds[key] = make_folds(self.groups, n_folds, seed=seed, val_fraction=val_fraction)
        return self._folds[key]


# ---------------------------------------------------------------------------------------------
# Loading datasets from disk
# ---------------------------------------------------------------------------------------------

def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    image_size: int = 224,
    *,
    n_synthetic: int = 96,
    seed: int = 0,
    sequence_csv: str | None = None,
    num_workers: int = 0,
) -> SegmentationData:
    """Load a dataset, decode every image once and resize it to ``image_size`` squared.

    Layouts under ``root``:
        - ``kvasir``: ``images/*.jpg`` and ``masks/*.jpg`` with the same file stems (``.jpeg``,
          ``.png``, ``.tif`` also accepted, any case). Sorted by name; one group per image.
        - ``cvc``: CVC-ClinicDB frames named ``<frame>.<ext>`` in one of ``Original/`` +
          ``Ground Truth/`` (TIFF), ``PNG/Original/`` + ``PNG/Ground Truth/``, ``TIF/Original/`` +
          ``TIF/Ground Truth/`` or ``images/`` + ``masks/``; any subset of the 612 frames. Sorted
          by frame number; grouped by video sequence (see :func:`cvc_sequence_of_frame`).
        - ``synthetic``: generated by :func:`polydice.synthetic.make_synthetic`; ``root`` is ignored.

    Images are resized with area averaging when shrinking (bilinear when enlarging). Masks are
    binarised at their stored resolution (> 127, or > 0 for masks stored as 0/1; the channel
    maximum for colour masks), then resized the same way and thresholded at one half: a pixel
    is polyp when polyp covers most of it, which keeps the polyp area and a smooth boundary where
    nearest-neighbour sampling would alias thin parts.

    Args:
        name: one of :data:`DATASETS`.
        root: dataset folder (not needed for ``synthetic``).
        image_size: side S of the square output, at least 8.
        n_synthetic: number of synthetic images.
        seed: seed of the synthetic set (the real datasets are not random).
        sequence_csv: CVC only: CSV ``frame,sequence`` that overrides the official sequences.
        num_workers: threads that decode files in parallel (0: decode in this thread). Decoding
            releases the GIL, so threads scale with cores.

    Returns:
        The dataset: ``images (N, S, S, 3)``, ``masks (N, S, S)``, ``groups (N,)``, ``names``.

    Raises:
        DataError: unknown name, image_size < 8, missing root or folders, no images, an image
            without a mask, an undecodable file, a mask of another size than its image, an image
            that is not 3-channel, a float image or mask with NaN, infinite or out-of-[0, 1]
            values, bad CVC frame names or a bad sequence CSV.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    if sequence_csv is not None and name != "cvc":
        raise DataError(f"sequence_csv only applies to the 'cvc' dataset, got it for {name!r}")
    if name == "synthetic":
        # Imported here: the generator builds on this module's SegmentationData.
        from .synthetic import make_synthetic

        return make_synthetic(n_synthetic, image_size, seed)

    if root is None:
        raise DataError(f"dataset {name!r} needs root, the folder that holds its images")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{name} root folder not found: {root}")
    if name == "kvasir":
        image_paths, mask_paths = _matched_files(root / "images", root / "masks")
        names = [path.stem for path in image_paths]
        groups = np.arange(len(names), dtype=np.int64)
    else:
        image_paths, mask_paths, frames = _cvc_files(root)
        names = [path.stem for path in image_paths]
        groups = cvc_sequence_of_frame(frames, sequence_csv)
    images, masks = _decode_pairs(image_paths, mask_paths, image_size, num_workers)
    return SegmentationData(name, images, masks, groups, names)


def cvc_sequence_of_frame(frames, sequence_csv: str | os.PathLike | None = None) -> np.ndarray:
    """Video sequence of each CVC-ClinicDB frame.

    Args:
        frames: ``(N,)`` frame numbers (the file stems, 1-based).
        sequence_csv: optional CSV with the header ``frame,sequence`` that replaces the official
            ranges; sequence labels may be numbers or strings.

    Returns:
        ``(N,)`` int64 0-based sequence ids: the index of the official range (1-25 -> 0, ...,
        592-612 -> 28), or with a CSV the rank of the frame's label among the CSV's sorted labels.

    Raises:
        DataError: a frame outside 1..612 without a CSV; an unreadable CSV, one without the
            columns ``frame`` and ``sequence``, one that lists a frame twice, or one with no row
            for some frame.
    """
    frames = np.asarray(frames, dtype=np.int64).reshape(-1)
    if sequence_csv is None:
        outside = frames[(frames < 1) | (frames > CVC_N_FRAMES)]
        if outside.size:
            raise DataError(
                f"CVC-ClinicDB frames are numbered 1..{CVC_N_FRAMES}, got {outside[:10].tolist()}; "
                "pass sequence_csv (columns frame,sequence) for other frames"
            )
        return np.searchsorted(CVC_SEQUENCE_ENDS, frames).astype(np.int64)

    path = Path(sequence_csv)
    try:
        table = pd.read_csv(path, skipinitialspace=True)
    except (OSError, ValueError) as error:  # pandas' parser errors are ValueErrors
        raise DataError(f"cannot read sequence CSV {path}: {error}") from error
    table.columns = [str(column).strip() for column in table.columns]
    if not {"frame", "sequence"} <= set(table.columns):
        raise DataError(f"sequence CSV {path} needs the header 'frame,sequence', found {list(table.columns)}")
    try:
        csv_frames = table["frame"].astype(np.int64)
    except (ValueError, TypeError) as error:
        raise DataError(f"sequence CSV {path}: column 'frame' must hold frame numbers: {error}") from error
    repeated = csv_frames[csv_frames.duplicated()]
    if len(repeated):
        raise DataError(f"sequence CSV {path} lists frame(s) {repeated.unique()[:10].tolist()} more than once")
    sequence_ids, _ = pd.factorize(table["sequence"], sort=True)
    lookup = pd.Series(sequence_ids, index=csv_frames.to_numpy()).reindex(frames)
    missing = frames[lookup.isna().to_numpy()]
    if missing.size:
        raise DataError(
            f"sequence CSV {path} has no row for frame(s) {missing[:10].tolist()} ({missing.size} in all)"
        )
    return lookup.to_numpy().astype(np.int64)


def _image_files(folder: Path, role: str) -> dict[str, Path]:
    """Map file stem -> path for the image files in ``folder`` (the ``role`` folder of a dataset).

    Raises:
        DataError: the folder is missing, or two files share a stem (``a.jpg`` and ``a.png``).
    """
    if not folder.is_dir():
        raise DataError(f"{role} folder not found: {folder}")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # Dot files include the '._name' resource forks that macOS leaves in archives.
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in files:
            raise DataError(
                f"two files with the stem {path.stem!r} in {folder}: {files[path.stem].name}, {path.name}"
            )
        files[path.stem] = path
    return files


def _matched_files(image_dir: Path, mask_dir: Path, order=sorted) -> tuple[list[Path], list[Path]]:
    """Image paths in ``order`` of their stems and the mask path with the same stem for each.

    Raises:
        DataError: a folder is missing, no images are found, or an image has no mask.
    """
    images = _image_files(image_dir, "image")
    if not images:
        raise DataError(f"no images found in {image_dir} (looked for {', '.join(IMAGE_SUFFIXES)})")
    masks = _image_files(mask_dir, "mask")
    stems = order(images)
    missing = [stem for stem in stems if stem not in masks]
    if missing:
        raise DataError(
            f"no mask for image {images[missing[0]]}: expected {mask_dir / missing[0]}.<ext> "
            f"({len(missing)} of {len(stems)} images have no mask)"
        )
    return [images[stem] for stem in stems], [masks[stem] for stem in stems]


def _cvc_files(root: Path) -> tuple[list[Path], list[Path], np.ndarray]:
    """Image and mask paths of the CVC-ClinicDB frames under ``root``, and their frame numbers.

    Raises:
        DataError: no known layout under ``root``, a file not named by a frame number, or the
            errors of :func:`_matched_files`.
    """
    for image_sub, mask_sub in CVC_LAYOUTS:
        if (root / image_sub).is_dir():
            break
    else:
        layouts = "; ".join(f"{image}/ + {mask}/" for image, mask in CVC_LAYOUTS)
        raise DataError(f"no CVC-ClinicDB image folder under {root}; expected one of: {layouts}")

    def by_frame_number(stems):
        odd = [stem for stem in stems if not stem.isdecimal()]
        if odd:
            raise DataError(
                f"CVC-ClinicDB files in {root / image_sub} must be named <frame number>.<ext>, found {odd[0]!r}"
            )
        return sorted(stems, key=int)

    image_paths, mask_paths = _matched_files(root / image_sub, root / mask_sub, order=by_frame_number)
    return image_paths, mask_paths, np.array([int(path.stem) for path in image_paths], dtype=np.int64)


def _decode_pairs(
    image_paths: list[Path], mask_paths: list[Path], size: int, num_workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize all pairs into ``(N, S, S, 3)`` and ``(N, S, S)`` uint8 arrays."""
    n = len(image_paths)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.uint8)

    def load(i: int) -> None:
        images[i], masks[i] = _load_pair(image_paths[i], mask_paths[i], size)

    if num_workers > 0:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            list(pool.map(load, range(n)))  # list() re-raises the first error, in file order
    else:
        for i in range(n):
            load(i)
    return images, masks


def _load_pair(image_path: Path, mask_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(S, S, 3)`` uint8 RGB and its mask ``(S, S)`` uint8 in {0, 1}.

    Raises:
        DataError: a file cannot be decoded, the image is not 3-channel, or the sizes differ.
    """
    image, image_hw = _read(image_path, size)
    mask, mask_hw = _read(mask_path, size)
    if image_hw != mask_hw:
        raise DataError(
            f"mask {mask_path} is {mask_hw[1]}x{mask_hw[0]} (WxH) but its image {image_path} "
            f"is {image_hw[1]}x{image_hw[0]}"
        )
    image = _resize(_as_rgb8(image, image_path), size)
    _check_float_values(mask, mask_path)
    mask = _resize(_binarise(mask) * np.uint8(255), size) > 127
    return image, mask.astype(np.uint8)


def _read(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a file as stored: ``(H, W)`` or ``(H, W, C)`` in RGB(A) order, any dtype.

    JPEGs may come back reduced (by up to 8x, never below ``size`` on either side).

    Returns:
        The array and the ``(H, W)`` of the stored image.

    Raises:
        DataError: no reader can decode the file; the message gives each reader's error.
    """
    # CVC's TIFFs defeat Pillow, so tifffile (exact, handles planar RGB) goes first, then OpenCV's
    # libtiff. Other files go to Pillow alone: its draft mode decodes large JPEGs reduced, several
    # times faster, and it raises on a truncated file (cv2.imread returns it with a grey bottom).
    is_tiff = path.suffix.lower() in _TIFF_SUFFIXES
    readers = (_read_tifffile, _read_opencv, _read_pillow) if is_tiff else (_read_pillow,)
    problems = []
    for reader in readers:
        try:
            return reader(path, size)
        except Exception as error:  # each library has its own exception types for a bad file
            problems.append(f"{reader.__name__.removeprefix('_read_')}: {error}")
    raise DataError(f"cannot decode {path}: {'; '.join(problems)}")


def _read_tifffile(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        array = page.asarray()
        if page.axes.startswith("S"):  # planar-separate RGB is stored (3, H, W)
            array = np.moveaxis(array, 0, -1)
    return array, array.shape[:2]


def _read_opencv(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    array = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError("OpenCV cannot decode it")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB if array.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return array, array.shape[:2]


def _read_pillow(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    with Image.open(path) as image:
        stored_hw = (image.height, image.width)
        # For JPEGs libjpeg then scales by 1/2, 1/4 or 1/8 while decoding, keeping both sides
        # >= size: decoding the large Kvasir images becomes several times faster.
        image.draft(image.mode, (size, size))
        # Palette, CMYK, YCbCr... store colour in other ways: ask for RGB. Grey stays grey, so a
        # grey image is caught rather than passed off as RGB.
        if image.mode not in ("1", "L", "LA", "I", "I;16", "F", "RGB", "RGBA"):
            image = image.convert("RGB")
        return np.asarray(image), stored_hw


def _drop_alpha(array: np.ndarray) -> np.ndarray:
    return array[..., :-1] if array.ndim == 3 and array.shape[2] in (2, 4) else array


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer images to 0..255 by their dtype's range; floats are taken to be in [0, 1]."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) * (255 / np.iinfo(array.dtype).max)
    else:
        array = array.astype(np.float32) * 255
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


# Float pixels are taken to lie in [0, 1]; this much outside is rounding, more is another scale.
FLOAT_RANGE_SLACK = 1e-3


def _check_float_values(array: np.ndarray, path: Path) -> None:
    """Reject a float image or mask (a float TIFF) whose values are not finite or not in [0, 1].

    Converted as they are, NaN would become an arbitrary byte and a 0..255 float image a white
    one (a 0..255 float mask all foreground), and training would go on with them unnoticed.

    Raises:
        DataError: naming the file, the count of non-finite values or the range found.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return
    finite = np.isfinite(array)
    if not finite.all():
        raise DataError(f"{path} holds {int((~finite).sum())} NaN or infinite pixel values")
    low, high = float(array.min()), float(array.max())
    if low < -FLOAT_RANGE_SLACK or high > 1 + FLOAT_RANGE_SLACK:
        raise DataError(f"{path} is a float image with values in [{low:.4g}, {high:.4g}]; float pixels must lie "
                        "in [0, 1] (store 8- or 16-bit integers otherwise)")


def _as_rgb8(array: np.ndarray, path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from a decoded image, alpha dropped, 16 bit scaled.

    Raises:
        DataError: the image is not 3-channel (e.g. a TIFF read as 1 channel), or is a float image
            with non-finite values or values outside [0, 1].
    """
    if array.ndim not in (2, 3):
        raise DataError(f"{path} decoded to shape {array.shape}, expected (H, W, 3) RGB")
    _check_float_values(array, path)
    array = _drop_alpha(array)
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels != 3:
        raise DataError(f"{path} decoded as {channels} channel{'s' if channels > 1 else ''}, expected 3-channel RGB")
    return _to_uint8(array)


def _binarise(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 in {0, 1} from a decoded mask ``(H, W)`` or ``(H, W, C)``.

    Colour masks count a pixel as polyp when any channel is bright (a mask drawn in red counts).
    Masks stored as 0/1 are kept; others are thresholded at half range (> 127 for 8 bit), which
    removes the JPEG noise of Kvasir's masks (their values avoid 30..225).
    """
    mask = _drop_alpha(mask)
    if mask.ndim == 3:
        # Plane by plane: numpy's max along a length-3 last axis is ~20x slower.
        mask = functools.reduce(np.maximum, np.moveaxis(mask, 2, 0))
    if mask.dtype == bool or (np.issubdtype(mask.dtype, np.integer) and mask.max() <= 1):
        return (mask > 0).astype(np.uint8)
    return (_to_uint8(mask) > 127).astype(np.uint8)


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(H, W)`` or ``(H, W, C)`` to ``(size, size)``: area averaging when shrinking."""
    height, width = array.shape[:2]
    if (height, width) == (size, size):
        return array
    # INTER_AREA averages every source pixel (no aliasing) but is meant for shrinking only.
    interpolation = cv2.INTER_AREA if height >= size and width >= size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(array), (size, size), interpolation=interpolation)


# ---------------------------------------------------------------------------------------------
# Cross-validation folds
# ---------------------------------------------------------------------------------------------

def make_folds(
    groups, n_folds: int = 5, seed: int = 0, val_fraction: float = 0.2
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cross-validation folds with an inner validation split, never splitting a group.

    The test parts come from ``KFold(shuffle=True, random_state=seed)`` when every image is its
    own group (Kvasir-SEG, synthetic) and from ``GroupKFold`` otherwise (CVC-ClinicDB sequences;
    shuffled with ``seed`` where scikit-learn >= 1.6 supports it). Each fold's validation part is
    ``GroupShuffleSplit(test_size=val_fraction, random_state=seed + fold)`` of its training part.

    Args:
        groups: ``(N,)`` group of each image (``SegmentationData.groups``).
        n_folds: number of folds, 2 <= n_folds <= number of groups.
        seed: seed of the shuffles.
        val_fraction: fraction of the training part's groups held out for validation, in (0, 1).

    Returns:
        ``n_folds`` tuples ``(train, val, test)`` of sorted int64 index arrays; the test parts
        partition ``range(N)`` and no group appears in two parts of one fold.

    Raises:
        DataError: n_folds < 2 or more folds than groups; val_fraction outside (0, 1); a training
            part with too few groups to hold out a validation part.
    """
    # Imported here: a trial process that gets its folds with the data never needs scikit-learn.
    from sklearn.model_selection import GroupKFold, GroupShuffleSplit, KFold

    groups = np.asarray(groups).reshape(-1)
    n_groups = np.unique(groups).size
    if n_folds < 2:
        raise DataError(f"n_folds must be >= 2, got {n_folds}")
    if n_folds > n_groups:
        raise DataError(
            f"cannot make {n_folds} folds from {n_groups} groups: every test part needs a whole "
            "group (a video sequence for CVC-ClinicDB, an image otherwise)"
        )
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")

    if n_groups == len(groups):
        splits = KFold(n_folds, shuffle=True, random_state=seed).split(groups)
    else:
        # Shuffled, seeded group folds need scikit-learn >= 1.6 (the floor in pyproject.toml).
        splits = GroupKFold(n_folds, shuffle=True, random_state=seed).split(groups, groups=groups)

    folds = []
    for fold, (train_val, test) in enumerate(splits):
        inner = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed + fold)
        try:
            train, val = next(inner.split(train_val, groups=groups[train_val]))
        except ValueError as error:
            raise DataError(
                f"fold {fold}: its training part has {np.unique(groups[train_val]).size} group(s), "
                f"too few to hold out val_fraction={val_fraction}: {error}"
            ) from error
        folds.append(tuple(np.sort(part).astype(np.int64) for part in (train_val[train], train_val[val], test)))
    return folds


# ---------------------------------------------------------------------------------------------
# Augmentation, datasets and loaders
# ---------------------------------------------------------------------------------------------

def build_augmentation(seed: int | None = None) -> A.Compose:
    """The thesis augmentation: horizontal flip, vertical flip, brightness/contrast, each p = 0.5.

    Args:
        seed: seed of the transform's own random state (albumentations ignores global seeds).

    Returns:
        An ``A.Compose`` called as ``transform(image=(H, W, 3) uint8, mask=(H, W) uint8)``.
    """
    return A.Compose(
        [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomBrightnessContrast(p=0.5)],
        seed=seed,
    )


class SegmentationDataset(Dataset):
    """Samples ``indices`` of a :class:`SegmentationData`, optionally augmented.

    Args:
        data: the dataset in memory.
        indices: ``(M,)`` indices into ``data.images``.
        transform: albumentations transform on numpy ``image``/``mask`` (no ``ToTensorV2``).

    Raises:
        DataError: indices that are not 1-D integers in ``range(len(data))``.
    """

    def __init__(self, data: SegmentationData, indices, transform=None):
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise DataError(f"indices must be a 1-D integer array, got shape {indices.shape} {indices.dtype}")
        if indices.size and (indices.min() < 0 or indices.max() >= len(data)):
            raise DataError(f"indices must lie in [0, {len(data)}), got [{indices.min()}, {indices.max()}]")
        self.data = data
        self.indices = indices.astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Returns ``image (3, S, S)`` uint8, ``mask (S, S)`` uint8 and the index into ``data``."""
        index = int(self.indices[i])
        image, mask = self.data.images[index], self.data.masks[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        # Copies: flips return views, and a batch must never alias the dataset in memory.
        return (
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            torch.from_numpy(np.array(mask, dtype=np.uint8)),
            index,
        )


def _reseed_worker_transform(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from the loader's seed.

    Workers start from a copy of the dataset, so otherwise every worker, in every epoch (workers
    restart each epoch), would replay one stream. ``info.seed`` is the loader's base seed of the
    epoch, drawn from its seeded generator, plus ``worker_id``.
    """
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


def make_loader(
    data: SegmentationData,
    indices,
    batch_size: int,
    *,
    shuffle: bool,
    transform=None,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A seeded loader of ``(images (B, 3, S, S) uint8, masks (B, S, S) uint8, indices (B,) int64)``.

    The same data, indices, arguments and seed give the same batches, augmentation included:
    shuffling draws from a ``torch.Generator`` seeded with ``seed``; the loader works on a copy
    of ``transform`` reseeded with ``seed`` (num_workers = 0) or, per worker and epoch, from the
    generator (num_workers > 0). Different ``num_workers`` therefore give different
    augmentations. A transform without ``set_random_seed`` is used as it is.

    Args:
        data: the dataset in memory.
        indices: ``(M,)`` indices of the images to load.
        batch_size: images per batch, >= 1.
        shuffle: reshuffle the indices every epoch.
        transform: albumentations transform, e.g. :func:`build_augmentation`; None for none.
        seed: seed of the shuffling and the augmentation.
        num_workers: loader worker processes.
        pin_memory: pin batches for faster copies to a GPU.
        drop_last: drop the last incomplete batch.

    Returns:
        The ``torch.utils.data.DataLoader``.

    Raises:
        DataError: batch_size < 1, num_workers < 0, or bad indices.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    seedable = transform is not None and hasattr(transform, "set_random_seed")
    if seedable:
        transform = copy.deepcopy(transform)  # the caller's transform keeps its own state
        transform.set_random_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        SegmentationDataset(data, indices, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_reseed_worker_transform if seedable and num_workers > 0 else None,
    )
