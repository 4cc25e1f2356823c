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
import io
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

pytest.importorskip("ray.tune")
pytest.importorskip("optuna")
pytest.importorskip("psutil")

import polydice.checkpoint as ck  # noqa: E402
import polydice.train as pt  # noqa: E402
from polydice.config import METHODS, TrainConfig  # noqa: E402
from polydice.data import DataError, SegmentationData, load_dataset  # noqa: E402
from polydice.dataset import make_folds  # noqa: E402

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


def _half_then_enospc(written: list):
    """A ``torch.save`` that writes half of the bytes, then fails as a full disk does."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
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
    monkeypatch.setattr(pt.torch, "save", _half_then_enospc(written))
    with pytest.raises(ck.CheckpointWriteError, match=rf"cannot write checkpoint {path}: OSError: .*No space left"):
        pt.save_checkpoint(states[2], path, keep_previous=True)
    monkeypatch.undo()
    assert written and written[0] > 0, "the patched writer wrote nothing"
    assert path.read_bytes() == before
    assert {p.name for p in tmp_path.iterdir()} == {pt.CHECKPOINT_FILE, pt.PREVIOUS_CHECKPOINT_FILE}
    assert ck.load_checkpoint(path)["run"]["epoch"] == states[1]["run"]["epoch"]
    assert ck.load_checkpoint(tmp_path / pt.PREVIOUS_CHECKPOINT_FILE)["run"]["epoch"] == states[0]["run"]["epoch"]


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
        with pytest.raises(ck.CheckpointWriteError, match=rf"cannot write checkpoint {path}: .*No space left"):
            pt.save_checkpoint(states[1], path)
        assert {p.name for p in disk.iterdir()} == {pt.CHECKPOINT_FILE, "filler"}
        assert ck.load_checkpoint(path)["run"]["epoch"] == states[0]["run"]["epoch"]

        (disk / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True, timeout=30)
        with pytest.raises(ck.CheckpointWriteError, match=rf"cannot write checkpoint {path}: .*Read-only file system"):
            pt.save_checkpoint(states[1], path)
        assert ck.load_checkpoint(path)["run"]["epoch"] == states[0]["run"]["epoch"]


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
                m.setattr(pt.torch, "save", _half_then_enospc([]))
                return real_save(state, path, **kwargs)
        return real_save(state, path, **kwargs)

    monkeypatch.setattr(pt, "save_checkpoint", third_fails)
    assert pt.main([*CLI_RUN, "--checkpoint-every", "1", "--out", str(out)]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(out / pt.CHECKPOINT_FILE) in errors[0] and "No space left" in errors[0], errors
    assert calls == [1, 2, 3]
    assert not list(out.glob("*.tmp")) and not (out / "model.pt").exists()
    assert ck.load_checkpoint(out / pt.CHECKPOINT_FILE)["run"]["epoch"] == 2

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
    rf.run_cli_killed_in_epoch(monkeypatch, [*CLI_RUN, "--checkpoint-every", "1", "--out", str(out)], 4, _Interrupted)
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


@pytest.fixture(scope="module")
def version_2_state(data) -> dict:
    states = []
    pt.train(_config(epochs=1, e0=1), lambda m, s: states.append(s) if s is not None else None, data=data,
             evaluate_test=False)
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
def test_an_older_or_foreign_checkpoint_is_one_clear_error(kind, version_2_state, tmp_path, capsys):
    """``load_checkpoint`` answers every older, foreign or broken file with one CheckpointError (a
    ValueError) naming the file, never a KeyError; ``--resume`` with one error line, no traceback."""
    make, message = FOREIGN[kind]
    path = tmp_path / pt.CHECKPOINT_FILE
    if make is None:
        path.write_bytes(b"")
    elif isinstance(make, bytes):
        path.write_bytes(make)
    else:
        torch.save(make(version_2_state), path)
    with pytest.raises(ck.CheckpointError, match=rf"^{path}: {message}"):
        ck.load_checkpoint(path)
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
    train_idx = make_folds(data.groups, cfg.folds, seed=cfg.split_seed, val_fraction=cfg.val_fraction)[0][0]
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


# ============================================================================ 6. results folders from elsewhere


@pytest.fixture(scope="module")
def tested_runs(tmp_path_factory, data):
    """Run folders of two methods on both folds of a 2-fold split, as a study writes them."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("adaptive", "dice"):
        for fold in (0, 1):
            pt.train(_config(method=method, folds=2, fold=fold, epochs=2, e0=1), data=data,
                     out_dir=root / f"{method}-fold{fold}", evaluate_test=True)
    return root


