"""What a new trial process loads before its first epoch: the folds come with the data (computed
once, in the driver), so a trial neither splits again nor imports scikit-learn."""

from __future__ import annotations

import subprocess
import sys

import pytest

from polydice import dataset as pdata
from polydice.config import TrainConfig
from polydice.synthetic import make_synthetic


def test_folds_are_computed_once_and_kept_with_the_data(monkeypatch):
    data = make_synthetic(40, 32, seed=0)
    first = data.folds(5, 0, 0.2)
    assert all((a == b).all() for fa, fb in zip(first, pdata.make_folds(data.groups, 5, seed=0, val_fraction=0.2))
               for a, b in zip(fa, fb))

    def no_split(*args, **kwargs):
        raise AssertionError("split again")

    monkeypatch.setattr(pdata, "make_folds", no_split)
    assert data.folds(5, 0, 0.2) is first
    with pytest.raises(AssertionError, match="split again"):
        data.folds(4, 0, 0.2)  # other folds are computed when asked


def test_trainable_carries_the_folds_and_a_trial_does_not_split(monkeypatch, tmp_path):
    pytest.importorskip("ray.tune")
    from polydice import tune as ptune
    from polydice.train import train

    cfg = TrainConfig(dataset="synthetic", method="dice", image_size=32, base_channels=4, epochs=1, batch_size=8,
                      max_batches=1, folds=5, fold=2)
    data = make_synthetic(40, 32, seed=0)
    ptune.make_trainable(cfg, data)
    monkeypatch.setattr(pdata, "make_folds", lambda *a, **k: (_ for _ in ()).throw(AssertionError("split again")))
    train(cfg, data=data, out_dir=tmp_path, evaluate_test=False)


def test_the_trial_module_imports_neither_scikit_learn_nor_optuna():
    code = ("import sys, polydice.tune, polydice.train; "
            "print([m for m in ('sklearn', 'optuna', 'sqlalchemy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_study_database_names_still_resolve_from_the_trial_module():
    """Experiments saved with ``polydice.tune.StudyStorage`` in their pickles still restore."""
    import pickle

    pytest.importorskip("optuna")
    from polydice import studydb

    assert pickle.loads(b"cpolydice.tune\nStudyStorage\n.") is studydb.StudyStorage
    from polydice.tune import DB_TIMEOUT_S, study_storage

    assert study_storage is studydb.study_storage and DB_TIMEOUT_S == studydb.DB_TIMEOUT_S
