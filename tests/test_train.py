"""The training function end to end: outputs, the ε schedule, determinism, resume, learning,
a non-finite loss, and the command line's answers to bad input.

Runs are tiny (32 px, 4–8 base channels, a few epochs) so that the module takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import polydice.checkpoint as ck
import polydice.evaluate as ev
import polydice.train as pt
from polydice.config import DATASETS, METHODS, SCALES, TrainConfig
from polydice.data import load_dataset
from polydice.dataset import make_folds
from polydice.device import Hardware, resolve_device, seed_everything
from polydice.losses import foreground_probs
from polydice.metrics import all_metrics
from polydice.model import UNet, load_model_file, to_input

import ray_fixtures as rf

REPO = Path(__file__).resolve().parents[1]
TEST_KEYS = ("test_dice", "test_iou", "test_precision", "test_recall", "test_nsd", "test_nll", "test_brier",
             "test_dice_hardest_quartile", "val_dice")


def _config(**extra) -> TrainConfig:
    values = dict(dataset="synthetic", n_synthetic=40, image_size=32, base_channels=4, batch_size=8,
                  epochs=3, e0=2, tau=1, mc_samples=3, method="adaptive", log_maps=2)
    values.update(extra)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def synthetic_32():
    cfg = _config()
    return pt.load_data(cfg)


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory, synthetic_32):
    out = tmp_path_factory.mktemp("adaptive")
    return pt.train(_config(), data=synthetic_32, out_dir=out), out


# ============================================================================ outputs


def test_summary_has_every_metric_and_the_resolved_config(adaptive_run):
    result, out = adaptive_run
    summary = json.loads((out / "summary.json").read_text())
    for key in TEST_KEYS:
        assert np.isfinite(summary[key]), key
        assert 0.0 <= summary[key] or key in ("test_nll",), key
    assert TrainConfig.from_dict(summary["config"]) == _config()
    assert summary["refresh_epochs"] == [2, 3]
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == summary["dataset_size"] == 40


def test_epsilon_csv_is_per_image_inside_the_range_after_each_refresh(adaptive_run):
    result, out = adaptive_run
    eps = pd.read_csv(out / "epsilon.csv")
    assert list(eps.columns) == ["epoch", "index", "difficulty", "epsilon"]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(eps["epoch"].unique()) == [2, 3]
    for _, rows in eps.groupby("epoch"):
        assert len(rows) == summary["n_train"] and rows["index"].is_unique
        assert rows["epsilon"].between(0.0, 0.5).all()
        assert rows["epsilon"].nunique() > len(rows) // 2, "ε is not set per image"
        # ε grows with difficulty: the sigmoid of Eq. 13 is monotone.
        ordered = rows.sort_values("difficulty")
        assert (np.diff(ordered["epsilon"].to_numpy()) >= -1e-6).all()
    history = pd.read_csv(out / "history.csv")
    assert history.loc[history["epoch"] == 1, "eps_mean"].item() == 0.0  # before the first refresh
    assert list(history["refreshed"]) == [False, True, True]


def test_per_image_csv_covers_the_test_part(adaptive_run):
    result, out = adaptive_run
    per_image = pd.read_csv(out / "per_image.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert len(per_image) == summary["n_test"]
    for key in ("dice", "iou", "precision", "recall", "nsd", "nll", "brier", "difficulty"):
        assert per_image[key].notna().all(), key
    assert per_image["dice"].mean() == pytest.approx(summary["test_dice"])


def test_tensorboard_has_the_loss_dice_and_epsilon_histograms(adaptive_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = adaptive_run
    acc = EventAccumulator(str(out), size_guidance={"histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss/train", "dice/val", "epsilon/mean"} <= set(tags["scalars"])
    assert {"epsilon", "difficulty"} <= set(tags["histograms"])
    assert [e.step for e in acc.Histograms("epsilon")] == [2, 3]
    assert tags["images"], "no uncertainty maps"


# ============================================================================ model.pt and the selected epoch


def _val_idx(data, cfg: TrainConfig) -> np.ndarray:
    return make_folds(data.groups, cfg.folds, seed=cfg.split_seed, val_fraction=cfg.val_fraction)[cfg.fold][1]


def test_model_file_holds_the_best_epoch_and_rebuilds_its_validation_dice(adaptive_run, synthetic_32):
    """model.pt loads with weights_only=True; its epoch and validation Dice are the best of the
    history; the model rebuilt from it alone gives that validation Dice again, and at its
    threshold the Dice recorded in summary.json."""
    result, out = adaptive_run
    summary = json.loads((out / "summary.json").read_text())
    payload = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert {"config", "model", "epoch", "val_dice", "threshold"} <= set(payload)
    model, info = load_model_file(out / "model.pt")
    assert TrainConfig.from_dict(info["config"]) == _config()

    history = result.history
    best = history.loc[history["val_dice"].idxmax()]  # the first of equal maxima, as the run keeps it
    assert info["epoch"] == int(best["epoch"]) == summary["best_epoch"] == summary["model_epoch"]
    assert info["val_dice"] == pytest.approx(best["val_dice"], abs=1e-12) == summary["val_dice"]

    assert info["threshold"] in ev.THRESHOLDS and 0.05 <= info["threshold"] <= 0.95
    assert summary["val_threshold"] == info["threshold"]
    # 0.5 is on the grid: the chosen threshold is at least as good on the validation split.
    assert summary["val_dice_at_threshold"] >= summary["val_dice"] - 1e-12

    cfg = _config()
    val_idx, hw = _val_idx(synthetic_32, cfg), Hardware.from_config(cfg)
    val_dice = ev.validation_dice(model, synthetic_32, val_idx, hw, cfg.batch_size)
    assert val_dice == pytest.approx(info["val_dice"], abs=1e-9)
    threshold, dice = ev.validation_threshold(model, synthetic_32, val_idx, hw, cfg.batch_size)
    assert (threshold, dice) == (info["threshold"], pytest.approx(summary["val_dice_at_threshold"], abs=1e-9))


def test_validation_threshold_is_the_best_of_the_grid_nearest_one_half_on_ties(synthetic_32, monkeypatch):
    """Hand-made probabilities: a lesion at 0.3 and background at 0.1 are separated exactly by the
    thresholds 0.1 ... 0.25; of these equal best ones, 0.25 is nearest 0.5."""
    cfg = _config()
    idx = np.array([1, 2, 3])
    masks = torch.from_numpy(synthetic_32.masks[idx]).float()

    class Fixed(nn.Module):
        def forward(self, x):
            probs = 0.1 + 0.2 * masks[: len(x)]
            return torch.stack([torch.log1p(-probs), torch.log(probs)], 1)  # softmax gives back probs

    threshold, dice = ev.validation_threshold(Fixed(), synthetic_32, idx, Hardware.from_config(cfg), 8)
    assert threshold == 0.25 and dice == pytest.approx(1.0)
    assert ev.validation_threshold(Fixed(), synthetic_32, idx[:0], Hardware.from_config(cfg), 8)[0] == 0.5


def test_test_metrics_and_model_file_come_from_the_best_validation_epoch(synthetic_32, tmp_path, monkeypatch):
    """Validation scores scripted so that epoch 2 of 4 is the best: model.pt holds exactly the
    weights of epoch 2, and the test metrics are those of epoch 2's weights, which differ from
    the last epoch's."""
    cfg = _config(method="dice", epochs=4, log_maps=0, tensorboard=False)
    scores = iter([0.3, 0.9, 0.5, 0.7])
    monkeypatch.setattr(pt, "validation_dice", lambda *args: next(scores))
    weights = {}

    def report(metrics, state):
        weights[metrics["epoch"]] = state["run"]["model"]

    result = pt.train(cfg, report, data=synthetic_32, out_dir=tmp_path, checkpoint_every=1)
    assert result.summary["best_epoch"] == result.summary["model_epoch"] == 2
    assert result.summary["val_dice"] == 0.9

    _, info = load_model_file(tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert info["epoch"] == 2 and info["val_dice"] == 0.9
    assert all(torch.equal(saved[k], weights[2][k]) for k in weights[2])

    test_idx = make_folds(synthetic_32.groups, cfg.folds, seed=cfg.split_seed, val_fraction=cfg.val_fraction)[0][2]

    def metrics_of(epoch):
        model = pt.build_model(cfg)
        model.load_state_dict(weights[epoch])
        metrics = lambda probs, masks: all_metrics(probs, masks, cfg.nsd_tolerance)  # noqa: E731
        return ev.per_image_metrics(model, synthetic_32, test_idx, Hardware.from_config(cfg), cfg.batch_size, metrics)

    best, last = metrics_of(2), metrics_of(4)
    for key in ("dice", "iou", "nsd", "nll", "brier"):
        np.testing.assert_allclose(result.per_image[key].to_numpy(), best[key].numpy(), rtol=0, atol=1e-12, err_msg=key)
    assert not np.allclose(best["nll"].numpy(), last["nll"].numpy()), "epochs 2 and 4 do not differ: the test is blind"
    assert result.summary["test_dice"] == pytest.approx(float(best["dice"].mean()), abs=1e-12)


# ============================================================================ determinism and resume


def test_same_config_and_seed_give_the_same_numbers(synthetic_32):
    cfg = _config(epochs=2, e0=1, log_maps=0, tensorboard=False)
    a = pt.train(cfg, data=synthetic_32, evaluate_test=False)
    b = pt.train(cfg, data=synthetic_32, evaluate_test=False)
    pd.testing.assert_frame_equal(a.history.drop(columns="epoch_seconds"), b.history.drop(columns="epoch_seconds"))
    pd.testing.assert_frame_equal(a.epsilon, b.epsilon)
    c = pt.train(cfg.replace(seed=1), data=synthetic_32, evaluate_test=False)
    assert not np.allclose(a.history["train_loss"], c.history["train_loss"])


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(synthetic_32, tmp_path):
    """A checkpoint written at the refresh of epoch 2, saved and loaded the way Tune does
    (``weights_only=True``), continues to exactly the numbers of a run that never stopped."""
    cfg = _config(epochs=4, e0=2, tau=2, log_maps=0, tensorboard=False)
    saved = {}

    def report(metrics, state):
        if state is not None and metrics["epoch"] == 2:
            pt.save_checkpoint(state, tmp_path / "ckpt.pt")
            saved["epoch"] = metrics["epoch"]

    full = pt.train(cfg, report, data=synthetic_32)
    assert saved == {"epoch": 2}
    state = ck.load_checkpoint(tmp_path / "ckpt.pt")
    resumed = pt.train(cfg, data=synthetic_32, resume=state)
    cols = ["epoch", "train_loss", "val_dice", "eps_mean", "eps_std"]
    pd.testing.assert_frame_equal(full.history[cols], resumed.history[cols])
    pd.testing.assert_frame_equal(full.epsilon, resumed.epsilon)
    for key in TEST_KEYS:
        assert full.summary[key] == pytest.approx(resumed.summary[key], abs=1e-12), key


def test_resume_refuses_a_checkpoint_of_another_config(synthetic_32, tmp_path):
    cfg = _config(epochs=2, e0=1, log_maps=0, tensorboard=False)
    states = []
    pt.train(cfg, lambda m, s: states.append(s) if s is not None else None, data=synthetic_32, evaluate_test=False)
    with pytest.raises(ValueError, match="different config"):
        pt.train(cfg.replace(k=4.0), data=synthetic_32, resume=states[-1], evaluate_test=False)


# ============================================================================ evaluation


def test_per_image_metrics_in_batches_equal_one_pass(synthetic_32):
    """Validation and test metrics are computed batch by batch; per image they are the same as
    over the whole set at once, in the order of the indices, and an empty set gives empty values."""
    cfg = _config()
    torch.manual_seed(0)
    model, hw = pt.build_model(cfg), Hardware.from_config(cfg)
    idx = np.array([7, 3, 30, 12, 0, 21, 5])
    metrics = lambda probs, masks: all_metrics(probs, masks, cfg.nsd_tolerance)  # noqa: E731
    batched = ev.per_image_metrics(model, synthetic_32, idx, hw, 3, metrics)
    with torch.no_grad():
        probs = foreground_probs(model.eval()(to_input(torch.from_numpy(synthetic_32.images[idx]).permute(0, 3, 1, 2))))
    whole = metrics(probs, torch.from_numpy(synthetic_32.masks[idx]))
    assert set(batched) == set(whole) and all(v.shape == (len(idx),) for v in batched.values())
    for key in whole:
        torch.testing.assert_close(batched[key], whole[key], rtol=1e-5, atol=1e-6, msg=key)
    empty = ev.per_image_metrics(model, synthetic_32, np.array([], dtype=np.int64), hw, 3, metrics)
    assert all(v.shape == (0,) for v in empty.values())


def test_max_batches_limits_training_and_validation_batches(synthetic_32, monkeypatch):
    """max_batches = 1: one training batch per epoch, one batch of validation; 0 (default): all."""
    seen = []
    build = pt.build_model

    def counting_model(cfg):
        model = build(cfg)
        model.register_forward_hook(lambda m, inputs, out: seen.append((m.training, inputs[0].shape[0])))
        return model

    monkeypatch.setattr(pt, "build_model", counting_model)
    cfg = _config(method="dice", epochs=2, batch_size=4, max_batches=1, log_maps=0, tensorboard=False)
    result = pt.train(cfg, data=synthetic_32, evaluate_test=False)
    # Two epochs, then the kept weights once more over the same validation batch for the threshold.
    assert seen == [(True, 4), (False, 4)] * 2 + [(False, 4)]
    assert result.summary["n_train"] > 4 and result.summary["n_val"] > 4  # the split itself is unchanged
    seen.clear()
    pt.train(cfg.replace(max_batches=0, epochs=1), data=synthetic_32, evaluate_test=False)
    n_train, n_val = result.summary["n_train"], result.summary["n_val"]
    assert sum(n for training, n in seen if training) == n_train
    assert sum(n for training, n in seen if not training) == 2 * n_val
    with pytest.raises(ValueError, match="max_batches"):
        _config(max_batches=-1)


# ============================================================================ learning


def _val_dice_of(model: UNet, data, cfg: TrainConfig) -> float:
    _, val_idx, _ = make_folds(data.groups, cfg.folds, seed=cfg.split_seed, val_fraction=cfg.val_fraction)[cfg.fold]
    return ev.validation_dice(model, data, val_idx, Hardware.from_config(cfg), cfg.batch_size)


def test_a_short_synthetic_run_learns():
    """A dozen short epochs on the synthetic set lift the best validation Dice clearly above the
    untrained model's (which marks everything or nothing as polyp: about 0.1 here)."""
    cfg = TrainConfig(dataset="synthetic", n_synthetic=128, image_size=32, base_channels=8, batch_size=8,
                      epochs=12, lr=3e-3, e0=4, tau=3, mc_samples=3, method="adaptive", log_maps=0,
                      tensorboard=False)
    data = pt.load_data(cfg)
    seed_everything(cfg.seed)
    untrained = _val_dice_of(pt.build_model(cfg), data, cfg)
    result = pt.train(cfg, data=data, evaluate_test=False)
    assert result.summary["val_dice"] > max(0.2, untrained + 0.1), (untrained, result.history["val_dice"].tolist())


# ============================================================================ a non-finite loss


def test_nan_loss_stops_the_run_naming_epoch_and_batch(synthetic_32, monkeypatch):
    cfg = _config(epochs=3, method="dice", log_maps=0, tensorboard=False)
    n_train = len(make_folds(synthetic_32.groups, cfg.folds, seed=cfg.split_seed, val_fraction=cfg.val_fraction)[0][0])
    batches = -(-n_train // cfg.batch_size)
    real = pt.build_method_loss
    calls = {"n": 0}

    def poisoned(cfg):
        loss = real(cfg)

        def forward(logits, target, eps=None):
            calls["n"] += 1
            value = loss(logits, target, eps)
            return value * float("nan") if calls["n"] == batches + 2 else value  # epoch 2, batch 2

        return forward

    monkeypatch.setattr(pt, "build_method_loss", poisoned)
    with pytest.raises(pt.NonFiniteLossError, match=rf"epoch 2, batch 2 of {batches}\b"):
        pt.train(cfg, data=synthetic_32, evaluate_test=False)


# ============================================================================ command line


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polydice.train", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


TINY = ["--epochs", "1", "--image-size", "32", "--base-channels", "4", "--batch-size", "8", "--mc-samples", "2",
        "--no-progress"]


def test_cli_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    proc = _cli("--dataset", "synthetic", "--method", "adaptive", "--n-synthetic", "40", "--e0", "1", "--tau", "1",
                *TINY, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test Dice" in proc.stdout
    for name in ("model.pt", "checkpoint.pt", "summary.json", "epsilon.csv", "per_image.csv", "history.csv"):
        assert (out / name).exists(), name
    assert list(out.glob("events.out.tfevents.*"))


def _kvasir(root: Path, n: int = 6, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"img{i}.jpg")
        mask = np.zeros((size, size), np.uint8)
        mask[10:25, 12:30] = 255
        Image.fromarray(mask).save(root / "masks" / f"img{i}.jpg")
    return root


def _assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.mark.parametrize("problem", ["corrupt image", "unreadable image", "mask of another size", "missing mask",
                                     "empty folder"])
def test_cli_bad_kvasir_folder_ends_with_one_clear_message(problem, tmp_path):
    root = _kvasir(tmp_path / "kvasir")
    named = ""
    if problem == "corrupt image":
        (root / "images" / "img3.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
        named = "img3.jpg"
    elif problem == "unreadable image":
        path = root / "images" / "img2.jpg"
        path.write_bytes(b"")
        named = "img2.jpg"
    elif problem == "mask of another size":
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(root / "masks" / "img1.jpg")
        named = "img1"
    elif problem == "missing mask":
        (root / "masks" / "img4.jpg").unlink()
        named = "img4"
    else:
        for path in (root / "images").iterdir():
            path.unlink()
        named = "images"
    proc = _cli("--dataset", "kvasir", "--data-dir", str(root), "--method", "dice", *TINY, "--out", str(tmp_path / "o"))
    _assert_one_error_line(proc, named)
    assert proc.returncode == 2


def test_cli_unknown_method_names_the_value(tmp_path):
    proc = _cli("--dataset", "synthetic", "--method", "tversky", *TINY, "--out", str(tmp_path / "o"))
    _assert_one_error_line(proc, "tversky")


def test_cli_missing_data_dir_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    proc = _cli("--dataset", "kvasir", "--data-dir", str(missing), *TINY, "--out", str(tmp_path / "o"))
    _assert_one_error_line(proc, str(missing))


def test_loader_reads_what_the_cli_reads(tmp_path):
    """The fixture folder is valid as written: the failures above come from the one broken file."""
    data = load_dataset("kvasir", _kvasir(tmp_path / "kvasir"), 32)
    assert data.images.shape == (6, 32, 32, 3) and set(np.unique(data.masks)) == {0, 1}


# ============================================================================ command line: checkpoint and resume

RESUME_RUN = ["--n-synthetic", "40", "--image-size", "32", "--base-channels", "4", "--batch-size", "8",
              "--epochs", "4", "--e0", "2", "--tau", "2", "--mc-samples", "3", "--log-maps", "0", "--no-tensorboard",
              "--no-progress"]


class _Interrupted(Exception):
    """Stands for the process being killed in the middle of an epoch."""


def _outputs(out: Path) -> dict:
    model = torch.load(out / "model.pt", weights_only=True)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
        "config": summary["config"],
        "history": pd.read_csv(out / "history.csv").drop(columns="epoch_seconds"),
        "epsilon": pd.read_csv(out / "epsilon.csv"),
        "per_image": pd.read_csv(out / "per_image.csv"),
        "model": model,
    }


def _assert_same_outputs(a: dict, b: dict) -> None:
    assert a["config"] == b["config"]
    assert a["summary"] == pytest.approx(b["summary"], abs=1e-12)
    for key in ("history", "epsilon", "per_image"):
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True, obj=key)
    info = lambda payload: {k: v for k, v in payload.items() if k != "model"}  # noqa: E731
    assert info(a["model"]) == info(b["model"])
    assert all(torch.equal(a["model"]["model"][k], b["model"]["model"][k]) for k in a["model"]["model"])


def test_cli_resume_of_an_interrupted_run_equals_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """The command line checkpoints every epoch with --checkpoint-every 1; killed during epoch 4,
    ``--resume DIR`` continues from DIR/checkpoint.pt (epoch 3, loaded with weights_only=True)
    with the saved config and ends with the outputs and model.pt of a run that never stopped."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert pt.main([*RESUME_RUN, "--out", str(whole)]) == 0
    assert (whole / "checkpoint.pt").exists() and (whole / "model.pt").exists()

    rf.run_cli_killed_in_epoch(monkeypatch, [*RESUME_RUN, "--checkpoint-every", "1", "--out", str(broken)], 4,
                               _Interrupted)
    checkpoint = torch.load(broken / "checkpoint.pt", weights_only=True)
    assert checkpoint["run"]["epoch"] == 3 and not (broken / "model.pt").exists()
    assert not list(broken.glob("*.tmp"))

    capsys.readouterr()
    assert pt.main(["--resume", str(broken), "--no-progress"]) == 0, capsys.readouterr().err
    _assert_same_outputs(_outputs(whole), _outputs(broken))
    assert torch.load(broken / "checkpoint.pt", weights_only=True)["run"]["epoch"] == 4


def test_cli_resume_may_add_epochs_and_refuses_other_changes(tmp_path, capsys):
    run = tmp_path / "run"
    assert pt.main([*RESUME_RUN, "--epochs", "2", "--method", "dice", "--out", str(run)]) == 0
    first = pd.read_csv(run / "history.csv")

    assert pt.main(["--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    longer = pd.read_csv(run / "history.csv")
    assert longer["epoch"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(longer.iloc[:2].drop(columns="epoch_seconds"), first.drop(columns="epoch_seconds"))
    assert json.loads((run / "summary.json").read_text())["config"]["epochs"] == 3

    capsys.readouterr()
    assert pt.main(["--resume", str(run), "--lr", "0.1", "--method", "dice", "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--lr 0.1" in errors[0] and "--method" not in errors[0], errors
    assert "--epochs" in errors[0]  # names what may change
    assert pt.main(["--resume", str(run), "--epochs", "1", "--no-progress"]) == 2
    assert "past epochs=1" in capsys.readouterr().err
    assert pt.main(["--resume", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(tmp_path / "nowhere" / "checkpoint.pt") in errors[0]


# ============================================================================ command line: flags


def test_every_config_field_has_a_flag_with_help_and_default():
    parser = pt.build_parser()
    by_dest = {action.dest: action for action in parser._actions}
    text = parser.format_help()
    for f in dataclasses.fields(TrainConfig):
        action = by_dest.get(f.name)
        assert action is not None, f"no flag for {f.name}"
        assert pt.flag_of(f.name) in action.option_strings
        assert action.help and "(default: " in action.help, f.name
        assert pt.flag_of(f.name) in text
    assert set(by_dest["method"].choices) == set(METHODS) and set(by_dest["dataset"].choices) == set(DATASETS)
    assert set(by_dest["polydice_scale"].choices) == set(SCALES)


def test_flags_parse_to_config_values_and_only_given_ones_are_set():
    args = pt.build_parser().parse_args([
        "--no-augment", "--no-amp", "--compile", "--out", "o", "--no-progress", "--eps-min", "0.1",
        "--polydice-scale", "inner", "--no-pm-include-background", "--weight-decay", "1e-4", "--tag", "x",
        "--data-dir", "d", "--channels-last",
    ])
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    assert given == {"augment": False, "amp": False, "compile": True, "eps_min": 0.1, "polydice_scale": "inner",
                     "pm_include_background": False, "weight_decay": 1e-4, "tag": "x", "data_dir": "d",
                     "channels_last": True}
    assert (args.out, args.progress, args.resume, args.checkpoint_every) == ("o", False, None, 0)
    assert TrainConfig.from_dict(given).replace(dataset="synthetic").compile is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of the device choices")
def test_cuda_choices_are_off_on_a_cpu():
    hw = Hardware.from_config(_config(device="auto"))
    assert hw.device.type == "cpu" and hw.amp_dtype is None and not hw.pin_memory
    assert hw.memory_format == torch.contiguous_format and not hw.scaler.is_enabled()
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