def _report(*args: str) -> tuple[int, str, str]:
    import report

    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            rc = report.main(list(args))
        except BaseException as exc:  # a traceback: the test fails with it
            raise AssertionError(f"report.main raised {type(exc).__name__}: {exc}\n{err.getvalue()}") from exc
    return rc, out.getvalue(), err.getvalue()


def test_report_reads_a_results_folder_from_elsewhere_and_never_a_pickle(tested_runs, tmp_path, monkeypatch):
    """A results folder copied from another machine or version, with a truncated per_image.csv, one
    without the 'difficulty' column, an epsilon.csv of binary junk, a summary.json that is not UTF-8
    and one whose test Dice is text, beside Tune's pickle files: the report reads the usable runs,
    names each file it left out under Warnings, and never unpickles anything. A folder with no
    usable run ends with one error line."""
    copied = tmp_path / "copied"
    shutil.copytree(tested_runs, copied)
    (copied / "adaptive-fold1" / "per_image.csv").write_text("index,name,dice\n3,synthetic_00003,0.")
    frame = pd.read_csv(copied / "dice-fold0" / "per_image.csv")
    frame.drop(columns="difficulty").to_csv(copied / "dice-fold0" / "per_image.csv", index=False)
    (copied / "adaptive-fold0" / "epsilon.csv").write_bytes(bytes(range(256)) * 4)
    (copied / "broken").mkdir()
    (copied / "broken" / "summary.json").write_bytes(b"\xff\xfe{\x00")
    text_dice = json.loads((copied / "dice-fold1" / "summary.json").read_text())
    (copied / "other-version").mkdir()
    (copied / "other-version" / "summary.json").write_text(json.dumps({**text_dice, "test_dice": "0.7 (approx.)"}))
    for name in ("searcher-state-2026.pkl", "tuner.pkl", "adaptive-fold0/params.pkl"):
        (copied / name).write_bytes(pickle.dumps({"unpickled": True}))

    def no_pickles(*args, **kwargs):
        raise AssertionError("the report unpickled a file")

    monkeypatch.setattr(pickle, "load", no_pickles)
    monkeypatch.setattr(pickle, "loads", no_pickles)
    monkeypatch.setattr(torch, "load", no_pickles)
    monkeypatch.setattr(pd, "read_pickle", no_pickles)
    out = tmp_path / "table"
    rc, stdout, stderr = _report("--results", str(copied), "--out", str(out))
    assert rc == 0, stderr
    table = pd.read_csv(out / "table.csv")
    assert sorted(table["label"]) == ["adaptive", "dice"] and list(table["folds"]) == [2, 2]
    warnings_md = (out / "table.md").read_text().split("## Warnings")[1]
    for path in (copied / "adaptive-fold1" / "per_image.csv", copied / "dice-fold0" / "per_image.csv",
                 copied / "adaptive-fold0" / "epsilon.csv", copied / "broken" / "summary.json",
                 copied / "other-version" / "summary.json"):
        assert str(path) in warnings_md, path
    assert "'0.7 (approx.)', not a number" in warnings_md and "no column 'difficulty'" in warnings_md

    only_bad = tmp_path / "only-bad"
    shutil.copytree(copied / "other-version", only_bad / "run")
    rc, _, stderr = _report("--results", str(only_bad), "--out", str(tmp_path / "table2"))
    errors = _error_lines(stderr)
    assert rc == 2 and len(errors) == 1 and str(only_bad / "run" / "summary.json") in errors[0], stderr


