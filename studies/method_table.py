"""The table of a study: one row per method, from its runs and their per-image results.

Per method: every test metric's mean ± std over folds (each fold's seeds averaged first), the Dice
pooled over every tested image, the seeds and the tuning budget; the paired comparison against the
reference and the hard images (studies/comparison.py); ``polydice-eps-val``, the fixed ε picked per
fold on validation Dice (a method), and the fixed-ε oracle picked on test Dice (labelled as one).
"""

from __future__ import annotations

import math
import re
import warnings

import pandas as pd

from comparison import (HARD, SOURCE_SELECT, common_hardest, hard_set, paired_tests,
                        selection_seed_clashes)
from polydice.config import SELECTION_TAG
from run_results import METRICS, ReportWarning, check_splits, pairing_units

ZERO_EPS_LABEL = "polydice-eps+0.0"
EPS_VAL_LABEL = "polydice-eps-val"  # per fold, the fixed ε with the best mean validation Dice
# studies/tune_adaptive.py --search-fold F: adaptive-tuned-fold<F>, with -<rank> and -inner suffixes
SINGLE_FOLD_LABEL = re.compile(r"^adaptive-tuned-fold(\d+)(?:-|$)")
FIXED_EPS_LABEL = re.compile(r"^polydice-eps[+-]\d\.\d$")  # the grid's fixed-ε runs (not -inner, not -val)


def single_fold_of(label: str) -> int | None:
    """The fold of a single-fold search's label (``adaptive-tuned-fold2``, ``adaptive-tuned-fold2-2`` → 2),
    else None."""
    match = SINGLE_FOLD_LABEL.match(str(label))
    return int(match.group(1)) if match else None


def choose_reference(labels, reference: str | None = None) -> str | None:
    """``reference`` if given, else ``adaptive-tuned`` (nested search), else the shortest label
    starting with ``adaptive-tuned`` (``adaptive-tuned-fold2`` of a single-fold search rather than
    its runner-up ``adaptive-tuned-fold2-2``), else ``adaptive-thesis``, else the first ``adaptive*``
    label.

    Raises:
        ValueError: ``reference`` is not one of ``labels``.
    """
    labels = sorted(set(labels))
    if reference is not None:
        if reference not in labels:
            raise ValueError(f"reference {reference!r} is not among the labels: {', '.join(labels)}")
        return reference
    if "adaptive-tuned" in labels:
        return "adaptive-tuned"
    tuned = sorted((name for name in labels if name.startswith("adaptive-tuned")), key=lambda n: (len(n), n))
    if tuned:
        return tuned[0]
    if "adaptive-thesis" in labels:
        return "adaptive-thesis"
    return next((name for name in labels if name.startswith("adaptive")), None)


def eps_val_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """``polydice-eps-val``: per (dataset, fold), the runs of the fixed ε with the best mean
    validation Dice over its seeds, relabelled; a method like any other (no test image is read to
    pick it). Needs at least two fixed-ε labels with a validation Dice in the fold.

    Returns:
        ``(runs of EPS_VAL_LABEL with their own label in ``source_label``, {dataset: {fold: (ε,
        candidates)}})``.
    """
    fixed = runs[runs["label"].map(lambda x: bool(FIXED_EPS_LABEL.match(str(x)))) & (runs["method"] == "polydice")]
    picked, choice = [], {}
    for (dataset, fold), of in fixed.dropna(subset=["val_dice"]).groupby(["dataset", "fold"]):
        means = of.groupby("eps")["val_dice"].mean()
        if len(means) < 2:
            continue
        eps = means.idxmax()  # ties: the lowest ε
        choice.setdefault(dataset, {})[int(fold)] = (float(eps), len(means))
        picked.append(of[of["eps"] == eps].assign(source_label=lambda x: x["label"], label=EPS_VAL_LABEL))
    return (pd.concat(picked, ignore_index=True) if picked else runs.iloc[:0]), choice


