"""``python -m polydice.predict``: agreement with the training code's test metrics, ensembling,
thresholds, outputs at the image's own size, dataset layouts, and the answers to bad input.

One tiny model is trained on the synthetic set (32 px, 4 base channels, 2 epochs); the other
tests use untrained U-Nets, whose predictions are as good as any for checking the plumbing.
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import polydice.train as pt
from polydice.config import TrainConfig
from polydice.metrics import segmentation_metrics
from polydice.model import UNet, load_model_file, save_model_file
from polydice.predict import ARRAYS, CSV_COLUMNS, Ensemble, PredictError, load_ensemble, main
from polydice.uncertainty import difficulty_scores, mc_samples_of, mutual_information

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def _config(**extra) -> dict:
    values = dict(dataset="synthetic", n_synthetic=40, image_size=SIZE, base_channels=4, batch_size=8,
                  epochs=2, mc_samples=2, method="dice", tensorboard=False)
    values.update(extra)
    return TrainConfig(**values).to_dict()


def _untrained(path: Path, seed: int, threshold: float = 0.5, **config) -> Path:
    """A model.pt of an untrained U-Net whose output layer is scaled up, so that its probabilities
    spread (about 0.25-0.65) and dropout moves them (mutual information up to about 0.05)."""
    torch.manual_seed(seed)
    model = UNet(3, 2, 4, 0.5)
    with torch.no_grad():
        model.outc.weight *= 100.0
    save_model_file(path, model.state_dict(), _config(**config), epoch=1, val_dice=0.5, threshold=threshold)
    return path


def _save_rgb(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return image


def _predict(capsys, *args) -> tuple[int, str, str]:
    code = main([*map(str, args), "--mc-samples", "3", "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rows(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A trained run folder and its held-out test images saved as PNG at the training size."""
    root = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig.from_dict(_config())
    data = pt.load_data(cfg)
    result = pt.train(cfg, data=data, out_dir=root / "run")
    images = root / "test_images"
    images.mkdir()
    for index, name in zip(result.per_image["index"], result.per_image["name"]):
        Image.fromarray(data.images[index]).save(images / f"{name}.png")
    return root / "run", images, data, result.per_image


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    for i in range(3):
        _save_rgb(folder / f"img{i}.png", SIZE, SIZE, seed=i)
    return folder


# ============================================================================ agreement with training


def test_masks_give_the_training_codes_test_dice(trained_run, tmp_path, capsys):
    run, images, data, per_image = trained_run
    code, out_text, err = _predict(capsys, "--model", run, "--images", images, "--out", tmp_path / "out")
    assert code == 0, err
    assert "wrote 8 predictions" in out_text or f"wrote {len(per_image)} predictions" in out_text
    names = list(per_image["name"])
    masks = np.stack([_png(tmp_path / "out" / "masks" / f"{name}.png") for name in names])
    assert set(np.unique(masks)) <= {0, 255}
    dice = segmentation_metrics(torch.from_numpy(masks > 127), torch.from_numpy(data.masks[per_image["index"]]))["dice"]
    np.testing.assert_allclose(dice.numpy(), per_image["dice"].to_numpy(), rtol=0, atol=1e-12)
    rows = _rows(tmp_path / "out")
    assert [row["image"] for row in rows] == sorted(f"{name}.png" for name in names)
    assert list(rows[0]) == list(CSV_COLUMNS)
    for row in rows:
        mask = _png(tmp_path / "out" / "masks" / row["image"]) > 127
        assert int(row["area"]) == mask.sum() and float(row["threshold"]) == 0.5
        assert 0 <= float(row["mean_probability"]) <= 1 and 0 <= float(row["mean_mi"]) <= math.log(2)


def test_the_runs_model_file_holds_its_selected_weights(trained_run):
    run, _, _, _ = trained_run
    _, info = load_model_file(run / "model.pt")
    assert info["config"]["image_size"] == SIZE and 0.05 <= info["threshold"] <= 0.95


# ============================================================================ outputs