def test_a_restored_searcher_uses_the_database_this_run_opens(tmp_path, capsys):
    """Tune restores the search algorithm, and with it the Optuna storage, from a pickle holding the
    URL of the machine that saved it. Restored in a process that opened another database (a results
    folder copied elsewhere, a SQLite file that moved), the storage uses the database this process
    opened, not the saved one, which is neither read nor created."""
    optuna = pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    from polydice.studydb import study_storage

    saved_db, moved_db = tmp_path / "there" / "study.db", tmp_path / "here" / "study.db"
    saved_db.parent.mkdir()
    search = OptunaSearch(space={"k": optuna.distributions.FloatDistribution(1, 3)}, metric="m", mode="max",
                          study_name="s", storage=study_storage(f"sqlite:///{saved_db}"))
    search.set_search_properties(None, None, {})
    search.suggest("t1")
    search.on_trial_complete("t1", {"m": 0.5})
    search.save(str(tmp_path / "searcher.pkl"))
    moved_db.parent.mkdir()
    shutil.move(saved_db, moved_db)
    shutil.rmtree(saved_db.parent)

    capsys.readouterr()
    study_storage(f"sqlite:///{moved_db}")
    restored = OptunaSearch()
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.suggest("t2")
    restored.on_trial_complete("t2", {"m": 0.7})
    assert f"using sqlite:///{moved_db}" in capsys.readouterr().err
    assert not saved_db.parent.exists()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{moved_db}")
    assert [t.value for t in study.trials] == [0.5, 0.7]


# ============================================================================ Ray: a trainable that faults


import ray  # noqa: E402
import ray.cloudpickle  # noqa: E402
from ray import tune  # noqa: E402

import ray_fixtures as rf  # noqa: E402
from polydice import studydb  # noqa: E402
from polydice import tune as ptune  # noqa: E402

REPORTS = "reports.jsonl"


class _FaultyTune:
    """Stands in for ``ray.tune`` inside ``polydice.tune`` for one trial: forwards everything, logs
    every delivered report (trial, pid, node, epoch, time) and injects the trial's fault once, at
    the report of epoch 3 (after the epoch-2 checkpoint is stored):

    - ``store``: storing the epoch-3 checkpoint writes half of each file, then fails as a full disk.
    - ``truncate``: the stored epoch-2 checkpoint is cut in half, then the worker is SIGKILLed.
    - ``hold``: on node ``node`` only, the trial waits to be killed with its node (at most 120 s).
    - ``wait_db``: the report waits until the test has stopped the database (at most 60 s).
    """

    def __init__(self, tune_module, fault: str, folder: Path, node: str | None):
        self._tune, self._fault, self._folder, self._node = tune_module, fault, folder, node

    def __getattr__(self, name):
        return getattr(self._tune, name)

    def _mark(self, name: str, **extra) -> bool:
        """Write the fault's marker; False when this trial already had its fault."""
        path = self._folder / f"{name}-{self._tune.get_context().get_trial_id()}"
        if path.exists():
            return False
        path.write_text(json.dumps({"pid": os.getpid(), "time": time.time(), **extra}))
        return True

    def report(self, metrics, *args, checkpoint=None, **kwargs):
        epoch = metrics.get("epoch")
        if epoch == 3 and self._fault:
            getattr(self, f"_{self._fault}")(checkpoint)
        result = self._tune.report(metrics, *args, checkpoint=checkpoint, **kwargs)
        context = self._tune.get_context()
        with open(self._folder / REPORTS, "a") as log:
            log.write(json.dumps({"trial": context.get_trial_id(), "pid": os.getpid(), "epoch": epoch,
                                  "node": ray.get_runtime_context().get_node_id(), "time": time.time(),
                                  "checkpoint": checkpoint is not None}) + "\n")
        return result

    def _store(self, checkpoint):
        if checkpoint is None or not self._mark("store"):
            return
        import ray.train._internal.storage as storage

        real = storage._pyarrow_fs_copy_files

        def half_then_full(source, destination, **kwargs):
            if "checkpoint_" not in str(destination):
                return real(source, destination, **kwargs)
            for file in Path(source).rglob("*"):
                if file.is_file():
                    target = Path(destination) / file.relative_to(source)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    data = file.read_bytes()
                    target.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

        storage._pyarrow_fs_copy_files = half_then_full
        try:
            self._tune.report({"epoch": 3}, checkpoint=checkpoint)
        finally:
            storage._pyarrow_fs_copy_files = real

    def _truncate(self, checkpoint):
        trial = Path(self._tune.get_context().get_storage().trial_fs_path)
        stored = sorted(trial.glob(f"checkpoint_*/{ptune.CHECKPOINT_FILE}"))
        if not stored or not self._mark("truncate", path=str(stored[-1])):
            return
        data = stored[-1].read_bytes()
        stored[-1].write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)

    def _hold(self, checkpoint):
        if ray.get_runtime_context().get_node_id() != self._node or not self._mark("hold"):
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.2)

    def _wait_db(self, checkpoint):
        deadline = time.monotonic() + 60
        while not (self._folder / "db-down").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def faulty_training_function(config: dict, *, fault_dir: str, fault_node: str | None = None, **kwargs) -> None:
    """``polydice.tune.training_function`` with ``_FaultyTune`` in place of ``ray.tune``; the
    config key ``_fault`` names the fault (see ``_FaultyTune``)."""
    import polydice.tune as trial_module

    config = dict(config)
    fault = config.pop("_fault", "")
    saved = trial_module.tune
    trial_module.tune = _FaultyTune(saved, fault, Path(fault_dir), fault_node)
    try:
        trial_module.training_function(config, **kwargs)
    finally:
        trial_module.tune = saved  # a reused worker must not keep the stand-in


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module


