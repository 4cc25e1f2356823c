"""The paired comparison of a study's methods against its reference, with the trained network
inside the unit of inference.

A study trains every method several times per fold, with seeds ``--seed + 0 … N−1`` (the same
seeds for every method). Two runs are a **run pair** when they share the fold and the seed. For
each pair, both runs' test Dice is averaged over the test units both tested (the video sequences on
CVC-ClinicDB, whose frames are not independent; the images elsewhere), and the difference of the
two means is one observation. The tests and intervals below are computed over those run-pair
differences, so a difference between two methods has to show up across independently trained
networks, not only across the test images of one network each:

- ``wilcoxon_p``: two-sided Wilcoxon signed-rank test over the run-pair differences (exact for
  fewer than 50 pairs). It assumes the pairs are independent and their differences symmetric about
  the true mean difference; different seeds train independent networks and different folds test
  disjoint images. With one seed the pairs are the folds, and below 6 pairs no two-sided p can reach
  0.05 (the smallest is 2 / 2ⁿ).
- ``dice_diff_ci_low/high``: BCa bootstrap interval of the mean run-pair difference, resampling run
  pairs; one interval per comparison, not adjusted for the number of comparisons.
- ``ttest_p``: paired t-test of the per-fold means (each fold's runs averaged over its seeds), a
  coarser check that also allows for fold-to-fold variation of the difference.
- ``fixed_networks_wilcoxon_p``: the Wilcoxon test over the test units (each unit's Dice averaged
  over the paired seeds). It treats each trained network as fixed: a small p says that these
  networks differ on these images, not that the methods do. Information only; never Holm-adjusted,
  never a claim.

The p-values of the first two are Holm-adjusted across the methods compared within a dataset
(``<column>_holm``); each of those columns is a claim a reader may act on.

The thesis's "cases difficult for conventional methods" are the bottom quarter of the per-image
test Dice of an **independent** Dice-loss replicate per fold (``dice-select``, trained with a seed no
compared run uses, never a row of the table). A set chosen from a run's own results would judge that
run on the images where its own noise was worst (regression to the mean). Without ``dice-select``
runs the set falls back to the ``dice`` runs' own bottom quarter, and then no p-value or interval is
given for it.
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from polydice.config import SELECTION_TAG
from run_results import ReportWarning

CONFIDENCE, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 0.95, 9999, 0
# scipy >= 1.15 names the generator ``rng``; older versions ``random_state``.
_BOOTSTRAP_RNG = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
HARDEST_FRACTION = 0.25  # the same count rule as polydice.metrics.hardest_quartile_mean
DICE_LOSS_LABEL = "dice"  # the Dice-loss baseline of the thesis's "difficult cases"
HARD = "dice_loss_hard_"  # prefix of the comparison on those images
HOLM_COLUMNS = ("wilcoxon_p", "ttest_p", HARD + "wilcoxon_p")
# Where the hard set came from: an independent replicate, or the dice runs themselves (biased).
SOURCE_SELECT, SOURCE_OWN = SELECTION_TAG, "dice (own results: biased)"


# ----------------------------------------------------------------------------- tests and intervals


def paired_wilcoxon(values, reference) -> tuple[float, float, int]:
    """Two-sided Wilcoxon signed-rank test of paired values (one pair per independent unit).

    Returns:
        ``(p, mean difference values − reference, n pairs)``; p = 1 when every difference is 0,
        NaN for a single pair (no test) and without pairs.
    """
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    diff = values - reference
    if len(diff) == 0:
        return math.nan, math.nan, 0
    if len(diff) == 1:
        return math.nan, float(diff[0]), 1
    if np.all(diff == 0):
        return 1.0, 0.0, len(diff)
    return float(stats.wilcoxon(values, reference).pvalue), float(diff.mean()), len(diff)


def bootstrap_ci(diff, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """BCa bootstrap confidence interval of the mean of paired differences (one per unit).

    Resamples the units with ``BOOTSTRAP_RESAMPLES`` draws from a generator seeded with
    ``BOOTSTRAP_SEED``, so the same differences always give the same interval.

    Returns:
        ``(low, high)``; NaN below 2 units; ``(d, d)`` when every difference equals d (no spread to
        resample); NaN where BCa is undefined for the data.
    """
    diff = np.asarray(diff, float)
    if len(diff) < 2:
        return math.nan, math.nan
    if np.all(diff == diff[0]):
        return float(diff[0]), float(diff[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's degenerate-data warning: the NaN below says it
        ci = stats.bootstrap((diff,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=confidence,
                             method="BCa", **{_BOOTSTRAP_RNG: np.random.default_rng(BOOTSTRAP_SEED)}).confidence_interval
    low, high = float(ci.low), float(ci.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else (math.nan, math.nan)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (family-wise error control).

    The i-th smallest of the m p-values becomes ``max_{j <= i} min(1, (m − j + 1) p_(j))``. NaN
    entries (no test) are not members of the family and stay NaN.

    Shape: ``(m,)`` → ``(m,)``, in the input order.
    """
    p = np.asarray(pvalues, float)
    adjusted = np.full(p.shape, math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    order = tested[np.argsort(p[tested], kind="stable")]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


def fold_ttest(values, reference) -> float:
    """Paired t-test p of per-fold means (NaN below 3 folds; 1 when every difference is 0)."""
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    if len(values) < 3:
        return math.nan
    if np.all(values == reference):
        return 1.0
    return float(stats.ttest_rel(values, reference).pvalue)


# ----------------------------------------------------------------------------- run pairs


def _group_means(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means of ``values`` (n, v) per distinct row of ``keys`` (n, k): ``(keys, means, counts)``,
    sorted by key (numpy's ``unique`` and ``bincount``: a pandas groupby per comparison is the
    report's slowest part on a study with many runs)."""
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    counts = np.bincount(inverse, minlength=len(unique))
    means = np.stack([np.bincount(inverse, values[:, j], minlength=len(unique)) for j in range(values.shape[1])], 1)
    return unique, means / counts[:, None], counts


def run_pair_means(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per run pair, both runs' mean Dice over the units both tested.

    Args:
        pairs: one row per image both runs of a pair tested: ``fold, seed, group, dice, dice_ref``.

    Returns:
        Indexed by ``(fold, seed)``, sorted: ``dice, dice_ref`` (means over the pair's units, each
        unit the mean of its images) and ``n_units``.
    """
    group = pd.factorize(pairs["group"])[0]
    keys = np.column_stack([pairs["fold"].to_numpy(np.int64), pairs["seed"].to_numpy(np.int64), group])
    units, unit_means, _ = _group_means(keys, pairs[["dice", "dice_ref"]].to_numpy(float))
    runs, run_means, n_units = _group_means(units[:, :2], unit_means)
    index = pd.MultiIndex.from_arrays([runs[:, 0], runs[:, 1]], names=["fold", "seed"])
    return pd.DataFrame({"dice": run_means[:, 0], "dice_ref": run_means[:, 1], "n_units": n_units}, index=index)


def _empty(prefix: str) -> dict:
    return {f"{prefix}n_pairs": 0, f"{prefix}n_units_paired": 0, f"{prefix}n_images_paired": 0,
            f"{prefix}dice_diff_mean": math.nan, f"{prefix}dice_diff_ci_low": math.nan,
            f"{prefix}dice_diff_ci_high": math.nan, f"{prefix}wilcoxon_p": math.nan,
            f"{prefix}fixed_networks_wilcoxon_p": math.nan}


def compare(pairs: pd.DataFrame, prefix: str = "", inference: bool = True) -> dict:
    """The statistics of the module docstring for one method against the reference.

    Args:
        pairs: ``fold, seed, index, group, dice, dice_ref`` for every image of every run pair.
        prefix: prefix of the returned keys (``HARD`` for the hard set).
        inference: ``False`` gives the mean difference alone (no p-value, no interval), for a set
            that is not independent of the runs it judges.

    Returns:
        ``{prefix + key}`` for ``n_pairs`` (run pairs), ``n_units_paired``, ``n_images_paired``,
        ``dice_diff_mean`` (mean run-pair difference), ``dice_diff_ci_low/high``, ``wilcoxon_p``,
        ``fixed_networks_wilcoxon_p``; and ``ttest_p`` (per-fold means) without a prefix.
    """
    out = _empty(prefix)
    if not prefix:
        out["ttest_p"] = math.nan
    if pairs.empty:
        return out
    runs = run_pair_means(pairs)
    diff = (runs["dice"] - runs["dice_ref"]).to_numpy()
    dice = pairs[["dice", "dice_ref"]].to_numpy(float)
    fold = pairs["fold"].to_numpy(np.int64)
    # Each test unit over the paired seeds: the networks held fixed.
    _, fixed, _ = _group_means(np.column_stack([fold, pd.factorize(pairs["group"])[0]]), dice)
    images = len(np.unique(np.column_stack([fold, pairs["index"].to_numpy(np.int64)]), axis=0))
    out.update({f"{prefix}n_pairs": len(runs), f"{prefix}n_units_paired": len(fixed),
                f"{prefix}n_images_paired": images, f"{prefix}dice_diff_mean": float(diff.mean())})
    if not inference:
        return out
    low, high = bootstrap_ci(diff)
    out.update({f"{prefix}dice_diff_ci_low": low, f"{prefix}dice_diff_ci_high": high,
                f"{prefix}wilcoxon_p": paired_wilcoxon(runs["dice"], runs["dice_ref"])[0],
                f"{prefix}fixed_networks_wilcoxon_p": paired_wilcoxon(fixed[:, 0], fixed[:, 1])[0]})
    if not prefix:
        _, folds, _ = _group_means(runs.index.get_level_values("fold").to_numpy()[:, None],
                                   runs[["dice", "dice_ref"]].to_numpy())
        out["ttest_p"] = fold_ttest(folds[:, 0], folds[:, 1])
    return out


def _pairs(per_image: pd.DataFrame, label: str, reference: str) -> pd.DataFrame:
    """The images that runs of ``label`` and of ``reference`` with the same fold and seed both tested."""
    mine = per_image.loc[per_image["label"] == label, ["fold", "seed", "index", "group", "dice"]]
    ref = per_image.loc[per_image["label"] == reference, ["fold", "seed", "index", "dice"]]
    return mine.merge(ref, on=["fold", "seed", "index"], suffixes=("", "_ref"))


def paired_tests(runs: pd.DataFrame, per_image: pd.DataFrame, reference: str | None,
                 hard: dict | None = None, hard_source: dict | None = None) -> pd.DataFrame:
    """Every label against ``reference`` within its dataset, over their run pairs.

    Args:
        runs: :func:`run_results.collect_runs` (``dataset, label, fold, seed, run_dir``).
        per_image: :func:`run_results.load_per_image` (``dataset, label, fold, seed, index, group, dice``).
        reference: the label compared against; ``None`` gives empty comparisons.
        hard: ``{dataset: image indices}`` of the hard set (:func:`hard_set`).
        hard_source: ``{dataset: SOURCE_SELECT | SOURCE_OWN}``; a set of the ``dice`` runs' own
            results gets the mean difference but no p-value or interval.

    Returns:
        One row per (dataset, label): ``reference, folds_shared``, the keys of :func:`compare`, the
        same with the ``HARD`` prefix, and every column of ``HOLM_COLUMNS`` Holm-adjusted across the
        labels of the dataset (``<column>_holm``). ``dice-select`` is never a row.
    """
    hard, hard_source = hard or {}, hard_source or {}
    rows = []
    for (dataset, label), group in runs.groupby(["dataset", "label"]):
        if label == SELECTION_TAG:
            continue
        row = {"dataset": dataset, "label": label, "reference": reference, "folds_shared": 0,
               **compare(pd.DataFrame()), **compare(pd.DataFrame(), HARD)}
        ref = runs[(runs["dataset"] == dataset) & (runs["label"] == reference)]
        if reference is None or label == reference or ref.empty:
            rows.append(row)
            continue
        mine = set(zip(group["fold"], group["seed"]))
        theirs = set(zip(ref["fold"], ref["seed"]))
        shared_folds = set(group["fold"]) & set(ref["fold"])
        unpaired = sorted((f, s) for f, s in mine ^ theirs if f in shared_folds)
        if unpaired:
            warnings.warn(f"{label} against {reference} ({dataset}): runs of fold/seed {unpaired} have no run of the "
                          "other with the same fold and seed; left out of the paired tests", ReportWarning, stacklevel=2)
        pairs = _pairs(per_image[per_image["dataset"] == dataset], label, reference)
        row.update(folds_shared=int(pairs["fold"].nunique()), **compare(pairs))
        if dataset in hard:
            on = pairs[pairs["index"].isin(hard[dataset])]
            row.update(compare(on, HARD, inference=hard_source.get(dataset) == SOURCE_SELECT))
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in HOLM_COLUMNS:
        table[f"{column}_holm"] = table.groupby("dataset")[column].transform(holm)
    return table


# ----------------------------------------------------------------------------- the hard set


def bottom(values: pd.Series, fraction: float, ascending: bool) -> np.ndarray:
    """Sorted indices of the ``max(1, round(fraction · n))`` lowest (or highest) values, ties by index."""
    values = values.sort_index()
    n = max(1, int(round(fraction * len(values))))
    key = values.to_numpy() if ascending else -values.to_numpy()
    ranked = np.argsort(key, kind="stable")  # stable on the sorted index: ties go to the lower index
    return np.sort(values.index.to_numpy()[ranked[:n]])


def hard_set(per_image: pd.DataFrame, fraction: float = HARDEST_FRACTION) -> tuple[pd.DataFrame, dict, dict, dict]:
    """The thesis's "cases difficult for conventional methods" per dataset, and every method's mean
    Dice over them.

    The set is the bottom ``fraction`` (``max(1, round(fraction · n))`` images, ties to the lower
    dataset index) of the ``dice-select`` runs' per-image test Dice pooled over their folds (an
    image tested by several of them takes their mean). Without ``dice-select`` runs it is the same
    over the ``dice`` runs (source ``SOURCE_OWN``: biased against ``dice``). One set for every
    method; each averages the images of the set it tested, over all its runs.

    Returns:
        ``(frame with dataset, label, dice_loss_hard_dice, dice_loss_hard_n_images,
        {dataset: sorted indices}, {dataset: source}, {dataset: why there is no set})``.
    """
    rows, sets, sources, missing = [], {}, {}, {}
    for dataset, images in per_image.groupby("dataset"):
        for source, label in ((SOURCE_SELECT, SELECTION_TAG), (SOURCE_OWN, DICE_LOSS_LABEL)):
            dice = images.loc[images["label"] == label].groupby("index")["dice"].mean().dropna()
            if not dice.empty:
                sets[dataset], sources[dataset] = bottom(dice, fraction, ascending=True).tolist(), source
                break
        else:
            missing[dataset] = f"no Dice-loss run (`{SELECTION_TAG}` or `{DICE_LOSS_LABEL}`)"
            continue
        for label, of in images.groupby("label"):
            if label == SELECTION_TAG:
                continue
            on = of[of["index"].isin(sets[dataset])]
            rows.append({"dataset": dataset, "label": label,
                         "dice_loss_hard_dice": on["dice"].mean() if len(on) else math.nan,
                         "dice_loss_hard_n_images": on["index"].nunique()})
    frame = pd.DataFrame(rows, columns=["dataset", "label", "dice_loss_hard_dice", "dice_loss_hard_n_images"])
    return frame, sets, sources, missing


def selection_seed_clashes(runs: pd.DataFrame) -> list[str]:
    """``dice-select`` runs whose (dataset, fold, seed) a compared run shares: their set is not
    independent of that run (it shares its initial weights and batches)."""
    select = runs[runs["label"] == SELECTION_TAG]
    compared = runs[runs["label"] != SELECTION_TAG]
    used = set(zip(compared["dataset"], compared["fold"], compared["seed"]))
    return [f"{r.run_dir} (fold {r.fold}, seed {r.seed})" for r in select.itertuples()
            if (r.dataset, r.fold, r.seed) in used]


def common_hardest(per_image: pd.DataFrame, fraction: float = HARDEST_FRACTION) -> tuple[pd.DataFrame, dict]:
    """Each method's mean Dice over one hardest set of images per dataset.

    An image's difficulty is the mean over every compared run (all methods, all seeds) of the
    MC-Dropout difficulty its final model gave it; the hardest ``fraction`` (at least one) by that
    mean is shared. The set therefore depends on which methods are passed in.

    Returns:
        ``(frame with dataset, label, dice_hardest_quartile_common, n_hardest_common,
        {dataset: sorted hardest indices})``.
    """
    rows, hardest = [], {}
    per_image = per_image[per_image["label"] != SELECTION_TAG]
    for dataset, images in per_image.groupby("dataset"):
        difficulty = images.groupby("index")["difficulty"].mean().dropna()
        if difficulty.empty:
            continue
        hard = bottom(difficulty, fraction, ascending=False)
        hardest[dataset] = hard.tolist()
        for label, of in images.groupby("label"):
            on = of[of["index"].isin(hard)]
            rows.append({"dataset": dataset, "label": label,
                         "dice_hardest_quartile_common": on["dice"].mean() if len(on) else math.nan,
                         "n_hardest_common": on["index"].nunique()})
    return pd.DataFrame(rows, columns=["dataset", "label", "dice_hardest_quartile_common", "n_hardest_common"]), hardest
