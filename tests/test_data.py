"""Tests of polydice.data: loading (Kvasir-SEG and CVC-ClinicDB layouts), synthetic data, folds, loaders."""

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from sklearn.model_selection import KFold

from polydice import config, data, synthetic
from polydice.config import DATASETS
from polydice.data import (
    DataError,
    SegmentationData,
    SegmentationDataset,
    build_augmentation,
    cvc_sequence_of_frame,
    load_dataset,
    make_loader,
)
from polydice.dataset import make_folds
from polydice.synthetic import make_synthetic

KVASIR_DIR = Path(
    os.environ.get("POLYDICE_KVASIR_DIR", Path(__file__).resolve().parents[2] / "shared/data/kvasir-seg")
)


# ---------------------------------------------------------------------------------------------
# Helpers that write small datasets
# ---------------------------------------------------------------------------------------------

def rgb_image(height, width, seed=0):
    """(H, W, 3) uint8: smooth gradients plus a little noise, so that JPEG keeps it recognisable."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([40 + 150 * x / width, 60 + 120 * y / height, np.full((height, width), 90.0)], axis=-1)
    return np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)


def disk_mask(height, width, radius_fraction=0.3):
    """(H, W) uint8 in {0, 1}: a centred disk."""
    y, x = np.mgrid[0:height, 0:width]
    radius = radius_fraction * min(height, width)
    return (((y - height / 2) ** 2 + (x - width / 2) ** 2) < radius**2).astype(np.uint8)


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def kvasir_folder(root, sizes=None):
    """Kvasir-SEG layout: JPEG images, noisy JPEG masks (0/255), returns {stem: (image, mask)}."""
    sizes = sizes or {"b": (30, 40), "a": (48, 64), "c10": (20, 20)}
    written = {}
    for i, (stem, (height, width)) in enumerate(sizes.items()):
        image, mask = rgb_image(height, width, seed=i), disk_mask(height, width)
        save(root / "images" / f"{stem}.jpg", image, quality=95)
        save(root / "masks" / f"{stem}.jpg", mask * 255, quality=75)
        written[stem] = (image, mask)
    return written


def write_cvc_tiff(root, frames, height=16, width=16):
    """CVC-ClinicDB 'Original/' + 'Ground Truth/' TIFFs in several encodings; returns {frame: (image, mask)}."""
    (root / "Original").mkdir(parents=True)
    (root / "Ground Truth").mkdir(parents=True)
    written = {}
    for i, frame in enumerate(frames):
        image, mask = rgb_image(height, width, seed=frame), disk_mask(height, width, 0.2 + 0.05 * i)
        image_path, mask_path = root / "Original" / f"{frame}.tif", root / "Ground Truth" / f"{frame}.tif"
        encoding = i % 3
        if encoding == 0:  # contiguous RGB
            tifffile.imwrite(image_path, image, photometric="rgb")
        elif encoding == 1:  # planar-separate RGB: stored (3, H, W)
            tifffile.imwrite(image_path, image.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
        else:  # OpenCV: BGR order, LZW compression (which tifffile needs imagecodecs for)
            cv2.imwrite(str(image_path), image[..., ::-1])
        if i % 2:
            tifffile.imwrite(mask_path, np.repeat(mask[..., None] * 255, 3, axis=-1), photometric="rgb")
        else:
            tifffile.imwrite(mask_path, mask)  # stored as 0/1
        written[frame] = (image, mask)
    return written


# ---------------------------------------------------------------------------------------------
# Kvasir-SEG layout
# ---------------------------------------------------------------------------------------------

def test_kvasir_layout_shapes_order_and_binary_masks(tmp_path):
    written = kvasir_folder(tmp_path)
    raw_mask = np.asarray(Image.open(tmp_path / "masks" / "a.jpg"))
    assert set(np.unique(raw_mask)) - {0, 255}, "the JPEG mask should be noisy for this test to mean anything"

    ds = load_dataset("kvasir", tmp_path, image_size=32)
    assert isinstance(ds, SegmentationData) and ds.name == "kvasir" and len(ds) == 3
    assert ds.names == ["a", "b", "c10"]
    assert ds.images.shape == (3, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.masks.shape == (3, 32, 32) and ds.masks.dtype == np.uint8
    assert set(np.unique(ds.masks)) == {0, 1}
    assert ds.groups.dtype == np.int64 and ds.groups.tolist() == [0, 1, 2] and ds.n_groups == 3
    for i, name in enumerate(ds.names):
        image, mask = written[name]
        # The polyp keeps its area through JPEG noise and resizing (both down- and upscaling).
        assert abs(ds.masks[i].mean() - mask.mean()) < 0.03
        shrink = image.shape[0] >= 32
        expected = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        assert np.abs(ds.images[i].astype(int) - expected).mean() < 6  # RGB order, only JPEG error left


def test_kvasir_accepts_other_suffixes_any_case(tmp_path):
    image, mask = rgb_image(20, 24), disk_mask(20, 24)
    save(tmp_path / "images" / "x.PNG", image)
    save(tmp_path / "masks" / "x.JPEG", mask * 255)
    save(tmp_path / "images" / "y.jpeg", image)
    save(tmp_path / "masks" / "y.png", mask)  # stored as 0/1
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / "._x.PNG").write_bytes(b"macOS resource fork")
    ds = load_dataset("kvasir", tmp_path, image_size=16)
    assert ds.names == ["x", "y"]
    assert ds.masks[0].sum() > 0 and np.array_equal(ds.masks[0], ds.masks[1])


def test_mask_pixel_is_polyp_where_polyp_covers_most_of_it(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :37] = 255  # output column 8 fully covered, column 9 a quarter (source columns 36..39)
    save(tmp_path / "images" / "a.png", rgb_image(64, 64))
    save(tmp_path / "masks" / "a.png", mask)
    resized = load_dataset("kvasir", tmp_path, image_size=16).masks[0]
    assert np.all(resized[:, :9] == 1) and np.all(resized[:, 9:] == 0)


def test_thread_pool_gives_the_same_arrays(tmp_path):
    kvasir_folder(tmp_path)
    serial = load_dataset("kvasir", tmp_path, image_size=24)
    threaded = load_dataset("kvasir", tmp_path, image_size=24, num_workers=2)
    assert np.array_equal(serial.images, threaded.images) and np.array_equal(serial.masks, threaded.masks)


# ---------------------------------------------------------------------------------------------
# CVC-ClinicDB layouts
# ---------------------------------------------------------------------------------------------

def test_cvc_tiff_layout_decodes_every_encoding_exactly(tmp_path):
    written = write_cvc_tiff(tmp_path, [30, 2, 10, 1, 26])
    ds = load_dataset("cvc", tmp_path, image_size=16)  # native size: no resizing, exact values
    assert ds.name == "cvc"
    assert ds.names == ["1", "2", "10", "26", "30"]  # numeric, not lexicographic, order
    assert ds.groups.tolist() == [0, 0, 0, 1, 1] and ds.n_groups == 2
    for i, name in enumerate(ds.names):
        image, mask = written[int(name)]
        np.testing.assert_array_equal(ds.images[i], image)
        np.testing.assert_array_equal(ds.masks[i], mask)


def test_cvc_tiff_layout_resizes_non_square_frames(tmp_path):
    write_cvc_tiff(tmp_path, [1, 2, 3], height=36, width=48)
    ds = load_dataset("cvc", tmp_path, image_size=24)
    assert ds.images.shape == (3, 24, 24, 3) and ds.masks.shape == (3, 24, 24)
    assert set(np.unique(ds.masks)) == {0, 1}


@pytest.mark.parametrize("broken", [("tifffile",), ("tifffile", "opencv")])
def test_tiff_reader_fallbacks(tmp_path, monkeypatch, broken):
    written = write_cvc_tiff(tmp_path, [1, 2, 3, 4])

    def fail(*args, **kwargs):
        raise ValueError("simulated reader failure")

    if "tifffile" in broken:
        monkeypatch.setattr(data.tifffile, "TiffFile", fail)
    if "opencv" in broken:
        monkeypatch.setattr(data.cv2, "imdecode", lambda *args: None)
    ds = load_dataset("cvc", tmp_path, image_size=16)
    assert len(ds) == 4
    for i, name in enumerate(ds.names):
        np.testing.assert_array_equal(ds.images[i], written[int(name)][0])
        np.testing.assert_array_equal(ds.masks[i], written[int(name)][1])


def test_tiff_16_bit_and_rgba_images(tmp_path):
    image = rgb_image(16, 16)
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "1.tif", image.astype(np.uint16) * 257, photometric="rgb")
    tifffile.imwrite(tmp_path / "images" / "2.tif", np.dstack([image, np.full((16, 16), 7, np.uint8)]),
                     photometric="rgb", extrasamples=["unassalpha"])
    save(tmp_path / "masks" / "1.png", disk_mask(16, 16) * 255)
    save(tmp_path / "masks" / "2.png", disk_mask(16, 16) * 255)
    ds = load_dataset("cvc", tmp_path, image_size=16)
    np.testing.assert_array_equal(ds.images[0], image)
    np.testing.assert_array_equal(ds.images[1], image)


def test_single_channel_tiff_image_is_rejected(tmp_path):
    write_cvc_tiff(tmp_path, [1, 2])
    grey = tmp_path / "Original" / "2.tif"
    tifffile.imwrite(grey, rgb_image(16, 16)[..., 0])
    with pytest.raises(DataError, match="decoded as 1 channel, expected 3-channel RGB") as error:
        load_dataset("cvc", tmp_path, image_size=16)
    assert str(grey) in str(error.value)


def test_cvc_png_layout(tmp_path):
    for frame in (5, 40, 3):
        save(tmp_path / "PNG" / "Original" / f"{frame}.png", rgb_image(24, 32, seed=frame))
        save(tmp_path / "PNG" / "Ground Truth" / f"{frame}.png", disk_mask(24, 32) * 255)
    ds = load_dataset("cvc", tmp_path, image_size=16)
    assert ds.names == ["3", "5", "40"] and ds.groups.tolist() == [0, 0, 1]
    assert ds.images.shape == (3, 16, 16, 3) and set(np.unique(ds.masks)) == {0, 1}


def test_cvc_images_masks_layout_with_mixed_formats(tmp_path):
    image, mask = rgb_image(16, 16), disk_mask(16, 16)
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "100.tif", image, photometric="rgb")
    save(tmp_path / "images" / "580.png", image)
    save(tmp_path / "images" / "612.jpg", image, quality=95)
    for frame in (100, 580, 612):
        save(tmp_path / "masks" / f"{frame}.png", mask * 255)
    ds = load_dataset("cvc", tmp_path, image_size=16)
    assert ds.names == ["100", "580", "612"] and ds.groups.tolist() == [4, 27, 28]
    np.testing.assert_array_equal(ds.images[0], image)
    np.testing.assert_array_equal(ds.images[1], image)
    assert np.abs(ds.images[2].astype(int) - image).mean() < 6
    assert all(np.array_equal(m, mask) for m in ds.masks)


def test_cvc_sequence_csv_overrides_official_ranges(tmp_path):
    write_cvc_tiff(tmp_path, [1, 2, 700])
    csv = tmp_path / "sequences.csv"
    csv.write_text("frame,sequence\n1,video_b\n2,video_a\n700,video_b\n999,video_c\n")
    ds = load_dataset("cvc", tmp_path, image_size=16, sequence_csv=str(csv))
    assert ds.names == ["1", "2", "700"] and ds.groups.tolist() == [1, 0, 1] and ds.n_groups == 2


def test_cvc_frame_outside_official_range_needs_csv(tmp_path):
    write_cvc_tiff(tmp_path, [1, 700])
    with pytest.raises(DataError, match=r"1\.\.612.*\[700\].*sequence_csv"):
        load_dataset("cvc", tmp_path, image_size=16)


# ---------------------------------------------------------------------------------------------
# Video sequences
# ---------------------------------------------------------------------------------------------

def test_official_sequences():
    groups = cvc_sequence_of_frame(range(1, 613))
    assert groups.dtype == np.int64 and groups[0] == 0 and groups[-1] == 28
    sizes = np.bincount(groups)
    assert len(sizes) == 29 and sizes.sum() == 612
    assert sizes[:4].tolist() == [25, 25, 17, 11] and sizes[-1] == 21  # 1-25, 26-50, 51-67, 68-78 ... 592-612
    assert cvc_sequence_of_frame([25, 26, 205, 206]).tolist() == [0, 1, 9, 10]
    assert np.all(np.diff(groups) >= 0)


@pytest.mark.parametrize("frames", [[0], [613], [5, -1]])
def test_frame_outside_range_without_csv(frames):
    with pytest.raises(DataError, match="1..612"):
        cvc_sequence_of_frame(frames)


@pytest.mark.parametrize(
    "content, message",
    [
        ("frame,sequence\n1,0\n", r"no row for frame\(s\) \[2\]"),
        ("frame,video\n1,0\n2,0\n", "needs the header 'frame,sequence'"),
        ("frame,sequence\n1,0\n1,1\n2,1\n", r"lists frame\(s\) \[1\] more than once"),
        ("frame,sequence\none,0\n2,1\n", "column 'frame' must hold frame numbers"),
    ],
)
def test_bad_sequence_csv_is_named(tmp_path, content, message):
    csv = tmp_path / "sequences.csv"
    csv.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        cvc_sequence_of_frame([1, 2], csv)
    assert str(csv) in str(error.value)


def test_missing_sequence_csv_is_named(tmp_path):
    with pytest.raises(DataError, match="cannot read sequence CSV") as error:
        cvc_sequence_of_frame([1], tmp_path / "absent.csv")
    assert "absent.csv" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="unknown dataset 'isic'.*synthetic, kvasir, cvc"):
        load_dataset("isic", "/nowhere")
    assert DATASETS == ("synthetic", "kvasir", "cvc")


def test_bad_arguments():
    with pytest.raises(DataError, match="image_size must be at least 8, got 4"):
        load_dataset("synthetic", image_size=4)
    with pytest.raises(DataError, match="needs root"):
        load_dataset("kvasir")
    with pytest.raises(DataError, match="sequence_csv only applies to the 'cvc' dataset"):
        load_dataset("kvasir", "/nowhere", sequence_csv="x.csv")


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DataError, match="root folder not found") as error:
        load_dataset("kvasir", tmp_path / "absent")
    assert str(tmp_path / "absent") in str(error.value)


def test_missing_or_empty_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="image folder not found") as error:
        load_dataset("kvasir", tmp_path)
    assert str(tmp_path / "images") in str(error.value)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no images found in") as error:
        load_dataset("kvasir", tmp_path)
    assert str(tmp_path / "images") in str(error.value)
    save(tmp_path / "images" / "a.jpg", rgb_image(8, 8))
    with pytest.raises(DataError, match="mask folder not found") as error:
        load_dataset("kvasir", tmp_path)
    assert str(tmp_path / "masks") in str(error.value)


def test_missing_mask_is_named(tmp_path):
    kvasir_folder(tmp_path)
    (tmp_path / "masks" / "b.jpg").unlink()
    with pytest.raises(DataError, match="no mask for image") as error:
        load_dataset("kvasir", tmp_path, image_size=16)
    assert str(tmp_path / "images" / "b.jpg") in str(error.value)
    assert "1 of 3 images" in str(error.value)


def test_mask_size_mismatch_gives_both_sizes_and_paths(tmp_path):
    kvasir_folder(tmp_path)
    save(tmp_path / "masks" / "b.jpg", np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError) as error:
        load_dataset("kvasir", tmp_path, image_size=16)
    message = str(error.value)
    for part in ("20x20", "40x30", str(tmp_path / "masks" / "b.jpg"), str(tmp_path / "images" / "b.jpg")):
        assert part in message


@pytest.mark.parametrize("corruption", ["random bytes", "truncated", "empty"])
def test_corrupt_jpeg_is_named(tmp_path, corruption):
    # Large and noisy, so that its headers survive the truncation (cv2.imread would then return
    # it with a grey bottom).
    noisy = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    path = tmp_path / "images" / "t.jpg"
    save(path, noisy, quality=90)
    save(tmp_path / "masks" / "t.jpg", disk_mask(128, 128) * 255)
    content = path.read_bytes()
    broken = {
        "random bytes": np.random.default_rng(0).bytes(2000),
        "truncated": content[: len(content) * 7 // 10],
        "empty": b"",
    }
    path.write_bytes(broken[corruption])
    with pytest.raises(DataError, match="cannot decode") as error:
        load_dataset("kvasir", tmp_path, image_size=16)
    assert str(path) in str(error.value)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, the last reader, warns first
def test_corrupt_tiff_is_named(tmp_path):
    write_cvc_tiff(tmp_path, [1, 2])
    path = tmp_path / "Ground Truth" / "2.tif"
    path.write_bytes(b"II*\x00" + np.random.default_rng(0).bytes(500))
    with pytest.raises(DataError, match="cannot decode") as error:
        load_dataset("cvc", tmp_path, image_size=16)
    assert str(path) in str(error.value)


def test_bad_cvc_layouts(tmp_path):
    with pytest.raises(DataError, match="no CVC-ClinicDB image folder.*Original/ \\+ Ground Truth/") as error:
        load_dataset("cvc", tmp_path)
    assert str(tmp_path) in str(error.value)
    write_cvc_tiff(tmp_path, [1])
    tifffile.imwrite(tmp_path / "Original" / "frame_2.tif", rgb_image(16, 16), photometric="rgb")
    with pytest.raises(DataError, match="must be named <frame number>.<ext>, found 'frame_2'"):
        load_dataset("cvc", tmp_path)


def test_two_files_with_one_stem(tmp_path):
    kvasir_folder(tmp_path)
    save(tmp_path / "images" / "a.png", rgb_image(8, 8))
    with pytest.raises(DataError, match="two files with the stem 'a'") as error:
        load_dataset("kvasir", tmp_path)
    assert str(tmp_path / "images") in str(error.value)


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------

def test_synthetic_shapes_and_determinism():
    start = time.perf_counter()
    ds = make_synthetic(96, 64, seed=3)
    assert time.perf_counter() - start < 1.0
    assert ds.name == "synthetic" and len(ds) == 96
    assert ds.images.shape == (96, 64, 64, 3) and ds.images.dtype == np.uint8
    assert ds.masks.shape == (96, 64, 64) and ds.masks.dtype == np.uint8
    assert set(np.unique(ds.masks)) == {0, 1}
    assert ds.groups.tolist() == list(range(96)) and ds.n_groups == 96 and len(set(ds.names)) == 96
    again = make_synthetic(96, 64, seed=3)
    assert np.array_equal(ds.images, again.images) and np.array_equal(ds.masks, again.masks)
    other = make_synthetic(96, 64, seed=4)
    assert not np.array_equal(ds.masks, other.masks)
    via_loader = load_dataset("synthetic", "ignored/root", image_size=64, n_synthetic=96, seed=3)
    assert np.array_equal(ds.images, via_loader.images)


def test_synthetic_spread_of_difficulty():
    ds = make_synthetic(96, 64, seed=0)
    area = ds.masks.mean(axis=(1, 2))
    assert (area == 0).sum() == 5  # round(5 % of 96)
    lesion = area[area > 0]
    assert lesion.min() < 0.02 and lesion.max() > 0.2
    # Contrast: luminance inside minus outside, relative to the background, spans a wide range.
    grey = ds.images.astype(np.float64).mean(axis=-1)
    with_lesion = np.flatnonzero(area > 0.01)
    contrast = np.array(
        [abs(grey[i][ds.masks[i] == 1].mean() - grey[i][ds.masks[i] == 0].mean()) / grey[i][ds.masks[i] == 0].mean()
         for i in with_lesion]
    )
    assert contrast.min() < 0.05 and contrast.max() > 0.2
    # Noise: the spread of the difference between horizontal neighbours varies across images.
    roughness = np.diff(grey, axis=2).std(axis=(1, 2))
    assert roughness.max() > 2.5 * roughness.min()
    # Reddish-pink: red dominates green and blue on average.
    means = ds.images.reshape(-1, 3).mean(axis=0)
    assert means[0] > means[1] and means[0] > means[2]


def test_synthetic_generator_lives_in_its_own_module():
    """The generator is polydice.synthetic's alone; data.py loads it by name and keeps no copy of
    it, nor of the dataset names."""
    assert make_synthetic.__module__ == "polydice.synthetic"
    assert not hasattr(data, "make_synthetic") and not hasattr(data, "_render_synthetic")
    assert data.DATASETS is config.DATASETS
    assert synthetic.make_synthetic(3, 16, seed=0).name == "synthetic"


def test_synthetic_at_other_sizes():
    for size in (8, 100):
        ds = make_synthetic(7, size, seed=1)
        assert ds.images.shape == (7, size, size, 3) and ds.masks.shape == (7, size, size)
    with pytest.raises(DataError, match="n must be >= 1"):
        make_synthetic(0)


# ---------------------------------------------------------------------------------------------
# Folds
# ---------------------------------------------------------------------------------------------

def check_fold_structure(folds, groups):
    n = len(groups)
    tests = np.concatenate([test for _, _, test in folds])
    assert np.array_equal(np.sort(tests), np.arange(n)), "test parts must partition the images"
    for train, val, test in folds:
        for part in (train, val, test):
            assert part.dtype == np.int64 and np.all(np.diff(part) > 0) and len(part) > 0
        assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(n))
        train_groups, val_groups, test_groups = (set(groups[part]) for part in (train, val, test))
        assert not (train_groups & val_groups) and not (train_groups & test_groups) and not (val_groups & test_groups)


def test_kfold_when_every_image_is_its_own_group():
    groups = np.arange(50)
    folds = make_folds(groups, n_folds=5, seed=7)
    assert len(folds) == 5
    check_fold_structure(folds, groups)
    expected = [np.sort(test) for _, test in KFold(5, shuffle=True, random_state=7).split(groups)]
    for (train, val, test), reference in zip(folds, expected):
        assert np.array_equal(test, reference)
        assert len(val) == 8  # 20 % of the 40 training images
    assert all(np.array_equal(a, b) for fa, fb in zip(folds, make_folds(groups, 5, seed=7)) for a, b in zip(fa, fb))
    other = make_folds(groups, 5, seed=8)
    assert any(not np.array_equal(fa[2], fb[2]) for fa, fb in zip(folds, other))


def test_group_kfold_never_splits_a_cvc_sequence():
    groups = cvc_sequence_of_frame(range(1, 613))
    folds = make_folds(groups, n_folds=5, seed=0)
    check_fold_structure(folds, groups)
    test_sequences = [set(groups[test]) for _, _, test in folds]
    assert sorted(s for part in test_sequences for s in part) == list(range(29))  # each sequence tested once
    for train, val, test in folds:
        val_share = len(set(groups[val])) / (len(set(groups[train])) + len(set(groups[val])))
        assert 0.1 < val_share < 0.35
    again = make_folds(groups, n_folds=5, seed=0)
    assert all(np.array_equal(a, b) for fa, fb in zip(folds, again) for a, b in zip(fa, fb))


def test_fold_errors():
    with pytest.raises(DataError, match="cannot make 5 folds from 3 groups"):
        make_folds([0, 0, 1, 1, 2, 2], n_folds=5)
    with pytest.raises(DataError, match="n_folds must be >= 2"):
        make_folds(np.arange(10), n_folds=1)
    with pytest.raises(DataError, match="val_fraction must be in"):
        make_folds(np.arange(10), val_fraction=0.0)
    with pytest.raises(DataError, match="too few to hold out"):
        make_folds([0, 0, 1, 1], n_folds=2)  # each training part is a single sequence


# ---------------------------------------------------------------------------------------------
# Datasets and loaders
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_data():
    return make_synthetic(24, 16, seed=0)


def all_batches(loader, epochs=2):
    return [[tensor.clone() for tensor in batch] for _ in range(epochs) for batch in loader]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))


def test_loader_batches_without_augmentation(small_data):
    indices = np.array([3, 1, 4, 15, 9, 2, 6])
    loader = make_loader(small_data, indices, batch_size=4, shuffle=False)
    images, masks, index = next(iter(loader))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert masks.shape == (4, 16, 16) and masks.dtype == torch.uint8
    assert index.dtype == torch.int64 and index.tolist() == [3, 1, 4, 15]
    assert torch.equal(images[0], torch.from_numpy(small_data.images[3]).permute(2, 0, 1))
    assert torch.equal(masks[2], torch.from_numpy(small_data.masks[4]))
    images[0].zero_()  # a batch is a copy, never a view of the dataset
    assert small_data.images[3].any()
    batches = list(make_loader(small_data, indices, batch_size=4, shuffle=True, drop_last=True))
    assert len(batches) == 1 and len(batches[0][2]) == 4
    seen = torch.cat([b[2] for b in make_loader(small_data, indices, batch_size=3, shuffle=True)])
    assert sorted(seen.tolist()) == sorted(indices.tolist())


def test_augmentation_moves_image_and_mask_together(small_data):
    indices = np.arange(len(small_data))
    augmented = 0
    loader = make_loader(small_data, indices, 8, shuffle=True, transform=build_augmentation(), seed=1)
    for images, masks, index in loader:
        for image, mask, i in zip(images.numpy(), masks.numpy(), index.tolist()):
            original_image = small_data.images[i].transpose(2, 0, 1).astype(float)
            flips = [lambda a: a, lambda a: a[..., ::-1], lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, ::-1]]
            matches = [flip for flip in flips if np.array_equal(flip(small_data.masks[i]), mask)]
            assert matches, "the mask must be a flip of the original mask"
            assert any(np.corrcoef(flip(original_image).ravel(), image.ravel())[0, 1] > 0.9 for flip in matches)
            augmented += not np.array_equal(image, small_data.images[i].transpose(2, 0, 1))
    assert augmented > len(indices) // 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_is_reproducible_for_a_seed(small_data, num_workers):
    indices = np.arange(20)

    def run(seed, transform_seed=None):
        transform = build_augmentation(transform_seed)
        loader = make_loader(
            small_data, indices, 4, shuffle=True, transform=transform, seed=seed, num_workers=num_workers
        )
        return all_batches(loader, epochs=2)

    first = run(seed=5)
    assert same_batches(first, run(seed=5))
    assert same_batches(first, run(seed=5, transform_seed=123))  # the loader's seed rules
    assert not same_batches(first, run(seed=6))
    # Epochs differ in order and augmentation.
    half = len(first) // 2
    assert not same_batches(first[:half], first[half:])


def test_loader_augmentation_differs_between_epochs_without_shuffling(small_data):
    transform = build_augmentation()
    loader = make_loader(small_data, np.arange(8), 8, shuffle=False, transform=transform, seed=0, num_workers=2)
    epoch_1, epoch_2 = all_batches(loader, epochs=2)
    assert torch.equal(epoch_1[2], epoch_2[2]) and not torch.equal(epoch_1[0], epoch_2[0])


def test_loader_leaves_the_callers_transform_alone(small_data):
    transform = build_augmentation(seed=9)
    make_loader(small_data, np.arange(4), 2, shuffle=False, transform=transform, seed=0)
    image, mask = small_data.images[0], small_data.masks[0]
    outputs = [transform(image=image, mask=mask)["image"] for _ in range(6)]
    reference = build_augmentation(seed=9)
    assert all(np.array_equal(out, reference(image=image, mask=mask)["image"]) for out in outputs)


def test_dataset_checks_indices(small_data):
    dataset = SegmentationDataset(small_data, [0, 23])
    assert len(dataset) == 2 and dataset[1][2] == 23 and isinstance(dataset[1][2], int)
    with pytest.raises(DataError, match=r"indices must lie in \[0, 24\)"):
        SegmentationDataset(small_data, [0, 24])
    with pytest.raises(DataError, match="1-D integer"):
        SegmentationDataset(small_data, [[0, 1]])
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        make_loader(small_data, [0], 0, shuffle=False)


# ---------------------------------------------------------------------------------------------
# The real Kvasir-SEG release (optional)
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(
    not (KVASIR_DIR / "images").is_dir(), reason=f"Kvasir-SEG not found at {KVASIR_DIR} (set POLYDICE_KVASIR_DIR)"
)
def test_real_kvasir_release():
    start = time.perf_counter()
    ds = load_dataset("kvasir", KVASIR_DIR, image_size=64, num_workers=2)
    seconds = time.perf_counter() - start
    assert len(ds) == 1000 and ds.images.shape == (1000, 64, 64, 3) and ds.n_groups == 1000
    assert ds.names == sorted(ds.names) and len(set(ds.names)) == 1000
    assert set(np.unique(ds.masks)) == {0, 1}
    area = ds.masks.mean(axis=(1, 2))
    assert area.min() > 0, "the release has no empty masks"
    assert 0.12 < area.mean() < 0.18  # about 15 % polyp
    assert ds.images.std() > 20
    assert seconds < 60, f"loading took {seconds:.1f} s"