@pytest.fixture(scope="module", autouse=True)
def no_study_database_left():
    """``study_storage`` makes its URL the database of every storage this process restores; no
    test's database may outlive this module."""
    yield
    studydb._study_url = None


def _faulty_trainable(base: TrainConfig, data, fault_dir: Path, fault_node: str | None = None):
    fault_dir.mkdir(parents=True, exist_ok=True)
    fn = tune.with_parameters(faulty_training_function, base=base.to_dict(), data=data, evaluate_test=False,
                              checkpoint_every=0, fault_dir=str(fault_dir), fault_node=fault_node)
    return tune.with_resources(fn, {"cpu": 1, "gpu": 0})


def _reports(fault_dir: Path) -> list[dict]:
    path = fault_dir / REPORTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _markers(fault_dir: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in fault_dir.glob(f"{name}-*")]


def _epochs(trial_dir: Path) -> list[int]:
    path = trial_dir / "result.json"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def _reference_epsilon(cfg: TrainConfig, data) -> pd.DataFrame:
    """The ε table of the same trial trained without interruption, here (one torch thread, as the trial)."""
    return pt.train(cfg, data=data, evaluate_test=False).epsilon


def _assert_same_epsilon(path: Path, reference: pd.DataFrame) -> None:
    table = pd.read_csv(path)
    pd.testing.assert_frame_equal(table[["epoch", "index"]], reference[["epoch", "index"]], check_dtype=False)
    np.testing.assert_allclose(table[["difficulty", "epsilon"]].to_numpy(float),
                               reference[["difficulty", "epsilon"]].to_numpy(float), rtol=0, atol=1e-6)
    assert reference["epsilon"].std() > 0 and sorted(reference["epoch"].unique()) == [2, 3, 4]


def _recovery_seconds(fault_dir: Path, trial: str, since: float, pid_before: int) -> float:
    """From ``since`` to the first report of ``trial`` by another process than ``pid_before``."""
    after = [r["time"] for r in _reports(fault_dir) if r["trial"] == trial and r["pid"] != pid_before]
    assert after, f"trial {trial} reported nothing after its fault"
    return min(after) - since


def _outlived(pid: int, wait_s: float = 30.0) -> bool:
    """Whether ``pid`` still runs after at most ``wait_s`` seconds; killed if so."""
    import psutil

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


# ============================================================================ 1. a worker node lost mid-study


