"""Tests of studies/report.py on fake run folders with hand-chosen numbers.

Five folds of four test images (dataset indices 0–19, fold f tests 4f … 4f + 3) and five methods.
Image i of fold f has Dice ``base + slope * f + offset[i % 4]`` with offsets summing to 0, so a
method's fold means are ``base + slope * f``: mean ``base + 2 slope`` and sample std
``slope * sqrt(2.5)`` over the folds. Difficulties are ``1 + (7 i mod 20) / 20`` plus a per-method
term that cancels in the mean over methods, so every method ranks the images differently while the
common hardest quarter is the hand-picked set {5, 8, 11, 14, 17}. Every image is its own group
(as on Kvasir-SEG), so the paired tests run per image; a small CVC-like set (``write_cvc``) has
video sequences of several frames. No Ray, no training.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))

import comparison  # noqa: E402
import method_table  # noqa: E402
import rendering  # noqa: E402
import report  # noqa: E402
import run_results  # noqa: E402
from polydice.config import SELECTION_SEED_OFFSET, SELECTION_TAG, run_label  # noqa: E402

FOLDS, PER_FOLD = 5, 4
N_IMAGES = FOLDS * PER_FOLD
# label: (method, eps, base, slope, per-image offsets within a fold, summing to 0)
METHODS = {
    "adaptive-tuned": ("adaptive", 0.0, 0.80, 0.020, (-0.03, -0.01, 0.01, 0.03)),
    "dice": ("dice", 0.0, 0.75, 0.010, (0.02, -0.04, 0.01, 0.01)),
    "polydice-eps-0.1": ("polydice", -0.1, 0.74, 0.025, (-0.02, 0.00, 0.05, -0.03)),
    "polydice-eps+0.0": ("polydice", 0.0, 0.76, 0.012, (0.01, 0.01, -0.05, 0.03)),
    "polydice-eps+0.2": ("polydice", 0.2, 0.78, 0.015, (0.04, -0.02, -0.01, -0.01)),
}
# (mean, sample std) of the fold means worked out by hand: base + 2 slope, slope * sqrt(2.5).
# Slopes differ, so no two methods differ by a constant per fold (a degenerate t-test).
EXPECTED_DICE = {
    "adaptive-tuned": (0.84, 0.0316227766),
    "dice": (0.77, 0.0158113883),
    "polydice-eps-0.1": (0.79, 0.0395284708),
    "polydice-eps+0.0": (0.784, 0.0189736660),
    "polydice-eps+0.2": (0.81, 0.0237170825),
}
HARDEST = [5, 8, 11, 14, 17]  # the five i with (7 i mod 20) >= 15


def image_dice(label: str) -> np.ndarray:
    _, _, base, slope, offsets = METHODS[label]
    return np.array([base + slope * (i // PER_FOLD) + offsets[i % PER_FOLD] for i in range(N_IMAGES)])


def image_difficulty(label: str) -> np.ndarray:
    k = list(METHODS).index(label)
    return np.array([1 + (7 * i % 20) / 20 + 0.3 * (k - 2) * (-1) ** i for i in range(N_IMAGES)])


def write_run(folder: Path, label: str, fold: int, *, dice: np.ndarray | None = None, mtime: float | None = None,
              refreshes: tuple[int, ...] = (), dataset: str = "synthetic", groups: np.ndarray | None = None,
              config: dict | None = None) -> Path:
    """A run folder as polydice.train writes it (summary.json, per_image.csv, epsilon.csv, history.csv).

    ``groups``: the group of each test image (default: the image itself, as on Kvasir-SEG);
    ``groups=False`` writes an older per_image.csv without the column. ``config`` adds config fields.
    """
    method, eps, *_ = METHODS[label]
    test_idx = np.arange(fold * PER_FOLD, (fold + 1) * PER_FOLD)
    dice = image_dice(label)[test_idx] if dice is None else dice
    difficulty = image_difficulty(label)[test_idx]
    folder.mkdir(parents=True, exist_ok=True)
    per_image = pd.DataFrame({
        "index": test_idx, "name": [f"img{i}" for i in test_idx],
        "group": test_idx if groups is None or groups is False else groups, "dice": dice,
        "iou": dice - 0.1, "precision": 0.9, "recall": 0.8, "nsd": 0.7, "nll": 0.2, "brier": 0.05,
        "difficulty": difficulty, "lesion_fraction": 0.1,
    })
    if groups is False:
        per_image = per_image.drop(columns="group")
    per_image.to_csv(folder / "per_image.csv", index=False)
    train_idx = np.setdiff1d(np.arange(N_IMAGES), test_idx)
    eps_rows = [pd.DataFrame({"epoch": e, "index": train_idx, "difficulty": 0.1 * e + train_idx / 100,
                              "epsilon": 0.5 - train_idx / 100}) for e in refreshes]
    epsilon = pd.concat(eps_rows) if eps_rows else pd.DataFrame(columns=["epoch", "index", "difficulty", "epsilon"])
    epsilon.to_csv(folder / "epsilon.csv", index=False)
    pd.DataFrame({"epoch": [1], "train_loss": [0.5], "val_dice": [0.7]}).to_csv(folder / "history.csv", index=False)
    summary = {
        "config": {"dataset": dataset, "method": method, "eps": eps, "tag": label, "fold": fold, "folds": FOLDS,
                   "split_seed": 0, "seed": 0, **(config or {})},
        "val_dice": 0.7, "best_epoch": 3, "n_train": 12, "n_val": 4, "n_test": PER_FOLD, "n_groups": 10,
        "test_dice": float(dice.mean()), "test_iou": float(dice.mean() - 0.1), "test_precision": 0.9,
        "test_recall": 0.8, "test_nsd": 0.7, "test_nll": 0.2, "test_brier": 0.05,
        "test_dice_hardest_quartile": 0.5 + 0.01 * fold,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    if mtime is not None:
        os.utime(folder / "summary.json", (mtime, mtime))
    return folder


def write_study(root: Path) -> list[Path]:
    """Tune-like layouts: final adaptive trials (with a checkpoint copy and search trials beside them),
    a baseline grid, and one run written directly into a folder."""
    final, grid, direct = root / "final", root / "grid", root / "direct"
    for fold in range(FOLDS):
        trial = write_run(final / "adaptive-final" / f"trial_{fold}_a1b2", "adaptive-tuned", fold, refreshes=(2, 4))
        if fold == 0:  # Tune's last checkpoint carries a copy of the run's files: the same run
            copy = trial / "checkpoint_000004"
            copy.mkdir()
            for name in ("summary.json", "per_image.csv", "epsilon.csv"):
                (copy / name).write_bytes((trial / name).read_bytes())
    for n in range(3):  # search trials: validation only, no test metrics, no per_image.csv
        search = final / "adaptive" / f"trial_s{n}_c3d4"
        search.mkdir(parents=True)
        (search / "summary.json").write_text(json.dumps({
            "config": {"dataset": "synthetic", "method": "adaptive", "tag": "adaptive-search", "fold": 0},
            "val_dice": 0.7 + n / 100}))
    for k, label in enumerate(list(METHODS)[1:]):
        for fold in range(FOLDS):
            if label == "dice" and fold == FOLDS - 1:
                write_run(direct, label, fold)
            else:
                write_run(grid / "baselines" / f"trial_{k}_{fold}_e5f6", label, fold)
    for fold in range(FOLDS):  # the independent Dice-loss replicate that selects the hard set
        write_run(grid / "baselines" / f"trial_select_{fold}_e5f6", "dice", fold,
                  config={"tag": SELECTION_TAG, "seed": SELECTION_SEED_OFFSET})
    return [final, grid, direct]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    dirs = write_study(root)
    md = report.make_report(dirs, root / "report")
    return dirs, root / "report", pd.read_csv(root / "report" / "table.csv"), md.read_text()


def row(table: pd.DataFrame, label: str) -> pd.Series:
    rows = table[table["label"] == label]
    assert len(rows) == 1, label
    return rows.iloc[0]


def test_run_label():
    assert run_label({"method": "polydice", "eps": 0.0, "tag": ""}) == "polydice-eps+0.0"
    assert run_label({"method": "polydice", "eps": -0.3, "tag": ""}) == "polydice-eps-0.3"
    assert run_label({"method": "focal", "eps": 0.0, "tag": ""}) == "focal"
    assert run_label({"method": "adaptive", "tag": "adaptive-tuned-2"}) == "adaptive-tuned-2"


def test_every_method_has_a_row_with_mean_and_sample_std(study):
    _, out, table, md = study
    assert set(table["label"]) == set(METHODS) | {"polydice-oracle (eps=+0.2)", "polydice-eps-val"}
    for label, (mean, std) in EXPECTED_DICE.items():
        r = row(table, label)
        assert r["folds"] == FOLDS and r["n_seeds"] == r["max_seeds"] == 1 and r["n_runs"] == FOLDS
        assert r["dice_pooled_mean"] == pytest.approx(image_dice(label).mean())
        assert r["dice_mean"] == pytest.approx(mean, rel=1e-9)
        assert r["dice_std"] == pytest.approx(std, rel=1e-8)
        assert r["iou_mean"] == pytest.approx(mean - 0.1, rel=1e-9)
        assert r["nsd_mean"] == pytest.approx(0.7) and r["nsd_std"] == pytest.approx(0.0, abs=1e-12)
        # the per-run hardest quartile: 0.5 + 0.01 f over the folds
        assert r["dice_hardest_quartile_mean"] == pytest.approx(0.52)
        assert r["dice_hardest_quartile_std"] == pytest.approx(0.01 * math.sqrt(2.5))
    assert (out / "table.md").exists()
    assert "0.8400 ± 0.0316" in md


def test_markdown_says_what_was_compared(study):
    _, _, _, md = study
    head = md.split("| Method")[0]
    assert "`synthetic`: 5 folds (0, 1, 2, 3, 4), 20 test images" in head
    assert "Reference of the paired tests: `adaptive-tuned`" in head
    assert "sample standard deviation (ddof = 1)" in md
    assert "5 folds" in md and "weak test" in md


def test_oracle_is_the_eps_with_the_best_test_dice(study):
    _, _, table, md = study
    oracle = table[table["oracle"]]
    assert list(oracle["label"]) == ["polydice-oracle (eps=+0.2)"]
    best = row(table, "polydice-eps+0.2")
    for column in ("dice_mean", "dice_std", "iou_mean", "wilcoxon_p", "dice_hardest_quartile_common"):
        assert oracle.iloc[0][column] == pytest.approx(best[column])
    assert not table.loc[table["label"] != "polydice-oracle (eps=+0.2)", "oracle"].any()
    assert "not a valid method: picked on test Dice" in md
    assert "polydice-eps+0.0 (PolyDice ε = 0 baseline)" in md


def test_paired_tests_match_scipy(study):
    # One seed: the run pairs are the folds, each a fold's mean over its images.
    _, _, table, _ = study
    ref = image_dice("adaptive-tuned")
    ref_folds = ref.reshape(FOLDS, PER_FOLD).mean(1)
    for label in list(METHODS)[1:]:
        r, values = row(table, label), image_dice(label)
        folds = values.reshape(FOLDS, PER_FOLD).mean(1)
        assert r["reference"] == "adaptive-tuned"
        assert r["n_pairs"] == FOLDS and r["n_units_paired"] == N_IMAGES and r["folds_shared"] == FOLDS
        assert r["dice_diff_mean"] == pytest.approx((values - ref).mean())
        assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon(folds, ref_folds).pvalue, rel=1e-12)
        assert r["wilcoxon_p"] >= 0.0625  # 5 pairs: a two-sided signed-rank p cannot go lower
        assert r["fixed_networks_wilcoxon_p"] == pytest.approx(stats.wilcoxon(values, ref).pvalue, rel=1e-12)
        assert r["ttest_p"] == pytest.approx(stats.ttest_rel(folds, ref_folds).pvalue, rel=1e-9)
    reference = row(table, "adaptive-tuned")
    assert np.isnan(reference["wilcoxon_p"]) and reference["n_pairs"] == 0


def test_run_pairs_match_fold_and_seed(tmp_path):
    # Two seeds per fold; the method's seed-1 runs are 0.1 better: pairs are matched by (fold, seed).
    for fold in range(3):
        for seed in (0, 1):
            write_run(tmp_path / f"a{fold}{seed}", "adaptive-tuned", fold, config={"seed": seed})
            dice = image_dice("dice")[fold * PER_FOLD:(fold + 1) * PER_FOLD] + 0.1 * seed
            write_run(tmp_path / f"d{fold}{seed}", "dice", fold, dice=dice, config={"seed": seed})
    table, _ = method_table.build_table(*(lambda r: (r, run_results.load_per_image(r)))(run_results.collect_runs([tmp_path])))
    r = row(table, "dice")
    assert r["n_pairs"] == 6 and r["n_seeds"] == 2 and r["n_runs"] == 6
    ref, dice = image_dice("adaptive-tuned")[:12].reshape(3, PER_FOLD), image_dice("dice")[:12].reshape(3, PER_FOLD)
    diffs = np.concatenate([dice.mean(1) - ref.mean(1), dice.mean(1) + 0.1 - ref.mean(1)])
    assert r["dice_diff_mean"] == pytest.approx(diffs.mean())
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon(diffs).pvalue, rel=1e-12)
    in_pair_order = diffs.reshape(2, 3).T.ravel()  # (fold 0, seed 0), (fold 0, seed 1), (fold 1, seed 0), ...
    assert (r["dice_diff_ci_low"], r["dice_diff_ci_high"]) == comparison.bootstrap_ci(in_pair_order)
    folds = (dice.mean(1) + 0.05) - ref.mean(1)  # each fold's runs averaged over the two seeds
    assert r["ttest_p"] == pytest.approx(stats.ttest_1samp(folds, 0).pvalue, rel=1e-9)
    # The reference lacks seed 1 in fold 2: that run of dice is unpaired, with a warning.
    (tmp_path / "a21" / "summary.json").unlink()
    with pytest.warns(run_results.ReportWarning, match=r"fold/seed \[\(2, 1\)\]"):
        table, _ = method_table.build_table(*(lambda r: (r, run_results.load_per_image(r)))(run_results.collect_runs([tmp_path])))
    assert row(table, "dice")["n_pairs"] == 5


def test_paired_wilcoxon_edge_cases():
    assert comparison.paired_wilcoxon([0.5, 0.7, 0.9], [0.5, 0.7, 0.9]) == (1.0, 0.0, 3)
    p, diff, n = comparison.paired_wilcoxon([], [])
    assert math.isnan(p) and n == 0
    assert math.isnan(comparison.fold_ttest([0.8, 0.9], [0.7, 0.8]))  # fewer than 3 folds
    assert comparison.fold_ttest([0.8, 0.9, 0.7], [0.8, 0.9, 0.7]) == 1.0


def test_common_hardest_quartile_is_one_set_for_all_methods(study):
    dirs, _, table, md = study
    runs = run_results.collect_runs(dirs)
    _, hardest = comparison.common_hardest(run_results.load_per_image(runs))
    assert hardest == {"synthetic": HARDEST}
    for label in METHODS:
        r = row(table, label)
        assert r["dice_hardest_quartile_common"] == pytest.approx(image_dice(label)[HARDEST].mean())
        assert r["n_hardest_common"] == len(HARDEST)
    assert "5 images of `synthetic`" in md


def test_search_trials_and_checkpoint_copies_are_not_runs(study, recwarn):
    dirs, *_ = study
    runs = run_results.collect_runs(dirs)
    assert len(runs) == (len(METHODS) + 1) * FOLDS  # with the dice-select replicates
    assert "adaptive-search" not in set(runs["label"])
    assert not any(issubclass(w.category, run_results.ReportWarning) for w in recwarn)
    adaptive0 = runs[(runs["label"] == "adaptive-tuned") & (runs["fold"] == 0)]["run_dir"].item()
    assert Path(adaptive0).name == "trial_0_a1b2"
    direct = runs[(runs["label"] == "dice") & (runs["fold"] == FOLDS - 1)]["run_dir"].item()
    assert Path(direct).name == "direct"


def test_duplicate_label_and_fold_keeps_the_newest(tmp_path):
    old = write_run(tmp_path / "a" / "trial_old", "dice", 0, dice=np.full(PER_FOLD, 0.1), mtime=1_000_000)
    write_run(tmp_path / "b" / "trial_new", "dice", 0, mtime=2_000_000)
    with pytest.warns(run_results.ReportWarning, match="more than once"):
        runs = run_results.collect_runs([tmp_path / "a", tmp_path / "b"])
    assert len(runs) == 1
    assert runs["test_dice"].item() == pytest.approx(image_dice("dice")[:PER_FOLD].mean())
    os.utime(old / "summary.json", (3_000_000, 3_000_000))
    with pytest.warns(run_results.ReportWarning):
        runs = run_results.collect_runs([tmp_path / "a", tmp_path / "b"])
    assert runs["test_dice"].item() == pytest.approx(0.1)


def test_plots_exist(study):
    _, out, _, md = study
    for name in ("dice_per_method.png", "eps_vs_difficulty.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
        assert f"]({name})" in md
    assert not (out / "search_history.png").exists()  # no study given


def test_eps_is_taken_at_the_last_refresh(study):
    dirs, *_ = study
    eps = run_results.epsilon_at_last_refresh(run_results.collect_runs(dirs))
    assert set(eps["epoch"]) == {4}
    assert sorted(eps["fold"].unique()) == list(range(FOLDS))
    assert len(eps) == FOLDS * (N_IMAGES - PER_FOLD)


def test_without_adaptive_runs_the_eps_plot_is_skipped_with_a_note(tmp_path):
    for fold in range(3):
        write_run(tmp_path / "grid" / f"trial_{fold}", "dice", fold)
    md = report.make_report([tmp_path / "grid"], tmp_path / "out").read_text()
    assert not (tmp_path / "out" / "eps_vs_difficulty.png").exists()
    assert "no ε-against-difficulty plot" in md
    assert "no paired tests" in md


def test_oracle_is_picked_per_dataset(study, tmp_path):
    dirs, *_ = study
    for k, label in enumerate(("adaptive-tuned", "polydice-eps-0.1", "polydice-eps+0.2")):
        for fold in range(3):
            dice = np.full(PER_FOLD, 0.9 if label == "polydice-eps-0.1" else 0.6 + 0.01 * fold)
            write_run(tmp_path / "kvasir" / f"trial_{k}_{fold}", label, fold, dice=dice, dataset="kvasir")
    md = report.make_report([*dirs, tmp_path / "kvasir"], tmp_path / "out").read_text()
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    oracles = table[table["oracle"]].set_index("dataset")["label"].to_dict()
    assert oracles == {"synthetic": "polydice-oracle (eps=+0.2)", "kvasir": "polydice-oracle (eps=-0.1)"}
    kvasir = table[table["dataset"] == "kvasir"].set_index("label")
    assert kvasir.loc["polydice-eps-0.1", "n_pairs"] == 3  # paired within its own dataset: 3 folds, 1 seed
    assert "## kvasir" in md and "## synthetic" in md and "`kvasir`: 3 folds" in md


def test_reference_option(study, tmp_path):
    dirs, *_ = study
    table = pd.read_csv(report.make_report(dirs, tmp_path / "out", reference="dice").with_name("table.csv"))
    r = row(table, "adaptive-tuned")
    assert r["reference"] == "dice"
    folds = [image_dice(x).reshape(FOLDS, PER_FOLD).mean(1) for x in ("adaptive-tuned", "dice")]
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon(*folds).pvalue)
    with pytest.raises(ValueError, match="'focal' is not among the labels"):
        report.make_report(dirs, tmp_path / "out2", reference="focal")


def toy_study(url: str, name: str, trials: int) -> None:
    study = optuna.create_study(storage=url, study_name=name, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: -(t.suggest_float("k", 0.25, 16, log=True) - 2) ** 2 - 0.01 * t.suggest_float("q", 5, 75),
                   n_trials=trials)


def test_optuna_search_history_and_importances_per_study(study, tmp_path):
    dirs, *_ = study
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'search.db'}"
    toy_study(url, "adaptive-fold0", 8)
    toy_study(url, "adaptive-fold1", 6)
    out = tmp_path / "out"
    md = report.make_report(dirs, out, optuna_storage=url, study_names=["adaptive-fold0", "adaptive-fold1"]).read_text()
    for fold in (0, 1):
        for name in (f"search_history_adaptive-fold{fold}.png", f"importances_adaptive-fold{fold}.png"):
            assert (out / name).read_bytes().startswith(b"\x89PNG")
            assert f"]({name})" in md
    importances = pd.read_csv(out / "importances.csv")
    assert set(importances["study"]) == {"adaptive-fold0", "adaptive-fold1"}
    assert set(importances["param"]) == {"k", "q"}
    assert importances.groupby("study")["importance"].sum().to_numpy() == pytest.approx([1.0, 1.0])
    assert "- `adaptive-fold0`: 8 trials, 8 completed; best " in md
    assert "- `adaptive-fold1`: 6 trials, 6 completed; best " in md
    assert "| Study | `k` | `q` |" in md


def test_optuna_single_trial_gives_a_note_instead_of_importances(study, tmp_path):
    dirs, *_ = study
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'search.db'}"
    toy_study(url, "one", 1)
    out = tmp_path / "out"
    md = report.make_report(dirs, out, optuna_storage=url, study_names=["one"]).read_text()
    assert (out / "search_history_one.png").exists()
    assert not (out / "importances.csv").exists()
    assert "no parameter importances (1 completed trial)" in md
    md = report.make_report(dirs, out, optuna_storage=url, study_names=["missing"]).read_text()
    assert "`missing`: the study could not be loaded" in md
    with pytest.raises(ValueError, match="without optuna_storage"):
        report.make_report(dirs, out, study_names=["one"])


def test_bad_input(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="nowhere"):
        report.make_report([missing], tmp_path / "out")
    search_only = tmp_path / "search" / "trial_0"
    search_only.mkdir(parents=True)
    (search_only / "summary.json").write_text(json.dumps({"config": {"method": "adaptive"}, "val_dice": 0.7}))
    with pytest.raises(ValueError, match="no tested runs"):
        report.make_report([tmp_path / "search"], tmp_path / "out")
    assert report.main(["--results", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nowhere" in err
    assert report.main(["--results", str(missing), "--out", str(tmp_path / "out"), "--study-name", "a"]) == 2
    assert "--study-name needs --optuna-storage" in capsys.readouterr().err
    assert report.main(["--results", str(missing), "--out", str(tmp_path / "out"), "--optuna-storage", "x"]) == 2
    assert "needs --study-name or --best-config" in capsys.readouterr().err


def test_cli_prints_the_table_path(study, tmp_path, capsys):
    dirs, *_ = study
    assert report.main(["--results", *map(str, dirs), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "table.md")


# ----------------------------------------------------------------------------- statistics


def holm_by_hand(p: list[float]) -> list[float]:
    """Holm from its definition: p_(i) → max over j <= i of min(1, (m − j + 1) p_(j)), 1-based ranks."""
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order, start=1):
        running = max(running, min(1.0, (m - rank + 1) * p[i]))
        adjusted[i] = running
    return adjusted


@pytest.mark.parametrize("p, expected", [
    ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),  # step-down with a monotone correction
    ([math.nan, 0.02, 0.5], [math.nan, 0.04, 0.5]),  # no test is no member of the family (m = 2)
    ([0.6, 0.7], [1.0, 1.0]),  # capped at 1
    ([0.04], [0.04]),
    ([], []),
])
def test_holm_hand_worked(p, expected):
    np.testing.assert_allclose(comparison.holm(p), expected, rtol=1e-12)


def test_table_p_values_are_holm_adjusted_across_the_methods(study):
    _, _, table, md = study
    compared = table[~table["oracle"] & (table["label"] != "adaptive-tuned")]
    assert len(compared) == 5  # with polydice-eps-val
    for column in ("wilcoxon_p", "ttest_p", "dice_loss_hard_wilcoxon_p"):
        np.testing.assert_allclose(compared[f"{column}_holm"], holm_by_hand(list(compared[column])), rtol=1e-12)
        assert (compared[f"{column}_holm"] >= compared[column]).all()
    oracle, fixed = table[table["oracle"]].iloc[0], row(table, "polydice-eps+0.2")
    assert oracle["wilcoxon_p_holm"] == fixed["wilcoxon_p_holm"]  # a copy, not a fifth member
    assert "m = 5 in `synthetic`" in md and "oracle row repeats its fixed-ε row" in md
    assert "No correction" not in md
    header = [c.strip() for c in next(x for x in md.splitlines() if x.startswith("| Method")).split("|")]
    cells = [c.strip() for c in next(x for x in md.splitlines() if x.startswith("| dice |")).split("|")]
    dice = row(table, "dice")
    assert dice["wilcoxon_p_holm"] > dice["wilcoxon_p"]
    assert cells[header.index("Wilcoxon p (Holm)⁴")] == rendering.fmt_p(dice["wilcoxon_p_holm"])
    assert cells[header.index("Fold t-test p (Holm)⁵")] == rendering.fmt_p(dice["ttest_p_holm"])


def test_bootstrap_ci_is_bca_reproducible_and_covers_the_mean():
    diff = np.array([0.01, 0.02, -0.01, 0.03, 0.15, 0.00, 0.04, 0.21])  # skewed: BCa ≠ percentile
    low, high = comparison.bootstrap_ci(diff)
    assert low < diff.mean() < high
    assert comparison.bootstrap_ci(diff) == (low, high)
    expected = stats.bootstrap((diff,), np.mean, n_resamples=9999, method="BCa",
                               **{comparison._BOOTSTRAP_RNG: np.random.default_rng(0)}).confidence_interval
    assert (low, high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert (low, high) == pytest.approx((0.01625, 0.12625), rel=1e-9)  # the BCa interval, shifted to the long tail


def test_bootstrap_ci_edge_cases_give_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(math.isnan(v) for v in comparison.bootstrap_ci([]))
        assert all(math.isnan(v) for v in comparison.bootstrap_ci([0.1]))
        assert comparison.bootstrap_ci([0.02, 0.02, 0.02]) == (0.02, 0.02)


def test_table_ci_brackets_the_mean_difference(study):
    _, _, table, md = study
    for label in list(METHODS)[1:]:
        r = row(table, label)
        diff = (image_dice(label) - image_dice("adaptive-tuned")).reshape(FOLDS, PER_FOLD).mean(1)  # per run pair
        assert (r["dice_diff_ci_low"], r["dice_diff_ci_high"]) == comparison.bootstrap_ci(diff)
        assert r["dice_diff_ci_low"] < r["dice_diff_mean"] < r["dice_diff_ci_high"]
        assert r["pair_unit"] == "image" and r["n_images_paired"] == N_IMAGES
    r = row(table, "dice")
    assert f"{r['dice_diff_mean']:+.4f} [{r['dice_diff_ci_low']:+.4f}, {r['dice_diff_ci_high']:+.4f}]" in md
    assert "BCa bootstrap" in md and "9999 resamples, seed 0" in md


# ----------------------------------------------------------------------------- CVC: per video sequence

# Three folds of four CVC frames; fold f holds sequences 2f (three frames) and 2f + 1 (one frame).
CVC_GROUPS = np.array([0, 0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5])
CVC_DICE = np.array([0.60, 0.70, 0.80, 0.50, 0.90, 0.55, 0.75, 0.85, 0.65, 0.95, 0.52, 0.88])
CVC_GAIN = np.array([0.10, 0.00, 0.05, 0.02, -0.03, 0.06, 0.00, 0.03, 0.04, 0.01, 0.07, -0.02])
# dice − adaptive per sequence: −(0.05, 0.02, 0.01, 0.03, 0.04, −0.02); per image the mean is −0.33 / 12.
CVC_SEQUENCE_DIFF = np.array([-0.05, -0.02, -0.01, -0.03, -0.04, 0.02])
CVC_DICE_HARD = [3, 5, 10]  # the three lowest of CVC_DICE: 0.50, 0.52, 0.55


def write_cvc(root: Path, *, dice_groups=True, adaptive_groups=True, with_dice=True) -> Path:
    for fold in range(3):
        part = slice(4 * fold, 4 * fold + 4)
        for label, values, groups in (("adaptive-tuned", CVC_DICE + CVC_GAIN, adaptive_groups),
                                      ("dice", CVC_DICE, dice_groups)):
            if label == "dice" and not with_dice:
                continue
            write_run(root / f"{label}_{fold}", label, fold, dice=values[part], dataset="cvc",
                      groups=CVC_GROUPS[part] if groups else False)
    return root


def test_cvc_is_paired_per_video_sequence(tmp_path):
    md = report.make_report([write_cvc(tmp_path / "cvc")], tmp_path / "out").read_text()
    r = row(pd.read_csv(tmp_path / "out" / "table.csv"), "dice")
    assert r["pair_unit"] == "sequence"
    # 3 run pairs (one seed, three folds) over 6 sequences (12 frames)
    assert r["n_pairs"] == 3 and r["n_units_paired"] == 6 and r["n_images_paired"] == 12
    assert r["dice_diff_mean"] == pytest.approx(CVC_SEQUENCE_DIFF.mean(), rel=1e-9)  # −0.13 / 6, not −0.0275
    per_fold = CVC_SEQUENCE_DIFF.reshape(3, 2).mean(1)  # each run's mean over its two sequences
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon(per_fold).pvalue, rel=1e-9)
    assert r["fixed_networks_wilcoxon_p"] == pytest.approx(stats.wilcoxon(CVC_SEQUENCE_DIFF).pvalue, rel=1e-9)
    assert r["dice_diff_ci_low"] < r["dice_diff_mean"] < r["dice_diff_ci_high"]
    assert "`cvc`: 3 folds (0, 1, 2), 12 test images" in md
    assert "paired per video sequence (n = 6 sequences)" in md
    assert "| 3 run pairs (6 sequences) |" in md
    assert "sequences, not patients" in md
    # The Dice-loss hard set (of the dice runs themselves: no dice-select here): one frame in each
    # of sequences 1, 2 and 4, one per fold.
    assert r["dice_loss_hard_n_pairs"] == 3 and r["dice_loss_hard_n_images_paired"] == 3
    assert r["dice_loss_hard_source"] == comparison.SOURCE_OWN and math.isnan(r["dice_loss_hard_wilcoxon_p"])
    assert r["dice_loss_hard_dice"] == pytest.approx(CVC_DICE[CVC_DICE_HARD].mean())
    assert r["dice_loss_hard_dice_diff_mean"] == pytest.approx(-CVC_GAIN[CVC_DICE_HARD].mean())  # −0.05
    ref = row(pd.read_csv(tmp_path / "out" / "table.csv"), "adaptive-tuned")
    assert ref["dice_loss_hard_dice"] == pytest.approx((CVC_DICE + CVC_GAIN)[CVC_DICE_HARD].mean())


def test_kvasir_like_groups_are_paired_per_image(study):
    _, _, table, md = study
    assert set(table["pair_unit"]) == {"image"}
    assert "paired per image (n = 20 images)" in md and "| 5 run pairs (20 images) |" in md


def test_per_image_csv_without_groups(tmp_path):
    # One older run without the column: the groups come from the other run's per_image.csv.
    with pytest.warns(run_results.ReportWarning, match="taken from the other runs"):
        report.make_report([write_cvc(tmp_path / "a", dice_groups=False)], tmp_path / "out_a")
    assert row(pd.read_csv(tmp_path / "out_a" / "table.csv"), "dice")["n_units_paired"] == 6
    # No run knows the sequences: per image, and the report says so.
    with pytest.warns(run_results.ReportWarning, match="paired per image, not per video sequence"):
        md = report.make_report([write_cvc(tmp_path / "b", dice_groups=False, adaptive_groups=False)],
                                tmp_path / "out_b").read_text()
    r = row(pd.read_csv(tmp_path / "out_b" / "table.csv"), "dice")
    assert r["pair_unit"] == "image" and r["n_units_paired"] == 12 and r["n_pairs"] == 3
    assert r["dice_diff_mean"] == pytest.approx(-CVC_GAIN.mean())
    assert "paired per image (n = 12 images)" in md
    assert "## Warnings" in md and "not per video sequence" in md.split("## Warnings")[1]


# ----------------------------------------------------------------------------- the Dice-loss hard set

DICE_HARD = [1, 5, 9, 13, 17]  # offset −0.04 of the dice method: 0.71 … 0.75, below every other image


def test_dice_loss_hard_set_is_the_selection_replicate_bottom_quartile(study):
    # The dice-select runs have the dice method's values here, so their bottom quarter is DICE_HARD,
    # one image per fold: each run pair's hard-set mean is that one image.
    dirs, _, table, md = study
    _, hard, source, missing = comparison.hard_set(run_results.load_per_image(run_results.collect_runs(dirs)))
    assert hard == {"synthetic": DICE_HARD} and source == {"synthetic": SELECTION_TAG} and missing == {}
    assert SELECTION_TAG not in set(table["label"]) and "`dice-select` (5 runs) only chooses the hard set" in md
    ref = image_dice("adaptive-tuned")[DICE_HARD]
    for label in METHODS:
        r, values = row(table, label), image_dice(label)[DICE_HARD]
        assert r["dice_loss_hard_dice"] == pytest.approx(values.mean())
        assert r["dice_loss_hard_n_images"] == len(DICE_HARD)
        if label != "adaptive-tuned":
            assert r["dice_loss_hard_dice_diff_mean"] == pytest.approx((values - ref).mean())
            assert r["dice_loss_hard_wilcoxon_p"] == pytest.approx(stats.wilcoxon(values, ref).pvalue)
            assert r["dice_loss_hard_n_pairs"] == FOLDS
    assert f"{row(table, 'dice')['dice_loss_hard_dice']:.4f} (n=5)" in md
    assert "Dice-loss hardest 25 % Dice³" in md and "`synthetic`: 5 images, chosen by the `dice-select` runs" in md.split("³ Dice-loss")[1]
    # the two existing difficulty columns keep their labels
    assert "Hardest 25 % Dice (own)¹" in md and "Hardest 25 % Dice (common)²" in md


def test_dice_loss_hard_ties_go_to_the_lower_index():
    per_image = pd.DataFrame({
        "dataset": "kvasir", "label": ["dice"] * 8 + ["other"] * 5, "fold": 0,
        "index": [7, 6, 5, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4], "group": 0,
        "dice": [0.5, 0.3, 0.3, 0.9, 0.3, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.4, 0.5], "difficulty": 1.0,
    })
    frame, hard, source, _ = comparison.hard_set(per_image)
    assert source == {"kvasir": comparison.SOURCE_OWN}
    assert hard == {"kvasir": [3, 5]}  # round(8 / 4) = 2 of the three at 0.3: indices 3 and 5, not 6
    other = frame.set_index("label").loc["other"]
    assert other["dice_loss_hard_n_images"] == 1 and other["dice_loss_hard_dice"] == pytest.approx(0.4)


def test_without_a_dice_loss_run_the_column_says_so(tmp_path):
    md = report.make_report([write_cvc(tmp_path / "cvc", with_dice=False)], tmp_path / "out").read_text()
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert table["dice_loss_hard_dice"].isna().all()
    line = next(x for x in md.splitlines() if x.startswith("| **adaptive-tuned**"))
    assert line.count("no Dice-loss run (`dice-select` or `dice`)") == 2
    assert "No set for `cvc`: no Dice-loss run" in md


# ----------------------------------------------------------------------------- labels and footnotes


def test_choose_reference_prefers_the_tuned_adaptive_method():
    assert method_table.choose_reference(["dice", "adaptive-thesis", "adaptive-tuned", "adaptive-tuned-fold1"]) == "adaptive-tuned"
    assert method_table.choose_reference(["dice", "adaptive-thesis", "adaptive-tuned-fold2"]) == "adaptive-tuned-fold2"
    assert method_table.choose_reference(["dice", "adaptive-thesis", "adaptive-x"]) == "adaptive-thesis"
    assert method_table.choose_reference(["dice", "adaptive-x"]) == "adaptive-x"
    assert method_table.choose_reference(["dice"]) is None
    # the best configuration, not its runner-up, even where the runner-up sorts first
    assert method_table.choose_reference(["adaptive-tuned-2-inner", "adaptive-tuned-inner"]) == "adaptive-tuned-inner"
    assert method_table.choose_reference(["adaptive-tuned-fold2-2", "adaptive-tuned-fold2"]) == "adaptive-tuned-fold2"
    assert [method_table.single_fold_of(x) for x in ("adaptive-tuned-fold2", "adaptive-tuned-fold12-2-inner",
                                               "adaptive-tuned", "adaptive-tuned-2", "dice")] == [2, 12, None, None, None]


def test_single_fold_search_is_labelled(tmp_path):
    write_run(tmp_path / "final", "adaptive-tuned", 2, config={"tag": "adaptive-tuned-fold2"})
    for fold in range(3):
        write_run(tmp_path / f"dice_{fold}", "dice", fold)
    md = report.make_report([tmp_path], tmp_path / "out").read_text()
    assert "| **adaptive-tuned-fold2** (reference; searched and tested on fold 2 only) | 1 |" in md
    assert "searched and tested on fold 2 only (a single-fold search)" in md
    r = row(pd.read_csv(tmp_path / "out" / "table.csv"), "dice")
    assert r["reference"] == "adaptive-tuned-fold2" and r["folds_shared"] == 1 and r["n_pairs"] == 1
    assert r["n_units_paired"] == PER_FOLD
    assert math.isnan(r["ttest_p"])  # one shared fold


def test_pm_dice_footnote_says_which_variant(tmp_path):
    variants = {"pm_dice": (True, True, True), "pm_dice-old": (None, None, None),
                "pm_dice-fg": (False, False, False), "pm_dice-mixed": (True, None, True)}
    for label, flags in variants.items():
        for fold, flag in enumerate(flags):
            extra = {"method": "pm_dice", "tag": label} | ({} if flag is None else {"pm_include_background": flag})
            write_run(tmp_path / f"{label}_{fold}", "dice", fold, config=extra)
    with pytest.warns(run_results.ReportWarning, match="mixes PM Dice variants"):
        md = report.make_report([tmp_path], tmp_path / "out").read_text()
    table = pd.read_csv(tmp_path / "out" / "table.csv").set_index("label")
    assert table["pm_variant"].to_dict() == {"pm_dice": "background+foreground", "pm_dice-old": "foreground",
                                             "pm_dice-fg": "foreground", "pm_dice-mixed": "mixed"}
    note = next(x for x in md.splitlines() if x.startswith("⁶"))
    assert "`pm_dice` (`synthetic`): background and foreground averaged (Eq. 5)" in note
    assert "`pm_dice-old` (`synthetic`): foreground only (3 of 3 runs have no `pm_include_background`" in note
    assert "`pm_dice-fg` (`synthetic`): foreground only;" in note
    assert ("`pm_dice-mixed` (`synthetic`): mixed (background+foreground in folds 0, 2; foreground in folds 1)"
            in note)
    assert "| pm_dice⁶ | 3 |" in md


def test_no_pm_dice_no_pm_footnote(study):
    _, _, table, md = study
    assert "⁶" not in md and table["pm_variant"].isna().all()


# ----------------------------------------------------------------------------- best configuration per fold

BEST_CONFIG = {
    "metric": "best_val_dice", "protocol": "nested", "optuna_storage": "postgresql://tune:***@db:5432/optuna",
    "folds": {
        "0": {"study_name": "adaptive-fold0", "value": 0.71, "optuna_trial": 3, "n_trials": 8,
              "params": {"k": 2.0, "q": 25.0, "e0": 10, "tau": 10, "eps_min": 0.0, "eps_max": 0.5}},
        "2": {"study_name": "adaptive-fold2", "value": 0.73, "optuna_trial": 1, "n_trials": 8,
              "params": {"k": 3.0, "q": 40.0, "e0": 15, "tau": 10, "eps_min": 0.0, "eps_max": 0.4}},
        "1": {"study_name": "adaptive-fold1", "value": 0.69, "optuna_trial": 5, "n_trials": 8,
              "params": {"k": 4.0, "q": 10.0, "e0": 5, "tau": 10, "eps_min": 0.0, "eps_max": 0.3}},
    },
    "base": {"dataset": "synthetic", "epochs": 3},
}
# (min, max, mean, sample std, cv) by hand
SPREAD = {"value": (0.69, 0.73, 0.71, 0.02, 0.02 / 0.71), "k": (2, 4, 3, 1, 1 / 3), "q": (10, 40, 25, 15, 0.6),
          "e0": (5, 15, 10, 5, 0.5), "tau": (10, 10, 10, 0, 0), "eps_min": (0, 0, 0, 0, math.nan),
          "eps_max": (0.3, 0.5, 0.4, 0.1, 0.25)}


def test_best_config_per_fold_and_spread(study, tmp_path):
    dirs, *_ = study
    path = tmp_path / "best_config.json"
    path.write_text(json.dumps(BEST_CONFIG))
    md = report.make_report(dirs, tmp_path / "out", best_config=path).read_text()
    per_fold = pd.read_csv(tmp_path / "out" / "best_config_per_fold.csv")
    assert list(per_fold["fold"]) == [0, 1, 2]
    assert list(per_fold["k"]) == [2.0, 4.0, 3.0] and list(per_fold["e0"]) == [10, 5, 15]
    spread = pd.read_csv(tmp_path / "out" / "best_config_spread.csv").set_index("parameter")
    assert list(spread.index) == list(SPREAD)
    for name, expected in SPREAD.items():
        got = spread.loc[name, ["min", "max", "mean", "std", "cv"]].to_numpy(float)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert (spread["n_folds"] == 3).all()
    section = md.split("## Best configuration per fold")[1].split("## Plots")[0]
    assert "nested cross-validation" in section and "search metric (best_val_dice)" in section
    assert "| 0 | `adaptive-fold0` | 3 | 8 | 0.7100 | 2 | 25 | 10 | 10 | 0 | 0.5 |" in section
    assert "| `e0` | 5 | 15 | 10 | 5 | 0.5 |" in section
    assert "| `eps_min` | 0 | 0 | 0 | 0 | – |" in section
    assert "postgresql://tune:***@db:5432/optuna" in section and "## Warnings" not in md


def test_best_config_names_the_studies_to_show(study, tmp_path):
    dirs, *_ = study
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'search.db'}"
    for fold in range(3):
        toy_study(url, f"adaptive-fold{fold}", 3)
    path = tmp_path / "best_config.json"
    path.write_text(json.dumps(BEST_CONFIG))
    out = tmp_path / "out"
    assert report.main(["--results", *map(str, dirs), "--out", str(out), "--optuna-storage", url,
                        "--best-config", str(path)]) == 0
    md = (out / "table.md").read_text()
    for fold in range(3):
        assert f"- `adaptive-fold{fold}`: 3 trials, 3 completed" in md
        assert (out / f"search_history_adaptive-fold{fold}.png").exists()
    assert report.main(["--results", *map(str, dirs), "--out", str(tmp_path / "out2"), "--optuna-storage", url,
                        "--study-name", "adaptive-fold1", "--study-name", "adaptive-fold2"]) == 0
    md = (tmp_path / "out2" / "table.md").read_text()
    assert "`adaptive-fold1`: 3 trials" in md and "`adaptive-fold2`: 3 trials" in md and "`adaptive-fold0`" not in md


@pytest.mark.parametrize("text, warning", [
    ("{not json", "could not be read: JSONDecodeError"),
    (json.dumps([1, 2]), "has no 'folds' object"),
    (json.dumps({"metric": "m", "best": [{"value": 0.7, "params": {"k": 2.0}}]}), "has no 'folds' object"),
    (json.dumps({"folds": {"0": {"value": 0.7, "params": [1]}, "x": {"params": {}}}}), "fold 0 has no 'params'"),
    (None, "could not be read: FileNotFoundError"),
])
def test_malformed_best_config_is_a_warning(study, tmp_path, text, warning):
    dirs, *_ = study
    path = tmp_path / "best_config.json"
    if text is not None:
        path.write_text(text)
    with pytest.warns(run_results.ReportWarning):
        md = report.make_report(dirs, tmp_path / "out", best_config=path).read_text()
    assert warning in md.split("## Warnings")[1]
    assert "Note: no per-fold best configuration could be read" in md
    assert not (tmp_path / "out" / "best_config_per_fold.csv").exists()


def test_best_config_fold_with_bad_value_is_kept_as_missing(study, tmp_path):
    dirs, *_ = study
    bad = json.loads(json.dumps(BEST_CONFIG))
    bad["folds"]["1"]["value"] = "n/a"
    bad["folds"]["x"] = {"params": {"k": 1.0}}
    path = tmp_path / "best_config.json"
    path.write_text(json.dumps(bad))
    with pytest.warns(run_results.ReportWarning):
        md = report.make_report(dirs, tmp_path / "out", best_config=path).read_text()
    warnings_part = md.split("## Warnings")[1]
    assert "fold 1 has a non-numeric value 'n/a'" in warnings_part and "fold key 'x'" in warnings_part
    spread = pd.read_csv(tmp_path / "out" / "best_config_spread.csv").set_index("parameter")
    assert spread.loc["value", "n_folds"] == 2 and spread.loc["value", "mean"] == pytest.approx(0.72)
    assert spread.loc["k", "n_folds"] == 3


# ----------------------------------------------------------------------------- splits, tuning, selection


def test_runs_with_different_splits_are_refused_naming_both(tmp_path):
    write_run(tmp_path / "a", "adaptive-tuned", 0)
    write_run(tmp_path / "b", "dice", 0, config={"split_seed": 1})
    with pytest.raises(ValueError, match=r"split_seed 0 against 1\): .*/a and .*/b"):
        report.make_report([tmp_path], tmp_path / "out")
    (tmp_path / "b" / "summary.json").unlink()
    write_run(tmp_path / "c", "dice", 0, config={"folds": 4})
    with pytest.raises(ValueError, match="folds 5 against 4"):
        report.make_report([tmp_path], tmp_path / "out")


def test_a_field_missing_from_a_summary_is_not_a_difference(tmp_path):
    write_run(tmp_path / "a", "adaptive-tuned", 0)
    folder = write_run(tmp_path / "b", "dice", 0)
    summary = json.loads((folder / "summary.json").read_text())
    del summary["config"]["split_seed"], summary["n_train"]
    (folder / "summary.json").write_text(json.dumps(summary))
    report.make_report([tmp_path], tmp_path / "out")  # no error


def test_other_settings_that_differ_are_a_warning(tmp_path):
    write_run(tmp_path / "a", "adaptive-tuned", 0, config={"image_size": 224})
    write_run(tmp_path / "b", "dice", 0, config={"image_size": 64})
    with pytest.warns(run_results.ReportWarning, match="different image_size: 64 \\(1 runs\\), 224 \\(1 runs\\)"):
        md = report.make_report([tmp_path], tmp_path / "out").read_text()
    assert "different image_size" in md.split("## Warnings")[1]


def test_eps_val_picks_the_best_validation_eps_per_fold_not_the_best_test(tmp_path):
    # ε = +0.2 has the best test Dice everywhere; on validation ε = −0.1 wins in folds 0–1, +0.0 in fold 2.
    val = {"polydice-eps-0.1": (0.9, 0.9, 0.1), "polydice-eps+0.0": (0.5, 0.5, 0.8), "polydice-eps+0.2": (0.2,) * 3}
    for label, by_fold in val.items():
        for fold in range(3):
            folder = write_run(tmp_path / f"{label}_{fold}", label, fold)
            summary = json.loads((folder / "summary.json").read_text())
            summary["val_dice"] = by_fold[fold]
            (folder / "summary.json").write_text(json.dumps(summary))
    for fold in range(3):
        write_run(tmp_path / f"ref_{fold}", "adaptive-tuned", fold)
    md = report.make_report([tmp_path], tmp_path / "out").read_text()
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    picked = row(table, "polydice-eps-val")
    expected = np.concatenate([image_dice("polydice-eps-0.1")[:8], image_dice("polydice-eps+0.0")[8:12]])
    assert picked["dice_pooled_mean"] == pytest.approx(expected.mean())
    assert picked["tuning_budget"] == 3 and picked["tuned_on"] == "validation" and not picked["oracle"]
    assert not np.isnan(picked["wilcoxon_p_holm"])  # a method, in the Holm family
    assert "fixed ε picked on validation per fold: -0.1, -0.1, +0.0" in md
    oracle = table[table["oracle"]].iloc[0]
    assert oracle["label"] == "polydice-oracle (eps=+0.2)" and oracle["tuned_on"] == "test"


def test_tuning_budget_of_the_search_comes_from_best_config(study, tmp_path):
    dirs, *_ = study
    best = tmp_path / "best_config.json"
    best.write_text(json.dumps({"protocol": "nested", "folds": {
        str(f): {"study_name": f"adaptive-fold{f}", "value": 0.8, "params": {"k": 2.0}, "n_trials": 32 - (f == 3)}
        for f in range(FOLDS)}}))
    md = report.make_report(dirs, tmp_path / "out", best_config=best).read_text()
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert row(table, "adaptive-tuned")["tuning_budget"] == "31–32"
    assert row(table, "dice")["tuning_budget"] == "1" and row(table, "dice")["tuned_on"] == "none"
    assert "| **adaptive-tuned** (reference) | 5 | 1 | 31–32 (validation) |" in md


def test_a_selection_run_sharing_a_compared_seed_gives_no_hard_set_p(tmp_path):
    for fold in range(3):
        write_run(tmp_path / f"ref_{fold}", "adaptive-tuned", fold)
        write_run(tmp_path / f"dice_{fold}", "dice", fold)
        write_run(tmp_path / f"sel_{fold}", "dice", fold, config={"tag": SELECTION_TAG, "seed": 0})
    with pytest.warns(run_results.ReportWarning, match="share a fold and seed with a compared run"):
        report.make_report([tmp_path], tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert table["dice_loss_hard_wilcoxon_p"].isna().all()
    assert row(table, "dice")["dice_loss_hard_n_pairs"] == 3


def test_a_password_in_the_optuna_url_never_reaches_the_report(study, tmp_path):
    # Both forms of a credential: user:password@host and a query parameter; the database is
    # unreachable, so the error Optuna raises (which may quote the URL) is in the report too.
    dirs, *_ = study
    for url in ("postgresql://user:Pa55-word@127.0.0.1:9/db", "postgresql://127.0.0.1:9/db?user=u&password=Pa55-word"):
        out = tmp_path / str(abs(hash(url)))
        md = report.make_report(dirs, out, optuna_storage=url, study_names=["s"]).read_text()
        assert "Pa55-word" not in md and "***" in md
