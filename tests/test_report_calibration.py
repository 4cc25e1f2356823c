"""The report's claims of a difference, on fabricated studies with known answers.

A fabricated study has the layout of a real one: 5 folds of a Kvasir-like set (every image its
own unit), every method trained with 3 seeds per fold, and one ``dice-select`` replicate per fold.
Per-image test Dice is

    clip(μ_i + effect_m,i + b_run + c_fold,seed,i + e_run,i, 0, 1)

with μ_i the image's true Dice (Beta(5, 2)), b_run ~ N(0, σ_b) one offset per trained network,
c a term shared by every run of one fold and seed (the same initial weights and batches: methods
close to each other share part of their luck) and e_run,i independent noise. Under the null every
method is the same method (effect 0); the planted effect gives the reference +0.04 on every image
and +0.10 more on the true hardest quarter (lowest μ).

The claim rate of a ``*_p_holm`` column is the share of studies in which any row of it is below
0.05; each must stay at its nominal family-wise rate under training randomness (≤ 0.10 here over
40 studies), and the main and hard-set comparisons must find the planted effect (≥ 80 % / ≥ 70 %).
The per-image test that treats each network as fixed is shown to claim far more often on the same
null studies: it is the test that the run-pair test replaced.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))

import comparison  # noqa: E402
import method_table  # noqa: E402
import report  # noqa: E402
import run_results  # noqa: E402
from polydice.config import SELECTION_SEED_OFFSET, SELECTION_TAG  # noqa: E402

FOLDS, PER_FOLD, SEEDS = 5, 40, (0, 1, 2)
REFERENCE = "adaptive-tuned"
# label: (method, eps)
METHODS = {
    REFERENCE: ("adaptive", np.nan),
    "adaptive-thesis": ("adaptive", np.nan),
    "dice": ("dice", np.nan),
    "dice-linear": ("dice_linear", np.nan),
    "focal": ("focal", np.nan),
    "ce_dice": ("ce_dice", np.nan),
    "pm_dice": ("pm_dice", np.nan),
    "polydice-eps-0.2": ("polydice", -0.2),
    "polydice-eps+0.0": ("polydice", 0.0),
    "polydice-eps+0.2": ("polydice", 0.2),
    "polydice-eps+0.4": ("polydice", 0.4),
}
SIGMA_RUN, SIGMA_SHARED, SIGMA_IMAGE = 0.015, 0.04, 0.06
GAIN_ALL, GAIN_HARD = 0.04, 0.10
N_STUDIES, ALPHA = 40, 0.05


def fabricate(seed: int, planted: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, per_image)`` of one fabricated study, in the form of run_results.collect_runs and
    run_results.load_per_image."""
    rng = np.random.default_rng(seed)
    n = FOLDS * PER_FOLD
    mu = rng.beta(5, 2, n)
    hardest = np.argsort(mu, kind="stable")[: n // 4]
    gain = np.zeros(n)
    gain[hardest] = GAIN_HARD
    gain += GAIN_ALL
    fold_of = np.arange(n) // PER_FOLD
    shared = {(f, s): rng.normal(0, SIGMA_SHARED, n) for f in range(FOLDS) for s in (*SEEDS, SELECTION_SEED_OFFSET)}
    runs, images = [], []
    jobs = [(label, s) for label in METHODS for s in SEEDS] + [(SELECTION_TAG, SELECTION_SEED_OFFSET)]
    for label, s in jobs:
        method, eps = METHODS.get(label, ("dice", np.nan))
        effect = gain if planted and label == REFERENCE else 0.0
        for f in range(FOLDS):
            offset = rng.normal(0, SIGMA_RUN)
            dice = np.clip(mu + effect + offset + shared[f, s] + rng.normal(0, SIGMA_IMAGE, n), 0, 1)[fold_of == f]
            index = np.flatnonzero(fold_of == f)
            run_dir = f"/fabricated/{seed}/{label}-fold{f}-seed{s}"
            runs.append({"dataset": "kvasir", "label": label, "method": method, "eps": eps, "fold": f,
                         "folds": FOLDS, "split_seed": 0, "seed": s, "image_size": 224, "epochs": 200,
                         "pm_variant": None, "pm_field_missing": False,
                         **{f"test_{m}": float(dice.mean()) for m in run_results.METRICS},
                         "val_dice": 0.75 + offset + rng.normal(0, 0.01), "best_epoch": 100,
                         "n_train": 4 * PER_FOLD * 0.8, "n_val": 4 * PER_FOLD * 0.2, "n_test": PER_FOLD,
                         "n_images": n, "run_dir": run_dir, "mtime": 0.0})
            images.append(pd.DataFrame({"dataset": "kvasir", "label": label, "fold": f, "seed": s, "index": index,
                                        "group": index, "dice": dice, "difficulty": 1 - mu[index]}))
    return pd.DataFrame(runs), pd.concat(images, ignore_index=True)


def claim_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.endswith("p_holm")]


@pytest.fixture(scope="module")
def null_tables() -> list[pd.DataFrame]:
    return [method_table.build_table(*fabricate(seed, planted=False))[0] for seed in range(N_STUDIES)]


@pytest.fixture(scope="module")
def planted_tables() -> list[pd.DataFrame]:
    return [method_table.build_table(*fabricate(1000 + seed, planted=True))[0] for seed in range(N_STUDIES)]


def claim_rate(tables: list[pd.DataFrame], column: str, labels=None) -> float:
    claims = []
    for table in tables:
        rows = table if labels is None else table[table["label"].isin(labels)]
        claims.append(bool((rows[column] < ALPHA).any()))
    return float(np.mean(claims))