@pytest.fixture
def two_node_cluster():
    """A head (1 CPU) and a worker node (1 CPU) on 127.0.0.1, in a private Ray temp dir, with this
    process as the driver; the cluster is shut down and its processes gone, also on failure."""
    from ray.cluster_utils import Cluster

    tmp = rf.short_tmpdir("pdfcl")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TMPDIR"] = tmp
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield {"cluster": cluster, "head": cluster.head_node.node_id, "worker": worker}
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_lost_worker_node_restarts_its_trial_on_the_head_from_its_checkpoint(two_node_cluster, data, tmp_path):
    """Two trials, one per node, checkpointing to storage every node reaches (a shared folder stands
    for NFS or S3). The worker node is removed (its processes killed) while its trial trains epoch
    3: that trial errors, restarts on the head from its epoch-2 checkpoint, and both finish; the
    restarted trial's ε table is the one it would have had, and every epoch is reported once."""
    c = two_node_cluster
    worker_id = c["worker"].node_id
    cfg = _config(seed=5)
    fault_dir = tmp_path / "faults"
    trainable = _faulty_trainable(cfg, data, fault_dir, fault_node=worker_id)
    removed = {}

    def remove_worker_when_held():
        deadline = time.monotonic() + 240
        while not _markers(fault_dir, "hold") and time.monotonic() < deadline:
            time.sleep(0.1)
        if _markers(fault_dir, "hold"):
            removed["time"] = time.time()
            c["cluster"].remove_node(c["worker"], allow_graceful=False)

    remover = threading.Thread(target=remove_worker_when_held, daemon=True)
    remover.start()
    tuner = tune.Tuner(
        trainable,
        param_space={"_fault": "hold", "tag": tune.grid_search(["a", "b"])},
        run_config=ptune.run_config("lost-node", str(tmp_path / "results"), max_failures=1, verbose=0),
    )
    results = tuner.fit()
    remover.join(timeout=60)
    assert removed, "no trial was held on the worker node"
    assert not results.errors, results.errors

    held = _markers(fault_dir, "hold")[0]
    reports = _reports(fault_dir)
    lost = next(r["trial"] for r in reports if r["pid"] == held["pid"])
    trial_dirs = [Path(r.path) for r in results]
    lost_dir = next(d for d in trial_dirs if lost in d.name)
    mine = [r for r in reports if r["trial"] == lost]
    assert [(r["epoch"], r["node"]) for r in mine] == [(1, worker_id), (2, worker_id), (3, c["head"]), (4, c["head"])]
    assert _epochs(lost_dir) == [1, 2, 3, 4]
    assert not _outlived(held["pid"]), "the held trial's worker process outlived its node"
    reference = _reference_epsilon(cfg, data)
    for trial_dir in trial_dirs:
        _assert_same_epsilon(trial_dir / "epsilon.csv", reference)
    seconds = _recovery_seconds(fault_dir, lost, removed["time"], held["pid"])
    _recovered("worker node lost during epoch 3", "the trial's epoch-2 checkpoint (restored on the head), its "
               "epochs 1-2 and ε table, the other trial", seconds)


# ============================================================================ 2. the Optuna database restarts


@pytest.fixture(scope="module")
def postgres():
    with rf.postgres_server() as server:
        yield server


def _pg_stop(server: rf.PostgresServer) -> None:
    server._run("pg_ctl", "-D", str(server.data), "-m", "fast", "-w", "stop")


def _pg_start(server: rf.PostgresServer) -> None:
    server._run("pg_ctl", "-D", str(server.data), "-l", str(server.log), "-w", "-t", "60", "-o",
                f"-c listen_addresses=127.0.0.1 -p {server.port} -k {server.sockets} -c fsync=off", "start")