def test_outputs_have_the_images_own_size(tmp_path, capsys):
    model = _untrained(tmp_path / "run" / "model.pt", seed=0)
    images = tmp_path / "images"
    _save_rgb(images / "wide.png", 40, 56, seed=1)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (75, 45, 3), dtype=np.uint8)).save(images / "tall.jpg")
    code, _, err = _predict(capsys, "--model", model, "--images", images, "--out", tmp_path / "out",
                            "--save-arrays", "--threshold", "0.3")
    assert code == 0, err
    rows = {row["image"]: row for row in _rows(tmp_path / "out")}
    for name, (h, w) in {"wide": (40, 56), "tall": (75, 45)}.items():
        out = tmp_path / "out"
        mask = _png(out / "masks" / f"{name}.png")
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert _png(out / "uncertainty" / f"{name}.png").shape == (h, w, 3)
        assert _png(out / "overlay" / f"{name}.png").shape == (h, w, 3)
        arrays = {key: np.load(out / "arrays" / f"{name}_{key}.npy") for key in ARRAYS}
        for key, array in arrays.items():
            assert array.shape == (h, w) and array.dtype == np.float16, key
        row = rows[f"{name}.png" if name == "wide" else f"{name}.jpg"]
        assert (int(row["height"]), int(row["width"])) == (h, w)
        assert int(row["area"]) == (mask > 127).sum() > 0
        np.testing.assert_allclose(float(row["mean_probability"]), arrays["probability"].astype(np.float64).mean(),
                                   rtol=1e-3)
        mi = torch.from_numpy(arrays["mutual_information"].astype(np.float64))[None]
        expected = difficulty_scores(mi, torch.from_numpy(mask > 127)[None].to(torch.uint8))
        np.testing.assert_allclose(float(row["difficulty"]), float(expected[0]), rtol=1e-2, atol=1e-9)


def test_uncertainty_map_uses_the_fixed_scale_zero_to_ln2():
    from polydice.predict import uncertainty_colours

    colours = uncertainty_colours(np.array([[0.0, math.log(2) / 2, math.log(2), 5.0]], dtype=np.float32))
    assert tuple(colours[0, 0]) == (0, 0, 3) or colours[0, 0].max() < 8  # magma starts black
    assert np.array_equal(colours[0, 2], colours[0, 3])  # clipped at ln 2
    assert colours[0, 2].sum() > colours[0, 1].sum() > colours[0, 0].sum()


# ============================================================================ ensembles and thresholds


def _tune_experiment(root: Path) -> Path:
    """A Ray Tune experiment folder: one trial per fold, model.pt copies in checkpoint folders."""
    a = _untrained(root / "trial_a" / "model.pt", seed=1, fold=0, method="adaptive", tag="adaptive-tuned",
                   threshold=0.3)
    (root / "trial_a" / "checkpoint_000001").mkdir()
    shutil.copy(a, root / "trial_a" / "checkpoint_000001" / "model.pt")
    # Trial b only has copies in its checkpoints (the last one is its model).
    _untrained(root / "trial_b" / "checkpoint_000001" / "model.pt", seed=99, fold=1, method="adaptive",
               tag="adaptive-tuned", threshold=0.9)
    _untrained(root / "trial_b" / "checkpoint_000002" / "model.pt", seed=2, fold=1, method="adaptive",
               tag="adaptive-tuned", threshold=0.6)
    return root


def test_ensemble_takes_one_model_per_trial_and_averages_probabilities(tmp_path):
    experiment = _tune_experiment(tmp_path / "exp")
    ensemble = load_ensemble(experiment)
    assert len(ensemble.models) == 2 and ensemble.label == "adaptive-tuned"
    assert [p.relative_to(experiment).as_posix() for p in ensemble.paths] == [
        "trial_a/model.pt", "trial_b/checkpoint_000002/model.pt"]
    assert ensemble.threshold == pytest.approx(0.45)

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8))
    members = [Ensemble([m], [i], [p], "one") for m, i, p in zip(ensemble.models, ensemble.infos, ensemble.paths)]
    mean = (members[0].probabilities(x) + members[1].probabilities(x)) / 2
    torch.testing.assert_close(ensemble.probabilities(x), mean, rtol=0, atol=1e-7)

    # Pooled MC statistics equal those of all 2T samples together (same seeded dropout masks).
    maps = ensemble.uncertainty(x, mc_samples=4, seed=3)
    inputs = x.permute(0, 3, 1, 2).float() / 255
    samples = torch.cat([mc_samples_of(m, inputs, 4, seed=3) for m in ensemble.models])  # 2T, B, H, W
    torch.testing.assert_close(maps["mutual_information"], mutual_information(samples), rtol=0, atol=2e-6)
    torch.testing.assert_close(maps["variance"], samples.var(0, unbiased=False), rtol=0, atol=2e-6)


