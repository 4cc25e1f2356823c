"""Faults a cluster really has, injected on this machine: a worker node lost mid-study, an Optuna
database that restarts or stays down, a checkpoint that cannot be written (full disk, read-only
storage), a corrupt or truncated checkpoint, bad numbers in the data, and results folders from
elsewhere. Each test shows what a user keeps, and the Ray ones print how long recovery took
(``FAULT <name>: ... recovered in N s``; ``pytest -s`` shows them).

Everything listens on 127.0.0.1; every Ray instance, cluster and database a test starts is stopped
in its teardown, also when the test fails. The faults are real where this machine allows: a node's
processes are killed, the PostgreSQL server is stopped, a tmpfs fills up (as root); where it does
not, a writer is patched to fail half way, as a full disk does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# Before Ray is imported: Ray reads this once, at import, to decide which interfaces to bind.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

import polydice.train as pt  # noqa: E402
from polydice.config import METHODS, TrainConfig  # noqa: E402
from polydice.data import DataError, SegmentationData, load_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"
if str(STUDIES) not in sys.path:
    sys.path.insert(0, str(STUDIES))


def _config(**extra) -> TrainConfig:
    values = dict(dataset="synthetic", image_size=32, base_channels=4, n_synthetic=40, mc_samples=2, batch_size=8,
                  epochs=4, e0=2, tau=1, method="adaptive", log_maps=0, tensorboard=False)
    values.update(extra)
    return TrainConfig(**values)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from more threads, and on a busy machine contending threads make
    every run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return pt.load_data(_config())


def _recovered(fault: str, kept: str, seconds: float) -> None:
    print(f"\nFAULT {fault}: kept {kept}; recovered in {seconds:.1f} s", flush=True)


# ============================================================================ 3. a checkpoint write that fails


def _half_then_enospc(path, written: list):
    """A ``torch.save`` that writes half of the bytes, then fails as a full disk does."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        written.append(len(data) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_failed_checkpoint_write_names_the_file_and_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    """A write that fails half way (a patched writer, as on a full disk) raises CheckpointWriteError
    naming the file, removes what it wrote, and leaves the previous checkpoint loading as before."""
    states = []
    pt.train(_config(epochs=3), lambda m, s: states.append(s) if s is not None else None, data=data,
             evaluate_test=False, checkpoint_every=1)
    path = tmp_path / pt.CHECKPOINT_FILE
    pt.save_checkpoint(states[0], path, keep_previous=True)
    pt.save_checkpoint(states[1], path, keep_previous=True)
    before = path.read_bytes()

    written: list = []
    monkeypatch.setattr(pt.torch, "save", _half_then_enospc(path, written))
    with pytest.raises(pt.CheckpointWriteError, match=rf"cannot write checkpoint {path}: OSError: .*No space left"):
        pt.save_checkpoint(states[2], path, keep_previous=True)
    monkeypatch.undo()
    assert written and written[0] > 0, "the patched writer wrote nothing"
    assert path.read_bytes() == before
    assert {p.name for p in tmp_path.iterdir()} == {pt.CHECKPOINT_FILE, pt.PREVIOUS_CHECKPOINT_FILE}
    assert pt.load_checkpoint(path)["run"]["epoch"] == states[1]["run"]["epoch"]
    assert pt.load_checkpoint(tmp_path / pt.PREVIOUS_CHECKPOINT_FILE)["run"]["epoch"] == states[0]["run"]["epoch"]


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the patched-writer test covers the same path")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_and_read_only_storage_leave_the_previous_checkpoint(data, tmp_path):
    """On a real tmpfs: once it is full the next checkpoint fails naming the file, no partial file
    is left and the previous checkpoint loads; remounted read-only, the same."""
    states = []
    pt.train(_config(epochs=3), lambda m, s: states.append(s) if s is not None else None, data=data,
             evaluate_test=False, checkpoint_every=1)
    with _tmpfs(tmp_path / "disk", "2m") as disk:
        path = disk / pt.CHECKPOINT_FILE
        pt.save_checkpoint(states[0], path)
        size = path.stat().st_size
        with open(disk / "filler", "wb") as filler:  # the rest of the disk, less than one checkpoint
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize < size
        with pytest.raises(pt.CheckpointWriteError, match=rf"cannot write checkpoint {path}: .*No space left"):
            pt.save_checkpoint(states[1], path)
        assert {p.name for p in disk.iterdir()} == {pt.CHECKPOINT_FILE, "filler"}
        assert pt.load_checkpoint(path)["run"]["epoch"] == states[0]["run"]["epoch"]

        (disk / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True, timeout=30)
        with pytest.raises(pt.CheckpointWriteError, match=rf"cannot write checkpoint {path}: .*Read-only file system"):
            pt.save_checkpoint(states[1], path)
        assert pt.load_checkpoint(path)["run"]["epoch"] == states[0]["run"]["epoch"]


CLI_RUN = ["--n-synthetic", "40", "--image-size", "32", "--base-channels", "4", "--batch-size", "8", "--epochs", "4",
           "--e0", "2", "--tau", "1", "--mc-samples", "2", "--log-maps", "0", "--no-tensorboard", "--no-progress"]


def _outputs(out: Path) -> dict:
    return {"history": pd.read_csv(out / "history.csv").drop(columns="epoch_seconds"),
            "epsilon": pd.read_csv(out / "epsilon.csv"),
            "summary": {k: v for k, v in json.loads((out / "summary.json").read_text()).items()
                        if isinstance(v, float)}}


def _assert_same_run(a: dict, b: dict) -> None:
    for key in ("history", "epsilon"):
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True, obj=key)
    assert a["summary"] == pytest.approx(b["summary"], abs=1e-12)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert pt.main([*CLI_RUN, "--out", str(out)]) == 0
    return _outputs(out)


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_cli_on_a_full_disk_stops_with_one_error_and_resumes_from_the_last_checkpoint(
        uninterrupted, tmp_path, monkeypatch, capsys):
    """The command line, its third checkpoint failing half way: one ``error:`` line naming the file;
    ``--resume`` then continues from the second and ends with the numbers of a run that never stopped."""
    out = tmp_path / "run"
    real_save, calls = pt.save_checkpoint, []

    def third_fails(state, path, **kwargs):
        calls.append(state["run"]["epoch"])
        if len(calls) == 3:
            with monkeypatch.context() as m:
                m.setattr(pt.torch, "save", _half_then_enospc(path, []))
                return real_save(state, path, **kwargs)
        return real_save(state, path, **kwargs)

    monkeypatch.setattr(pt, "save_checkpoint", third_fails)
    assert pt.main([*CLI_RUN, "--checkpoint-every", "1", "--out", str(out)]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(out / pt.CHECKPOINT_FILE) in errors[0] and "No space left" in errors[0], errors
    assert calls == [1, 2, 3]
    assert not list(out.glob("*.tmp")) and not (out / "model.pt").exists()
    assert pt.load_checkpoint(out / pt.CHECKPOINT_FILE)["run"]["epoch"] == 2

    monkeypatch.setattr(pt, "save_checkpoint", real_save)
    assert pt.main(["--resume", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    _assert_same_run(_outputs(out), uninterrupted)


# ============================================================================ 4. a corrupt or truncated checkpoint


class _Interrupted(Exception):
    """Stands for the process being killed in the middle of an epoch."""


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_cli_resume_falls_back_to_the_previous_checkpoint_when_the_last_is_truncated(
        uninterrupted, tmp_path, monkeypatch, capsys):
    """Killed in epoch 4 with checkpoints every epoch, then ``checkpoint.pt`` truncated (as a copy
    cut short): ``--resume`` says so naming the file, continues from ``checkpoint.prev.pt`` (epoch 2)
    and ends with the numbers of a run that never stopped. With both files unusable it ends with
    one ``error:`` line naming both."""
    out = tmp_path / "run"
    real = pt._train_epoch

    def killed_in_epoch_4(run, epoch, *args, **kwargs):
        if epoch == 4:
            raise _Interrupted
        return real(run, epoch, *args, **kwargs)

    monkeypatch.setattr(pt, "_train_epoch", killed_in_epoch_4)
    with pytest.raises(_Interrupted):
        pt.main([*CLI_RUN, "--checkpoint-every", "1", "--out", str(out)])
    monkeypatch.setattr(pt, "_train_epoch", real)
    _truncate(out / pt.CHECKPOINT_FILE)

    capsys.readouterr()
    assert pt.main(["--resume", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(out / pt.CHECKPOINT_FILE) in warning[0], err[-3000:]
    assert "not a readable checkpoint" in warning[0] and "(epoch 2)" in warning[0], warning
    _assert_same_run(_outputs(out), uninterrupted)

    for name in (pt.CHECKPOINT_FILE, pt.PREVIOUS_CHECKPOINT_FILE):
        _truncate(out / name)
    assert pt.main(["--resume", str(out), "--no-progress"]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    assert str(out / pt.CHECKPOINT_FILE) in errors[0] and str(out / pt.PREVIOUS_CHECKPOINT_FILE) in errors[0]


def _version_2_state() -> dict:
    states = []
    pt.train(_config(epochs=1, e0=1), lambda m, s: states.append(s) if s is not None else None,
             data=pt.load_data(_config()), evaluate_test=False)
    return states[-1]


FOREIGN = {
    "version 1": (lambda s: {**s, "version": 1}, r"checkpoint format version 1, but this polydice reads version 2"),
    "no version": (lambda s: {k: v for k, v in s.items() if k != "version"},
                   r"checkpoint format version None, but this polydice reads version 2"),
    "a model.pt": (lambda s: {"format": "polydice-model", "version": 1, "model": s["run"]["model"]},
                   r"a 'polydice-model' file, not a training checkpoint"),
    "a list": (lambda s: [1, 2, 3], r"not a polydice checkpoint \(it holds a list\)"),
    "no run state": (lambda s: {**s, "run": {k: v for k, v in s["run"].items() if k != "optimizer"}},
                     r"checkpoint version 2 without run.optimizer"),
    "empty file": (None, r"not a readable checkpoint"),
    "text": (b"not a checkpoint\n", r"not a readable checkpoint"),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_an_older_or_foreign_checkpoint_is_one_clear_error(kind, tmp_path, capsys):
    """``load_checkpoint`` answers every older, foreign or broken file with one CheckpointError (a
    ValueError) naming the file, never a KeyError; ``--resume`` with one error line, no traceback."""
    make, message = FOREIGN[kind]
    path = tmp_path / pt.CHECKPOINT_FILE
    if make is None:
        path.write_bytes(b"")
    elif isinstance(make, bytes):
        path.write_bytes(make)
    else:
        torch.save(make(_version_2_state()), path)
    with pytest.raises(pt.CheckpointError, match=rf"^{path}: {message}"):
        pt.load_checkpoint(path)
    assert pt.main(["--resume", str(tmp_path), "--no-progress"]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(path) in errors[0], errors


# ============================================================================ 5. bad numbers in the data


def _extreme(data: SegmentationData) -> SegmentationData:
    """The synthetic set with all-black, all-white and grey images (one with an all-foreground mask),
    all-foreground masks, 1-pixel lesions and empty masks in every fold."""
    images, masks = data.images.copy(), data.masks.copy()
    for i in range(0, len(images), 5):
        images[i] = 0
        images[i + 1] = 255
        images[i + 2], masks[i + 2] = 128, 1
        masks[i + 3] = 1
        masks[i + 4] = 0
        masks[i + 4, 16, 16] = 1  # a 1-pixel lesion
    masks[-1] = 0
    return SegmentationData(data.name, images, masks, data.groups, list(data.names))


@pytest.mark.parametrize("method", METHODS)
def test_constant_images_full_masks_and_one_pixel_lesions_train_without_nan(method, data):
    """Every method trains on images that are constant, masks that are all foreground, 1-pixel and
    empty lesions (batches of one such image included) with finite losses, ε and test metrics."""
    cfg = _config(method=method, epochs=2, e0=1, batch_size=5)
    result = pt.train(cfg, data=_extreme(data), evaluate_test=True)
    assert np.isfinite(result.history["train_loss"]).all(), result.history
    assert np.isfinite(result.history["val_dice"]).all()
    assert np.isfinite(result.epsilon[["difficulty", "epsilon"]].to_numpy(dtype=float)).all()
    for key in ("test_dice", "test_iou", "test_nll", "test_brier", "val_dice"):
        assert np.isfinite(result.summary[key]), key


def _kvasir_tiffs(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        tifffile.imwrite(root / "images" / f"{i}.tif", rng.random((16, 16, 3)).astype(np.float32), photometric="rgb")
        mask = np.zeros((16, 16), np.float32)
        mask[4:9, 5:11] = 1.0
        tifffile.imwrite(root / "masks" / f"{i}.tif", mask)
    return root


@pytest.mark.parametrize("problem", ["NaN pixel", "infinite mask value", "0..255 float image", "0..255 float mask"])
def test_float_pixels_that_are_not_finite_or_outside_0_1_are_rejected_with_the_file(problem, tmp_path):
    """Float TIFFs are read as values in [0, 1]; a NaN or infinite value, or a 0..255 float image or
    mask (which would turn white or all foreground), is rejected at load time naming the file."""
    root = _kvasir_tiffs(tmp_path)
    assert len(load_dataset("kvasir", root, 16)) == 6  # the clean float set loads
    sub, name = ("masks" if "mask" in problem else "images"), "3.tif"
    array = tifffile.imread(root / sub / name)
    if problem == "NaN pixel":
        array[2, 3, 1] = np.nan
    elif problem == "infinite mask value":
        array[0, 0] = np.inf
    else:
        array = array * 255
    tifffile.imwrite(root / sub / name, array, photometric="rgb" if sub == "images" else None)
    with pytest.raises(DataError, match=rf"^{root / sub / name} (holds 1 NaN or infinite|is a float image)"):
        load_dataset("kvasir", root, 16)


def test_a_non_finite_loss_names_epoch_batch_and_images(data, monkeypatch):
    """A loss that turns NaN for two images in epoch 2 stops the run naming the epoch, the batch
    and the files of the batch's images whose loss is non-finite, and no other image."""
    cfg = _config(method="dice", epochs=2)
    train_idx = pt.make_folds(data.groups, cfg.folds, seed=cfg.split_seed, val_fraction=cfg.val_fraction)[0][0]
    poisoned = {data.names[i] for i in train_idx[[3, 7]]}
    batch = {"epoch": 0}
    real_loader, real_loss = pt.make_loader, pt.build_method_loss

    def recording_loader(*args, **kwargs):
        loader = real_loader(*args, **kwargs)
        batch["epoch"] += 1  # one training loader per epoch

        class Recording:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for images, masks, indices in loader:
                    batch["indices"] = indices
                    yield images, masks, indices

        return Recording()

    def poisoned_loss(cfg):
        loss = real_loss(cfg)

        def forward(logits, target, eps=None):
            value = loss(logits, target, eps)
            if batch["epoch"] < 2:
                return value
            bad = torch.tensor([data.names[i] in poisoned for i in batch["indices"].tolist()])
            return torch.where(bad, torch.full_like(value, float("nan")), value)

        return forward

    monkeypatch.setattr(pt, "make_loader", recording_loader)
    monkeypatch.setattr(pt, "build_method_loss", poisoned_loss)
    with pytest.raises(pt.NonFiniteLossError) as info:
        pt.train(cfg, data=data, evaluate_test=False)
    message = str(info.value)
    assert "at epoch 2, batch " in message, message
    named = set(message.split("non-finite loss: ")[1].split(")")[0].split(", "))
    assert named and named <= poisoned, (named, poisoned)