def test_a_database_that_is_wrong_fails_at_once_and_one_that_is_unreachable_after_the_wait(postgres):
    """Waiting cures a database that restarts, not a wrong one: a database that does not exist
    fails at once with the server's answer; a port nobody listens on is waited for, then one
    ``error:`` line (StudyDatabaseError, a SystemExit) names the URL and the wait."""
    wrong = postgres.url.rsplit("/", 1)[0] + "/no_such_database"
    start = time.monotonic()
    with pytest.raises(Exception, match="no_such_database") as info:
        studydb.study_storage(wrong, timeout_s=60)
    assert time.monotonic() - start < 20 and not isinstance(info.value, studydb.StudyDatabaseError)

    nobody = f"postgresql://polydice@127.0.0.1:{rf.free_port()}/polydice"
    start = time.monotonic()
    with pytest.raises(studydb.StudyDatabaseError) as info:
        studydb.study_storage(nobody, timeout_s=2)
    assert 2 <= time.monotonic() - start < 20
    assert str(info.value).startswith(f"error: the Optuna database {nobody} did not answer for 2 s (")
    assert "\n" not in str(info.value)


@pytest.fixture(scope="class")
def local_ray():
    """One local Ray instance on 127.0.0.1 (2 CPUs) for the tests of a class, in a private temp dir."""
    with rf.local_ray("pdflt", 2, log_to_driver=False) as tmp:
        yield tmp


def _search(name: str, url: str, timeout_s: float):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space={"k": optuna.distributions.FloatDistribution(1.0, 3.0)}, metric="best_val_dice",
                        mode="max", study_name=name, storage=studydb.study_storage(url, timeout_s),
                        sampler=optuna.samplers.TPESampler(seed=0))