def test_ensemble_prediction_writes_the_mean_probability(tmp_path, image_dir, capsys):
    experiment = _tune_experiment(tmp_path / "exp")
    arrays = {}
    for name, model in [("a", experiment / "trial_a"), ("b", experiment / "trial_b" / "checkpoint_000002"),
                        ("both", experiment)]:
        code, out_text, err = _predict(capsys, "--model", model, "--images", image_dir, "--out", tmp_path / name,
                                       "--save-arrays")
        assert code == 0, err
        arrays[name] = np.load(tmp_path / name / "arrays" / "img0_probability.npy").astype(np.float32)
    assert "ensemble of 2 adaptive-tuned models" in out_text
    np.testing.assert_allclose(arrays["both"], (arrays["a"] + arrays["b"]) / 2, atol=1e-3)


def test_threshold_auto_uses_the_stored_threshold(tmp_path, image_dir, capsys):
    model = _untrained(tmp_path / "run" / "model.pt", seed=0, threshold=0.45)
    x = torch.from_numpy(np.stack([_png(image_dir / f"img{i}.png") for i in range(3)]))
    probs = load_ensemble(model).probabilities(x).numpy()
    assert probs.min() < 0.45 < probs.max()
    for arg, threshold in [("auto", 0.45), (None, 0.5), ("0.2", 0.2)]:
        out = tmp_path / f"out-{arg}"
        code, _, err = _predict(capsys, "--model", model, "--images", image_dir, "--out", out,
                                *(["--threshold", arg] if arg else []))
        assert code == 0, err
        for i, row in enumerate(_rows(out)):
            assert float(row["threshold"]) == pytest.approx(threshold)
            assert np.array_equal(_png(out / "masks" / f"img{i}.png") > 127, probs[i] > threshold)
    # An ensemble's auto threshold is the mean of its members' thresholds.
    experiment = _tune_experiment(tmp_path / "exp")
    code, _, err = _predict(capsys, "--model", experiment, "--images", image_dir, "--out", tmp_path / "ens",
                            "--threshold", "auto")
    assert code == 0, err
    assert all(float(row["threshold"]) == pytest.approx(0.45) for row in _rows(tmp_path / "ens"))