def summarize(runs: pd.DataFrame, per_image: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, label): every test metric's mean and sample std (ddof = 1) over folds of the
    fold means (each fold's runs averaged over their seeds), ``dice_pooled_mean`` (the mean over
    every tested image, pooled over folds and seeds: the thesis's "average over the entire test
    dataset"), ``folds``, ``n_seeds`` (the fewest seeds of a fold), ``max_seeds``, ``n_runs``.

    ``pm_variant`` is the PM Dice variant of the label's runs (``"mixed"`` when its folds differ,
    with a warning); empty for other methods. ``dice-select`` runs are no row.
    """
    rows = []
    pooled = per_image.groupby(["dataset", "label"])["dice"].mean()
    for (dataset, label), group in runs[runs["label"] != SELECTION_TAG].groupby(["dataset", "label"], sort=True):
        if group["method"].nunique() > 1:
            warnings.warn(f"label {label!r} mixes methods {sorted(group['method'].unique())}", ReportWarning, stacklevel=2)
        variants = sorted(group["pm_variant"].dropna().unique())
        if len(variants) > 1:
            warnings.warn(f"{label} ({dataset}) mixes PM Dice variants across folds: "
                          + "; ".join(f"{v} in folds {sorted(group.loc[group['pm_variant'] == v, 'fold'])}"
                                      for v in variants), ReportWarning, stacklevel=2)
        eps = group["eps"].dropna().unique()
        seeds = group.groupby("fold")["seed"].nunique()
        row = {"dataset": dataset, "label": label, "method": group["method"].iloc[0],
               "eps": eps[0] if len(eps) == 1 else math.nan, "folds": len(seeds),
               "n_seeds": int(seeds.min()), "max_seeds": int(seeds.max()), "n_runs": len(group),
               "n_test": group.groupby("fold")["n_test"].first().sum(min_count=1),
               "pm_variant": variants[0] if len(variants) == 1 else ("mixed" if variants else ""),
               "dice_pooled_mean": pooled.get((dataset, label), math.nan)}
        folds = group.groupby("fold")[[f"test_{key}" for key in METRICS]].mean()
        for key in METRICS:
            row[f"{key}_mean"] = folds[f"test_{key}"].mean()
            row[f"{key}_std"] = folds[f"test_{key}"].std(ddof=1)
        rows.append(row)
    return pd.DataFrame(rows)


def tuning_budgets(table: pd.DataFrame, eps_choice: dict, per_fold: pd.DataFrame) -> pd.DataFrame:
    """Each row's tuning budget: ``tuning_budget`` (configurations scored per fold, e.g. ``"1"``,
    ``"9"``, ``"30–32"``; empty where unknown) and ``tuned_on`` (``"none"``, ``"validation"``, or
    ``"test"`` for the oracle). The tuned adaptive method's budget is its search's trials per fold
    (``best_config.json``); without that file it is unknown."""
    trials = pd.to_numeric(per_fold.get("n_trials", pd.Series(dtype=float)), errors="coerce").dropna()

    def span(values) -> str:
        values = sorted({int(v) for v in values})
        return "" if not values else str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"

    budget, tuned_on = [], []
    for row in table.itertuples():
        if row.oracle:
            n = table[(table["dataset"] == row.dataset) & ~table["oracle"]
                      & table["label"].map(lambda x: bool(FIXED_EPS_LABEL.match(str(x))))]
            budget.append(str(len(n)))
            tuned_on.append("test")
        elif row.label == EPS_VAL_LABEL:
            budget.append(span(n for _, n in eps_choice.get(row.dataset, {}).values()))
            tuned_on.append("validation")
        elif str(row.label).startswith("adaptive-tuned"):
            budget.append(span(trials))
            tuned_on.append("validation")
        else:
            budget.append("1")
            tuned_on.append("none")
    return table.assign(tuning_budget=budget, tuned_on=tuned_on)


def add_oracle(table: pd.DataFrame) -> pd.DataFrame:
    """Append, per dataset, a copy of the fixed-ε PolyDice row with the best mean TEST Dice.

    The copy is labelled ``polydice-oracle (eps=+0.2)`` and flagged ``oracle=True``: ε was picked
    on test data, so it is an upper bound for a fixed ε, not a method. It repeats its row's tests
    and is not a member of their Holm family.
    """
    table = table.assign(oracle=False)
    fixed = table[(table["method"] == "polydice")
                  & (table["label"] == table["eps"].map(lambda e: f"polydice-eps{e:+.1f}"))]
    oracles = []
    for _, group in fixed.groupby("dataset"):
        best = group.loc[group["dice_mean"].idxmax()].copy()
        best["label"], best["oracle"] = f"polydice-oracle (eps={best['eps']:+.1f})", True
        oracles.append(best)
    return pd.concat([table, pd.DataFrame(oracles)], ignore_index=True) if oracles else table


TABLE_COLUMNS = (
    ["dataset", "label", "method", "eps", "oracle", "folds", "n_seeds", "max_seeds", "n_runs", "tuning_budget",
     "tuned_on", "n_test", "pm_variant"]
    + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    + ["dice_pooled_mean", "dice_hardest_quartile_common", "n_hardest_common", "dice_loss_hard_dice",
       "dice_loss_hard_n_images", "dice_loss_hard_source", "reference", "folds_shared", "pair_unit", "n_pairs",
       "n_units_paired", "n_images_paired", "dice_diff_mean", "dice_diff_ci_low", "dice_diff_ci_high", "wilcoxon_p",
       "wilcoxon_p_holm", "ttest_p", "ttest_p_holm", "fixed_networks_wilcoxon_p"]
    + [HARD + c for c in ("n_pairs", "n_units_paired", "n_images_paired", "dice_diff_mean", "dice_diff_ci_low",
                          "dice_diff_ci_high", "wilcoxon_p", "wilcoxon_p_holm", "fixed_networks_wilcoxon_p")]
)


def build_table(runs: pd.DataFrame, per_image: pd.DataFrame, reference: str | None = None,
                per_fold: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """The report's table from the runs and their per-image results (no files read or written).

    Args:
        runs: :func:`collect_runs`.
        per_image: :func:`load_per_image` of those runs.
        reference: label of the paired tests' reference (default: :func:`choose_reference`).
        per_fold: :func:`load_best_config`'s per-fold frame, for the tuned method's budget.

    Returns:
        ``(table, info)``: the table's rows sorted as shown, with the columns of ``TABLE_COLUMNS``
        (and more); ``info`` holds ``reference, runs`` (with ``polydice-eps-val``), ``units,
        hardest, hard_sets, hard_source, no_hard_set, eps_choice``.

    Raises:
        ValueError: runs with different splits (:func:`check_splits`), an unknown reference.
    """
    check_splits(runs)
    eps_runs, eps_choice = eps_val_runs(runs)
    if not eps_runs.empty:
        picked = eps_runs[["dataset", "source_label", "fold", "seed"]].rename(columns={"source_label": "label"})
        copies = per_image.merge(picked, on=["dataset", "label", "fold", "seed"])
        runs = pd.concat([runs, eps_runs.drop(columns="source_label")], ignore_index=True)
        per_image = pd.concat([per_image, copies.assign(label=EPS_VAL_LABEL)], ignore_index=True)
    compared = runs[runs["label"] != SELECTION_TAG]
    reference = choose_reference(compared["label"], reference)
    units = pairing_units(per_image)
    table = summarize(runs, per_image)
    common, hardest = common_hardest(per_image)
    hard_dice, hard_sets, hard_source, no_hard_set = hard_set(per_image)
    clashes = selection_seed_clashes(runs)
    if clashes:
        warnings.warn(f"`{SELECTION_TAG}` runs share a fold and seed with a compared run, so their hard set is not "
                      f"independent of it: {'; '.join(clashes)}; no p-value on the hard set", ReportWarning, stacklevel=2)
        for dataset in {c for c in runs.loc[runs["label"] == SELECTION_TAG, "dataset"]}:
            if hard_source.get(dataset) == SOURCE_SELECT:
                hard_source[dataset] = f"{SELECTION_TAG} (seed shared with a compared run)"
    no_hard_set.update({d: "no per-image results" for d in runs["dataset"].unique() if d not in units})
    table = table.merge(common, on=["dataset", "label"], how="left")
    table = table.merge(hard_dice, on=["dataset", "label"], how="left")
    table = table.merge(paired_tests(runs, per_image, reference, hard_sets, hard_source),
                        on=["dataset", "label"], how="left")
    table["pair_unit"] = table["dataset"].map(lambda d: units.get(d, {}).get("unit", ""))
    table["dice_loss_hard_source"] = table["dataset"].map(lambda d: hard_source.get(d, ""))
    table = add_oracle(table)
    table = tuning_budgets(table, eps_choice, per_fold if per_fold is not None else pd.DataFrame())
    for column in ("n_hardest_common", "dice_loss_hard_n_images"):
        table[column] = table[column].fillna(0).astype(int)
    table = table.sort_values(["dataset", "oracle", "dice_mean"], ascending=[True, True, False], kind="stable")
    info = {"reference": reference, "runs": runs, "units": units, "hardest": hardest, "hard_sets": hard_sets,
            "hard_source": hard_source, "no_hard_set": no_hard_set, "eps_choice": eps_choice}
    return table.reset_index(drop=True), info