def _stop_database_at_epoch_2(server, fault_dir: Path, down_s: float | None, events: dict) -> threading.Thread:
    """A thread that stops the server once a trial has reported epoch 2, marks ``db-down`` (the
    trials' epoch-3 reports wait for it, so the driver meets the database down) and, unless
    ``down_s`` is None, starts it again ``down_s`` seconds later."""

    def run():
        try:
            deadline = time.monotonic() + 240
            while not any(r["epoch"] == 2 for r in _reports(fault_dir)) and time.monotonic() < deadline:
                time.sleep(0.05)
            _pg_stop(server)
            events["stopped"] = time.time()
            (fault_dir / "db-down").write_text("")
            if down_s is not None:
                time.sleep(down_s)
                _pg_start(server)
                events["started"] = time.time()
        except Exception as exc:  # reported by the test
            events["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _optuna_trials(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def _assert_every_result_in_the_study(results, trials, epochs: int) -> None:
    """Every Tune trial's final best validation Dice is its Optuna trial's value, with one
    intermediate value per reported result; no Optuna trial is left RUNNING."""
    assert {t.state.name for t in trials} == {"COMPLETE"}, [(t.number, t.state.name) for t in trials]
    by_k = {round(t.params["k"], 12): t for t in trials}
    assert len(by_k) == len(trials) == len(results)
    for result in results:
        trial = by_k[round(result.config["k"], 12)]
        assert trial.value == result.metrics["best_val_dice"]
        assert len(trial.intermediate_values) >= epochs


@pytest.mark.ray
@pytest.mark.slow
class TestOnLocalRay:
    def test_failed_checkpoint_store_and_truncated_checkpoint_restart_the_trial_once(self, local_ray, data, tmp_path):
        """Two trials of the same config. ``store``: storing its epoch-3 checkpoint fails half way
        (no space): the trial fails naming the checkpoint's path, the half-written folder is
        removed, and the restart continues from the epoch-2 checkpoint. ``truncate``: its stored
        epoch-2 checkpoint is cut in half and its worker killed: the restart finds the file
        unusable, says so in restarted.txt, and trains from epoch 1 instead of failing on the same
        file again. Both end with the ε table of an uninterrupted run, after one restart each."""
        cfg = _config(seed=7)
        fault_dir = tmp_path / "faults"
        tuner = tune.Tuner(
            _faulty_trainable(cfg, data, fault_dir),
            param_space={"_fault": tune.grid_search(["store", "truncate"])},
            run_config=ptune.run_config("faults", str(tmp_path / "results"), max_failures=2, verbose=0),
        )
        results = tuner.fit()
        assert not results.errors, results.errors
        reference = _reference_epsilon(cfg, data)
        trial_dir = {r.config["_fault"]: Path(r.path) for r in results}
        reports = _reports(fault_dir)
        attempts = {fault: {r["pid"] for r in reports if r["trial"] in d.name} for fault, d in trial_dir.items()}
        assert {fault: len(pids) for fault, pids in attempts.items()} == {"store": 2, "truncate": 2}, attempts

        store = trial_dir["store"]
        errors = (store / "error.txt").read_text()
        assert "CheckpointWriteError: cannot store the checkpoint of epoch 3 at " in errors, errors[-3000:]
        assert f"{store}/checkpoint_" in errors and "No space left on device" in errors
        stored = sorted(store.glob("checkpoint_*"))
        assert len(stored) == 1 and ck.load_checkpoint(stored[0] / pt.CHECKPOINT_FILE)["run"]["epoch"] == 4, stored
        assert _epochs(store) == [1, 2, 3, 4]
        _assert_same_epsilon(store / "epsilon.csv", reference)

        truncated = trial_dir["truncate"]
        marker = _markers(fault_dir, "truncate")[0]
        restarted = (truncated / "restarted.txt").read_text().splitlines()
        assert len(restarted) == 1 and restarted[0].startswith(f"{marker['path']}: not a readable checkpoint")
        assert restarted[0].endswith("the trial starts again from epoch 1 (Tune keeps no earlier checkpoint of it)")
        assert _epochs(truncated) == [1, 2, 1, 2, 3, 4]
        _assert_same_epsilon(truncated / "epsilon.csv", reference)

        for fault, kept in (("store", "the epoch-2 checkpoint, epochs 1-2, the other trial"),
                            ("truncate", "epochs 1-2 in result.json (retrained from epoch 1), the other trial")):
            mark = _markers(fault_dir, fault)[0]
            trial = next(r["trial"] for r in reports if r["pid"] == mark["pid"])
            _recovered(f"checkpoint {'store failed (disk full)' if fault == 'store' else 'truncated'}", kept,
                       _recovery_seconds(fault_dir, trial, mark["time"], mark["pid"]))

    def test_study_survives_a_database_restart(self, local_ray, postgres, data, tmp_path, capfd):
        """PostgreSQL is stopped while trials report and started 3 s later: the driver waits for
        it (it says so), reconnects, and the search ends with every trial and every result in the
        study."""
        cfg, fault_dir, events = _config(), tmp_path / "faults", {}
        tuner = tune.Tuner(
            _faulty_trainable(cfg, data, fault_dir),
            param_space={"_fault": "wait_db"},
            tune_config=tune.TuneConfig(search_alg=_search("restart", postgres.url, 120), num_samples=3,
                                        max_concurrent_trials=2),
            run_config=ptune.run_config("restart", str(tmp_path / "results"), max_failures=0, verbose=0),
        )
        thread = _stop_database_at_epoch_2(postgres, fault_dir, 3.0, events)
        results = tuner.fit()
        thread.join(timeout=60)
        assert "error" not in events and "started" in events, events
        assert not results.errors, results.errors
        _assert_every_result_in_the_study(results, _optuna_trials(postgres.url, "restart"), cfg.epochs)
        err = capfd.readouterr().err
        assert f"optuna: the database {postgres.url} does not answer (" in err, err[-3000:]
        waited = float(err.split("optuna: the database answers again, after ")[1].split(" s")[0])
        _recovered("PostgreSQL restarted (down 3 s)", "every trial and intermediate result in the study",
                   waited)

    def test_database_down_for_good_stops_the_study_and_resume_continues_it(self, local_ray, postgres, data,
                                                                           tmp_path):
        """PostgreSQL stops while trials report and stays down: after the wait (3 s here) the
        driver stops with one ``error:`` line (a SystemExit, so no handler on the way drops it).
        With the database back, ``restore_or_create(resume=True)`` in a new driver continues the
        study: every trial completes, each with its result in the study, none left RUNNING."""
        cfg, fault_dir, events = _config(), tmp_path / "faults", {}
        experiment = tmp_path / "results" / "down"

        def new_tuner():
            return tune.Tuner(
                _faulty_trainable(cfg, data, fault_dir),
                param_space={"_fault": "wait_db"},
                tune_config=tune.TuneConfig(search_alg=_search("down", postgres.url, 3), num_samples=3,
                                            max_concurrent_trials=2),
                run_config=ptune.run_config("down", str(tmp_path / "results"), max_failures=0, verbose=0),
            )

        tuner = ptune.restore_or_create(str(experiment), None, new_tuner, resume=False)
        thread = _stop_database_at_epoch_2(postgres, fault_dir, None, events)
        with pytest.raises(studydb.StudyDatabaseError) as info:
            tuner.fit()
        stopped_after = time.time() - events["stopped"]
        thread.join(timeout=60)
        message = str(info.value)
        assert isinstance(info.value, SystemExit) and "\n" not in message
        assert message.startswith(f"error: the Optuna database {postgres.url} did not answer for ")
        assert message.endswith("; the study stops here, and --resume continues it once the database is back")

        ray.shutdown()  # the driver is gone, and its trials with it
        ptune.init_ray(num_cpus=2, log_to_driver=False)
        _pg_start(postgres)
        start = time.time()
        studydb.study_storage(postgres.url, 60)
        tuner = ptune.restore_or_create(str(experiment), _faulty_trainable(cfg, data, fault_dir), new_tuner,
                                        resume=True)
        results = tuner.fit()
        assert not results.errors, results.errors
        _assert_every_result_in_the_study(results, _optuna_trials(postgres.url, "down"), cfg.epochs)
        _recovered("PostgreSQL down for good", f"the finished trials and the experiment; stopped {stopped_after:.1f} s "
                   "after the database went down (3 s wait), then --resume", time.time() - start)

    def test_resume_of_a_moved_or_unrestorable_experiment_is_one_clear_error(self, local_ray, tmp_path):
        """A results folder copied or moved from where its experiment started: ``restore_or_create``
        says where it started and how to resume (Tune would create the new trials there); through
        a symbolic link from there it resumes. An experiment whose saved state is truncated, or names
        classes this version does not have (another version's): one ValueError naming the folder
        and the Ray version, never an unpickling traceback."""
        def report_once(config):
            tune.report({"x": 1})

        started = tmp_path / "there" / "e"
        ptune.restore_or_create(str(started), report_once, lambda: tune.Tuner(report_once, run_config=tune.RunConfig(
            name="e", storage_path=str(started.parent), verbose=0)), resume=False).fit()
        experiment = tmp_path / "here" / "e"
        shutil.copytree(started, experiment)
        for _ in ("the original still there", "the original gone"):
            with pytest.raises(ValueError) as info:
                ptune.restore_or_create(str(experiment), report_once, lambda: None, resume=True)
            assert str(info.value) == (
                f"--resume: the Tune experiment at {experiment} was started at {started}, and Ray Tune "
                f"{ray.__version__} creates the new trials of a resumed study there, not here; make {started} "
                f"lead here (move the folder back, or a symbolic link {started} -> {experiment}) and resume again")
            shutil.rmtree(started, ignore_errors=True)
        started.symlink_to(experiment)
        assert ptune.restore_or_create(str(experiment), report_once, lambda: None, resume=True).fit().errors == []
        state = (experiment / "tuner.pkl").read_bytes()
        other_version = (b"\x80\x04\x955\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x05state\x94\x8c\x14polydice_old_"
                         b"version\x94\x8c\nTunerState\x94\x93\x94)\x81\x94s.")
        for broken, why in ((state[: len(state) // 2], "UnpicklingError"),
                            (other_version, "ModuleNotFoundError: No module named 'polydice_old_version'")):
            (experiment / "tuner.pkl").write_bytes(broken)
            with pytest.raises(ValueError) as info:
                ptune.restore_or_create(str(experiment), lambda config: None, lambda: None, resume=True)
            message = str(info.value)
            assert message.startswith(f"--resume: the Tune experiment at {experiment} cannot be restored by Ray "
                                      f"{ray.__version__} ({why}")
            assert "another version of Ray or polydice" in message