def test_several_methods_need_method_and_the_error_lists_them(tmp_path, image_dir, capsys):
    grid = tmp_path / "grid"
    for fold in (0, 1):
        _untrained(grid / f"dice_{fold}" / "model.pt", seed=fold, fold=fold, method="dice", tag="dice")
        _untrained(grid / f"eps_{fold}" / "model.pt", seed=10 + fold, fold=fold, method="polydice", eps=0.2)
    code, _, err = _predict(capsys, "--model", grid, "--images", image_dir, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert "--method" in err and "dice" in err and "polydice-eps+0.2" in err
    code, out_text, err = _predict(capsys, "--model", grid, "--images", image_dir, "--out", tmp_path / "out",
                                   "--method", "polydice-eps+0.2")
    assert code == 0, err
    assert "ensemble of 2 polydice-eps+0.2 models" in out_text
    code, _, err = _predict(capsys, "--model", grid, "--images", image_dir, "--out", tmp_path / "out",
                            "--method", "focal")
    assert code == 2 and "choices: dice, polydice-eps+0.2" in err


def test_two_models_of_one_fold_are_not_ensembled(tmp_path, image_dir, capsys):
    search = tmp_path / "search"
    for trial in range(2):
        _untrained(search / f"trial_{trial}" / "model.pt", seed=trial, fold=0, method="adaptive")
    code, _, err = _predict(capsys, "--model", search, "--images", image_dir, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fold 0" in err


# ============================================================================ layouts


def test_dataset_layouts_are_read_like_training(tmp_path, capsys):
    model = _untrained(tmp_path / "model.pt", seed=0)
    kvasir = tmp_path / "kvasir"
    _save_rgb(kvasir / "images" / "a.jpg", 48, 40, seed=0)
    _save_rgb(kvasir / "masks" / "a.jpg", 48, 40, seed=1)
    cvc = tmp_path / "cvc"
    (cvc / "Original").mkdir(parents=True)
    (cvc / "Ground Truth").mkdir()
    rgb = np.random.default_rng(3).integers(0, 256, (3, 36, 44), dtype=np.uint8)
    tifffile.imwrite(cvc / "Original" / "1.tif", rgb, planarconfig="separate")  # planar RGB, as CVC's TIFFs
    for root, name, (h, w) in [(kvasir, "a", (48, 40)), (cvc, "1", (36, 44))]:
        code, _, err = _predict(capsys, "--model", model, "--images", root, "--out", tmp_path / f"out-{root.name}")
        assert code == 0, err
        assert [row["image"] for row in _rows(tmp_path / f"out-{root.name}")] == [f"{name}{'.jpg' if root is kvasir else '.tif'}"]
        assert _png(tmp_path / f"out-{root.name}" / "masks" / f"{name}.png").shape == (h, w)


# ============================================================================ bad input


def test_unreadable_and_non_image_files_are_named_and_skipped(tmp_path, image_dir, capsys):
    model = _untrained(tmp_path / "model.pt", seed=0)
    (image_dir / "broken.png").write_bytes(b"\x89PNG not really")
    (image_dir / "notes.txt").write_text("not an image")
    (image_dir / ".hidden").write_text("ignored")
    code, out_text, err = _predict(capsys, "--model", model, "--images", image_dir, "--out", tmp_path / "out")
    assert code == 1
    lines = err.strip().splitlines()
    assert len([line for line in lines if "broken.png" in line]) == 1
    assert len([line for line in lines if "notes.txt" in line]) == 1
    assert "2 of 5 files skipped" in lines[-1] and ".hidden" not in err
    assert [row["image"] for row in _rows(tmp_path / "out")] == ["img0.png", "img1.png", "img2.png"]
    for i in range(3):
        assert (tmp_path / "out" / "masks" / f"img{i}.png").is_file()


def _single_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def test_empty_or_missing_image_folder_is_one_error(tmp_path, capsys):
    model = _untrained(tmp_path / "model.pt", seed=0)
    (tmp_path / "empty").mkdir()
    _single_error(*_predict(capsys, "--model", model, "--images", tmp_path / "empty", "--out", tmp_path / "o")[::2],
                  "no images", "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    _single_error(*_predict(capsys, "--model", model, "--images", tmp_path / "text", "--out", tmp_path / "o")[::2],
                  "no images")
    _single_error(*_predict(capsys, "--model", model, "--images", tmp_path / "nowhere", "--out", tmp_path / "o")[::2],
                  "nowhere")
    assert not (tmp_path / "o").exists()


def test_missing_corrupt_or_foreign_model_is_one_error(tmp_path, image_dir, capsys):
    out = tmp_path / "out"
    _single_error(*_predict(capsys, "--model", tmp_path / "none.pt", "--images", image_dir, "--out", out)[::2],
                  "none.pt")
    (tmp_path / "empty_results").mkdir()
    _single_error(*_predict(capsys, "--model", tmp_path / "empty_results", "--images", image_dir, "--out", out)[::2],
                  "no model.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 10)
    _single_error(*_predict(capsys, "--model", tmp_path / "corrupt.pt", "--images", image_dir, "--out", out)[::2],
                  "corrupt.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    _single_error(*_predict(capsys, "--model", tmp_path / "other.pt", "--images", image_dir, "--out", out)[::2],
                  "other.pt", "not a polydice model file")
    # Weights of a 4-channel U-Net under a config that says 8 channels: another architecture.
    save_model_file(tmp_path / "arch.pt", UNet(3, 2, 4, 0.5).state_dict(), _config(base_channels=8),
                    epoch=1, val_dice=0.5)
    _single_error(*_predict(capsys, "--model", tmp_path / "arch.pt", "--images", image_dir, "--out", out)[::2],
                  "arch.pt", "do not fit")


def test_command_line_help_states_the_colour_scale():
    result = subprocess.run([sys.executable, "-m", "polydice.predict", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "magma" in text and "ln 2" in text and "--threshold" in text and "auto" in text


def test_seed_replicates_of_one_fold_are_ensembled(tmp_path, image_dir, capsys):
    # A study's final runs with --seeds 2: two models per fold, equal but for the seed.
    def replicate(path: Path, fold: int, seed: int, **config) -> None:
        _untrained(path, seed=10 * fold + seed)
        model, _ = load_model_file(path)
        save_model_file(path, model.state_dict(), _config(fold=fold, seed=seed, method="adaptive",
                                                          tag="adaptive-tuned", **config),
                        epoch=1, val_dice=0.5, threshold=0.5)

    final = tmp_path / "final"
    for fold in range(2):
        for seed in range(2):
            replicate(final / f"trial_{fold}_{seed}" / "model.pt", fold, seed)
    assert len(load_ensemble(final).models) == 4
    code, _, err = _predict(capsys, "--model", final, "--images", image_dir, "--out", tmp_path / "out")
    assert code == 0, err
    # A fold whose two models differ in more than the seed (a search's trials) is still refused.
    replicate(final / "trial_0_9" / "model.pt", 0, 9, k=3.0)
    with pytest.raises(PredictError, match="not seed replicates"):
        load_ensemble(final)