def test_every_p_holm_column_keeps_its_error_rate_on_null_studies(null_tables):
    columns = claim_columns(null_tables[0])
    assert set(columns) == {"wilcoxon_p_holm", "ttest_p_holm", "dice_loss_hard_wilcoxon_p_holm"}
    rates = {c: claim_rate(null_tables, c) for c in columns}
    print("null claim rates:", rates)
    assert all(rate <= 0.10 for rate in rates.values()), rates
    table = null_tables[0]
    compared = table[~table["oracle"] & (table["label"] != REFERENCE)]
    assert (compared["n_pairs"] == FOLDS * len(SEEDS)).all()
    assert set(table["dice_loss_hard_source"]) == {SELECTION_TAG}
    assert SELECTION_TAG not in set(table["label"])


def test_the_fixed_network_test_would_claim_differences_on_the_same_null_studies(null_tables):
    # The per-image test over the same images treats each network as fixed; with several methods it
    # finds "differences" between identical methods in most studies. It is information, never a claim.
    rate = claim_rate(null_tables, "fixed_networks_wilcoxon_p")
    print("fixed-network per-image Wilcoxon, raw p < 0.05 in any row:", rate)
    assert rate > 0.5


def test_the_planted_effect_is_found(planted_tables):
    others = [label for label in METHODS if label != REFERENCE]
    main = claim_rate(planted_tables, "wilcoxon_p_holm", others)
    hard = claim_rate(planted_tables, "dice_loss_hard_wilcoxon_p_holm", others)
    # Power per comparison: how often a single method's comparison finds it.
    per_row = np.mean([(t.loc[t["label"].isin(others), "wilcoxon_p_holm"] < ALPHA).mean() for t in planted_tables])
    per_row_hard = np.mean([(t.loc[t["label"].isin(others), "dice_loss_hard_wilcoxon_p_holm"] < ALPHA).mean()
                            for t in planted_tables])
    print(f"planted effect found: main {main:.2f} (per comparison {per_row:.2f}), "
          f"hard set {hard:.2f} (per comparison {per_row_hard:.2f})")
    assert per_row >= 0.80 and per_row_hard >= 0.70
    diff = np.mean([t.loc[t["label"] == "dice", "dice_diff_mean"].item() for t in planted_tables])
    hard_diff = np.mean([t.loc[t["label"] == "dice", "dice_loss_hard_dice_diff_mean"].item() for t in planted_tables])
    assert diff == pytest.approx(-GAIN_ALL - GAIN_HARD / 4, abs=0.01)  # the method minus the reference
    assert hard_diff < diff  # the independent hard set holds more of the hardest images' extra gain


def test_a_hard_set_chosen_by_the_dice_runs_gives_no_p_value():
    runs, per_image = fabricate(7, planted=False)
    keep = runs["label"] != SELECTION_TAG
    table, info = method_table.build_table(runs[keep], per_image[per_image["label"] != SELECTION_TAG])
    assert info["hard_source"] == {"kvasir": comparison.SOURCE_OWN}
    assert table["dice_loss_hard_wilcoxon_p_holm"].isna().all()
    assert table["dice_loss_hard_dice_diff_mean"].notna().sum() > 1  # the values are still shown
    # Its bias: on its own bottom quarter `dice` scores below the identical other methods.
    dice = table.loc[table["label"] == "dice", "dice_loss_hard_dice"].item()
    others = table.loc[~table["label"].isin(["dice"]) & ~table["oracle"], "dice_loss_hard_dice"]
    assert dice < others.min()


def test_files_give_the_table_of_the_frames(tmp_path):
    """The same fabricated study written as run folders: make_report's table.csv is build_table's."""
    runs, per_image = fabricate(3, planted=True)
    for run in runs.itertuples():
        folder = tmp_path / "study" / Path(run.run_dir).name
        folder.mkdir(parents=True)
        config = {"dataset": run.dataset, "method": run.method, "fold": run.fold, "folds": run.folds,
                  "split_seed": 0, "seed": run.seed, "image_size": 224, "epochs": 200,
                  "tag": run.label}
        if run.method == "polydice":
            config["eps"] = run.eps
        summary = {"config": config, "val_dice": run.val_dice, "n_train": run.n_train, "n_val": run.n_val,
                   "n_test": run.n_test, **{f"test_{m}": getattr(run, f"test_{m}") for m in run_results.METRICS}}
        (folder / "summary.json").write_text(json.dumps(summary))
        rows = per_image[(per_image["label"] == run.label) & (per_image["fold"] == run.fold)
                         & (per_image["seed"] == run.seed)]
        rows[["index", "group", "dice", "difficulty"]].to_csv(folder / "per_image.csv", index=False)
    report.make_report([tmp_path / "study"], tmp_path / "out")
    written = pd.read_csv(tmp_path / "out" / "table.csv").set_index("label")
    expected = method_table.build_table(runs, per_image)[0].set_index("label")
    for column in ("dice_mean", "dice_pooled_mean", "n_seeds", "n_pairs", "dice_diff_mean", "wilcoxon_p_holm",
                   "ttest_p_holm", "dice_loss_hard_wilcoxon_p_holm", "dice_diff_ci_low"):
        np.testing.assert_allclose(written.loc[expected.index, column].astype(float),
                                   expected[column].astype(float), rtol=1e-9, err_msg=column)
    assert (written["n_seeds"] == len(SEEDS)).all()
    assert written.loc["polydice-eps-val", "tuned_on"] == "validation"
