"""The report's text: the markdown table of the methods, its footnotes and the page's opening lines."""

from __future__ import annotations

import math

import pandas as pd

from comparison import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, DICE_LOSS_LABEL, HARD, SOURCE_SELECT
from method_table import EPS_VAL_LABEL, ZERO_EPS_LABEL, single_fold_of
from polydice.config import SELECTION_TAG
from run_results import METRICS, PM_BOTH, PM_FOREGROUND

HEADERS = {
    "dice": "Dice", "iou": "IoU", "precision": "Precision", "recall": "Recall", "nsd": "NSD",
    "nll": "NLL", "brier": "Brier", "dice_hardest_quartile": "Hardest 25 % Dice (own)¹",
}


def count(n: int, unit: str) -> str:
    """``20 images``, ``1 sequence``."""
    return f"{n} {unit}{'' if n == 1 else 's'}"


def _fmt(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def fmt_p(p: float) -> str:
    return "–" if pd.isna(p) else f"{p:.3g}"


def _fmt_diff(diff: float, low: float, high: float) -> str:
    """``+0.0300 [+0.0100, +0.0500]``: a mean difference and its confidence interval."""
    if pd.isna(diff):
        return "–"
    return f"{diff:+.4f} [–]" if pd.isna(low) else f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]"


def _display_label(row, reference: str | None, eps_choice: dict) -> str:
    if row["oracle"]:
        return f"*{row['label']}* † (oracle, not a method)"
    label, notes = row["label"], []
    if row["method"] == "pm_dice":
        label += "⁶"
    if row["label"] == reference:
        label, notes = f"**{label}**", ["reference"]
    fold = single_fold_of(row["label"])
    if fold is not None:
        notes.append(f"searched and tested on fold {fold} only")
    if row["label"] == ZERO_EPS_LABEL:
        notes.append("PolyDice ε = 0 baseline")
    if row["label"] == EPS_VAL_LABEL:
        chosen = eps_choice.get(row["dataset"], {})
        notes.append("fixed ε picked on validation per fold: "
                     + ", ".join(f"{eps:+.1f}" for _, (eps, _) in sorted(chosen.items())))
    return label + (f" ({'; '.join(notes)})" if notes else "")


def _seeds(row) -> str:
    return str(row["n_seeds"]) if row["n_seeds"] == row["max_seeds"] else f"{row['n_seeds']}–{row['max_seeds']}"


def _budget(row) -> str:
    if not row["tuning_budget"] or pd.isna(row["tuning_budget"]):
        return "searched (trials unknown)⁷"
    return {"none": "1", "validation": f"{row['tuning_budget']} (validation)",
            "test": f"{row['tuning_budget']} (test)"}[row["tuned_on"]]


def markdown_table(table: pd.DataFrame, reference: str | None, unit: str | None, no_hard_set: str | None,
                    hard_source: str | None, eps_choice: dict) -> list[str]:
    header = (["Method", "Folds", "Seeds", "Configurations tuned⁷"] + [HEADERS[m] for m in METRICS]
              + ["Dice (pooled)", "Hardest 25 % Dice (common)²", "Dice-loss hardest 25 % Dice³",
                 "ΔDice there [95 % CI], Holm p³", "ΔDice vs ref [95 % CI]⁴", "n pairs⁴", "Wilcoxon p (Holm)⁴",
                 "Fold t-test p (Holm)⁵"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [_display_label(row, reference, eps_choice), str(int(row["folds"])), _seeds(row), _budget(row)]
        cells += [_fmt(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
        cells.append(_fmt(row["dice_pooled_mean"], math.nan))
        common = row["dice_hardest_quartile_common"]
        cells.append("–" if pd.isna(common) else f"{common:.4f} (n={int(row['n_hardest_common'])})")
        if no_hard_set:
            cells += [no_hard_set, no_hard_set]
        else:
            hard = row["dice_loss_hard_dice"]
            cells.append("–" if pd.isna(hard) else f"{hard:.4f} (n={int(row['dice_loss_hard_n_images'])})")
            n = int(row[HARD + "n_pairs"])
            if not n:
                cells.append("–")
            elif hard_source != SOURCE_SELECT:
                cells.append(f"{row[HARD + 'dice_diff_mean']:+.4f}, biased: no p-value (no `{SELECTION_TAG}` runs)")
            else:
                cells.append(f"{_fmt_diff(row[HARD + 'dice_diff_mean'], row[HARD + 'dice_diff_ci_low'], row[HARD + 'dice_diff_ci_high'])}, "
                             f"p = {fmt_p(row[HARD + 'wilcoxon_p_holm'])} ({count(n, 'run pair')})")
        n = int(row["n_pairs"])
        cells += [_fmt_diff(row["dice_diff_mean"], row["dice_diff_ci_low"], row["dice_diff_ci_high"]),
                  f"{count(n, 'run pair')} ({count(int(row['n_units_paired']), unit)})" if n else "–",
                  fmt_p(row["wilcoxon_p_holm"]), fmt_p(row["ttest_p_holm"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pm_footnote(table: pd.DataFrame, runs: pd.DataFrame) -> str | None:
    """Footnote ⁶: the PM Dice variant of every pm_dice row, read from its runs' configs."""
    parts = []
    for _, row in table[(table["method"] == "pm_dice") & ~table["oracle"]].iterrows():
        of = runs[(runs["dataset"] == row["dataset"]) & (runs["label"] == row["label"])]
        name = f"`{row['label']}` (`{row['dataset']}`)"
        if row["pm_variant"] == PM_BOTH:
            parts.append(f"{name}: background and foreground averaged (Eq. 5)")
        elif row["pm_variant"] == PM_FOREGROUND:
            old = int(of["pm_field_missing"].sum())
            parts.append(f"{name}: foreground only" + (
                f" ({old} of {len(of)} runs have no `pm_include_background` in their config: trained by older "
                "code, which computed the foreground term only)" if old else ""))
        else:
            folds = "; ".join(f"{v} in folds {', '.join(map(str, sorted(of.loc[of['pm_variant'] == v, 'fold'])))}"
                              for v in sorted(of["pm_variant"].dropna().unique()))
            parts.append(f"{name}: mixed ({folds}): the row averages two different losses")
    if not parts:
        return None
    return ("⁶ PM Dice variant, read from each run's config (`pm_include_background`; a config without it "
            "comes from older code, foreground only): " + "; ".join(parts) + ". The PM Dice paper's Eq. 5 "
            "averages the background and foreground terms, the default; the foreground-only term is an option.")


def _shares(runs: pd.DataFrame) -> str | None:
    """``64 % / 16 % / 20 %``: the median training, validation and test shares of the runs."""
    sizes = runs[["n_train", "n_val", "n_test"]].dropna()
    if sizes.empty:
        return None
    shares = sizes.div(sizes.sum(axis=1), axis=0).median()
    return " / ".join(f"{100 * v:.0f} %" for v in shares)


def footnotes(table: pd.DataFrame, runs: pd.DataFrame, reference: str | None, info: dict) -> list[str]:
    units, hardest, hard_sets, sources = info["units"], info["hardest"], info["hard_sets"], info["hard_source"]
    common = ", ".join(f"{len(v)} images of `{k}`" for k, v in hardest.items())
    absent = ", ".join(f"`{k}`: {why}" for k, why in info["no_hard_set"].items())
    described = {"image": "per image", "sequence": "per video sequence (the mean Dice of the sequence's paired "
                 "images; frames of one sequence are not independent)"}
    unit_text = "; ".join(f"`{d}` {described[u['unit']]}" for d, u in units.items()) or "no per-image results"
    compared = table[~table["oracle"]]
    family = ", ".join(f"m = {int(sub['wilcoxon_p'].notna().sum())} in `{d}`" for d, sub in compared.groupby("dataset"))
    shares = _shares(runs)
    one_seed = compared.loc[compared["max_seeds"] <= 1, "label"].tolist()
    hard_parts = []
    for dataset, indices in hard_sets.items():
        if sources[dataset] == SOURCE_SELECT:
            hard_parts.append(f"`{dataset}`: {len(indices)} images, chosen by the `{SELECTION_TAG}` runs")
        else:
            hard_parts.append(f"`{dataset}`: {len(indices)} images, chosen by the `{DICE_LOSS_LABEL}` runs' own "
                              f"results ({sources[dataset]}): biased, the set is where `{DICE_LOSS_LABEL}`'s own noise "
                              "was worst (regression to the mean), and methods trained with its seeds share part of "
                              f"that luck; no p-value or interval is given. Train the grid's `{SELECTION_TAG}` runs "
                              "for an unbiased set")
    footnotes = [
        "Values are the mean ± sample standard deviation (ddof = 1) over folds of each fold's test mean, a fold's "
        "runs (seeds) averaged first; a single fold has no std. Dice (pooled) is the mean over every tested image, "
        "pooled over folds and seeds (`dice_pooled_mean`, the thesis's \"average over the entire test dataset\")."
        + (f" Each run trains on {shares.split(' / ')[0]} of the images, picks its epoch and threshold on "
           f"{shares.split(' / ')[1]} (the inner validation split of its fold's training part) and is tested on "
           f"{shares.split(' / ')[2]} (median shares over the runs)." if shares else ""),
        "¹ Hardest 25 % Dice (own): each run ranks its own test images by its own final model's MC-Dropout "
        "difficulty (mutual information) and averages the Dice of the top quarter; the sets differ between "
        "methods, so this is not a like-for-like comparison.",
        "² Hardest 25 % Dice (common): one set of images for all methods: each test image's difficulty is "
        "averaged over every compared run's final model, and the top quarter by that mean "
        f"({common or 'no per-image results'}) is shared; mean Dice over it, pooled across folds and seeds. The set "
        "depends on which methods are passed to the report.",
        "³ Dice-loss hardest 25 % Dice: the thesis's \"cases difficult for conventional methods\", the bottom quarter "
        f"(max(1, round(n / 4)) images, ties to the lower dataset index) of the per-image test Dice of an independent "
        f"Dice-loss replicate per fold (`{SELECTION_TAG}`, trained with a seed no compared run uses, never a row), "
        "pooled over its folds. One set for every method, `dice` included; each row is the mean Dice over the "
        "images of the set that method tested (n), pooled across folds and seeds. ΔDice there, its 95 % CI and the "
        "Holm-adjusted p are the comparison of ⁴ restricted to the set (Holm across the methods of the dataset, a "
        "family of its own). " + ("; ".join(hard_parts) + "." if hard_parts else "")
        + (f" No set for {absent}: the column says so rather than guess from another method." if absent else ""),
        f"⁴ Paired against `{reference}` by run: a run pair is a run of the method and one of the reference with "
        "the same fold and seed; for each pair both runs' Dice is averaged over the test units both tested "
        f"({unit_text}), and the unit of inference is the run pair, so training randomness is part of the test. "
        "ΔDice is the mean run-pair difference (method − reference). 95 % CI: BCa bootstrap over the run pairs "
        f"(scipy.stats.bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}; [–] below 2 pairs or where "
        "BCa is undefined), one interval per comparison, not adjusted for the number of comparisons. Wilcoxon p: "
        "two-sided signed-rank test over the run-pair differences (exact below 50 pairs; it assumes independent "
        "pairs, differences symmetric about their mean; p = 1 when every difference is 0; below 6 pairs no p can "
        "reach 0.05), Holm-adjusted across the methods compared against the reference within the dataset "
        f"({family or 'no comparisons'})"
        + ("; the oracle row repeats its fixed-ε row and is not counted in the family" if table["oracle"].any() else "")
        + ". Raw p in table.csv (`wilcoxon_p`, adjusted `wilcoxon_p_holm`). Holm controls the family-wise error "
        "within one column, not across columns or metrics. `fixed_networks_wilcoxon_p` in table.csv tests the test "
        "units instead, each averaged over the paired seeds: it treats each trained network as fixed (these networks "
        "on these images, not the methods), information only and never a claim. Where the data give no grouping "
        "(Kvasir-SEG) images count as independent, although images of one patient may be correlated; on "
        "CVC-ClinicDB the units are video sequences, not patients, and the 29 sequences come from fewer patients."
        + (f" One seed per fold for {'every method' if len(one_seed) == len(compared) else ', '.join(f'`{x}`' for x in one_seed)}: "
           "each fold's network is its only replicate, so the run pairs are the folds (`--seeds 3` trains three). "
           "The p-values still include training randomness, each pair being two networks trained apart; only "
           "`fixed_networks_wilcoxon_p` treats the networks as fixed."
           if one_seed else ""),
        "⁵ Paired t-test of the per-fold mean test Dice (each fold's run pairs averaged over their seeds) over the "
        "shared folds (needs ≥ 3): with 5 folds it has 4 degrees of freedom, a weak test, but one that also allows "
        "the difference to vary from fold to fold. Holm-adjusted as ⁴, a family of its own (raw in `ttest_p`).",
    ]
    pm = _pm_footnote(table, runs)
    if pm:
        footnotes.append(pm)
    footnotes.append("⁷ Configurations tuned: how many configurations each fold's choice was made among, and on "
                     "what: 1 for a method run at fixed settings; the search's trials for the tuned adaptive method "
                     "(scored on validation Dice; from best_config.json, unknown without it); the fixed-ε grid for "
                     f"`{EPS_VAL_LABEL}` (the ε with the best mean validation Dice over its seeds, per fold) and for the "
                     "oracle (picked on test). A method tuned over more configurations had more chances; compare the "
                     f"tuned adaptive method with `{EPS_VAL_LABEL}` for a like-for-like tuned fixed ε.")
    if table["oracle"].any():
        footnotes.append("† Oracle, not a valid method: picked on test Dice. A copy of the fixed-ε PolyDice-1 "
                         "row with the best mean **test** Dice, an upper bound for a tuned fixed ε (as in the thesis).")
    if ZERO_EPS_LABEL in set(table["label"]):
        footnotes.append(f"`{ZERO_EPS_LABEL}` is the PolyDice ε = 0 baseline.")
    return footnotes


def page_head(results_dirs, runs, units: dict, reference: str | None) -> list[str]:
    """The report's first lines: what was compared, per dataset its folds, images, runs and seeds,
    and the reference of the paired tests."""
    compared = runs[runs["label"] != SELECTION_TAG]
    labels = sorted(compared["label"].unique())
    select = runs[runs["label"] == SELECTION_TAG]
    md = ["# PolyDice study report", "",
          f"Compared: {len(labels)} methods ({', '.join(f'`{x}`' for x in labels)}), results from "
          + ", ".join(f"`{d}`" for d in results_dirs) + "."
          + (f" `{SELECTION_TAG}` ({count(len(select), 'run')}) only chooses the hard set (³)." if len(select) else ""),
          ""]
    for dataset, sub in compared.groupby("dataset"):
        folds = sorted(sub["fold"].unique())
        unit = units.get(dataset)
        paired = ("no per-image results, no paired tests" if unit is None else
                  f"paired per image (n = {count(unit['n_units'], 'image')})" if unit["unit"] == "image" else
                  f"{unit['n_units']} video sequences, paired per video sequence "
                  f"(n = {count(unit['n_units'], 'sequence')})")
        seeds = sorted(sub["seed"].unique())
        md.append(f"- `{dataset}`: {count(len(folds), 'fold')} ({', '.join(map(str, folds))}), "
                  f"{unit['n_images'] if unit else 0} test images (every image is tested once per method "
                  f"and seed across its folds), {len(sub)} runs, seeds {', '.join(map(str, seeds))}; "
                  f"test units {paired}; the tests' unit of inference is the run pair (⁴).")
    md.append("")
    if reference is None:
        md.append("No adaptive run: no paired tests (pass --reference LABEL).")
    else:
        fold = single_fold_of(reference)
        md.append(f"Reference of the paired tests: `{reference}`."
                  + (f" It was searched and tested on fold {fold} only (a single-fold search): the paired "
                     f"tests use fold {fold}'s test images alone." if fold is not None else ""))
    return md + [""]
