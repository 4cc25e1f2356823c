"""The final table of a study: test metrics per method, paired tests that include training
randomness, the fixed-ε oracle and its validation-tuned counterpart, the hardest images, the best
configuration per fold, plots.

    python studies/report.py --results results/adaptive-final results/baselines --out results/report
    python studies/report.py --results results/adaptive-final --out results/report \\
        --optuna-storage sqlite:///results/adaptive-optuna.db \\
        --study-name adaptive-fold0 --study-name adaptive-fold1 \\
        --best-config results/adaptive-report/best_config.json

Input: every run folder under the ``--results`` folders that holds a ``summary.json`` with test
metrics (``python -m polydice.train --out DIR`` or Ray Tune trial folders, at any depth). Search
trials have no test metrics and are skipped. A run's label is its ``tag``, else its method
(``polydice-eps+0.2`` for a fixed ε); every replicate (dataset, label, fold, seed) is kept.

Honesty (the study protocol of the README): the paired tests pair runs of the same fold and seed
and compare them over the same test units (video sequences where a dataset has them), so training
randomness is part of every p-value that a ``*_p_holm`` column holds (studies/comparison.py);
the hard images are chosen by an independent Dice-loss replicate (``dice-select``) that is never a
row; the best fixed ε is picked once on validation Dice (``polydice-eps-val``, a method) and once on
test Dice (the oracle, labelled as such); runs whose splits differ are never paired. Nothing here
reads a pickle.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import study_cli  # noqa: F401  (puts the checkout on sys.path, for a run without installing)
from comparison import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, DICE_LOSS_LABEL, HARD, HARDEST_FRACTION, SOURCE_OWN,
                        SOURCE_SELECT, ReportWarning, common_hardest, hard_set, paired_tests, selection_seed_clashes)
from polydice.config import SELECTION_TAG, run_label
from storage import redact

METRICS = ("dice", "iou", "precision", "recall", "nsd", "nll", "brier", "dice_hardest_quartile")
HEADERS = {
    "dice": "Dice", "iou": "IoU", "precision": "Precision", "recall": "Recall", "nsd": "NSD",
    "nll": "NLL", "brier": "Brier", "dice_hardest_quartile": "Hardest 25 % Dice (own)¹",
}
ZERO_EPS_LABEL = "polydice-eps+0.0"
EPS_VAL_LABEL = "polydice-eps-val"  # per fold, the fixed ε with the best mean validation Dice
# studies/tune_adaptive.py --search-fold F: adaptive-tuned-fold<F>, with -<rank> and -inner suffixes
SINGLE_FOLD_LABEL = re.compile(r"^adaptive-tuned-fold(\d+)(?:-|$)")
FIXED_EPS_LABEL = re.compile(r"^polydice-eps[+-]\d\.\d$")  # the grid's fixed-ε runs (not -inner, not -val)
PM_BOTH, PM_FOREGROUND = "background+foreground", "foreground"
# The split every paired run must share, and settings that should (a warning when they differ).
SPLIT_FIELDS = ("folds", "split_seed", "n_images")
SETTING_FIELDS = ("image_size", "epochs")


def single_fold_of(label: str) -> int | None:
    """The fold of a single-fold search's label (``adaptive-tuned-fold2``, ``adaptive-tuned-fold2-2`` → 2),
    else None."""
    match = SINGLE_FOLD_LABEL.match(str(label))
    return int(match.group(1)) if match else None


def _run_dirs(results_dir: Path):
    """Every ``summary.json`` below ``results_dir`` with test metrics, one per trial.

    Tune's last checkpoint of a tested trial carries a copy of the run's files
    (``<trial>/checkpoint_000009/summary.json``): that copy is the same run, not a duplicate.
    """
    by_trial: dict[Path, list[tuple[Path, dict]]] = {}
    for path in sorted(results_dir.rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
            warnings.warn(f"skipping unreadable {path}: {type(exc).__name__}: {exc}", ReportWarning, stacklevel=3)
            continue
        if not isinstance(summary, dict) or summary.get("test_dice") is None:
            continue  # a search trial (validation only) or an unfinished run
        if not isinstance(summary.get("config"), dict):
            warnings.warn(f"skipping {path}: no 'config' in summary.json", ReportWarning, stacklevel=3)
            continue
        run_dir = path.parent
        trial = run_dir.parent if run_dir.name.startswith("checkpoint_") else run_dir
        by_trial.setdefault(trial.resolve(), []).append((run_dir, summary))
    for copies in by_trial.values():
        # Prefer a copy with per-image results, then the trial folder itself, then the last checkpoint.
        copies.sort(key=lambda c: ((c[0] / "per_image.csv").exists(), not c[0].name.startswith("checkpoint_"), c[0].name))
        yield copies[-1]


def collect_runs(results_dirs: list[Path]) -> pd.DataFrame:
    """One row per (dataset, label, fold, seed) of the tested runs below ``results_dirs``.

    Args:
        results_dirs: folders of runs or of Tune experiments (trials at any depth).

    Returns:
        Columns ``dataset, label, method, eps, fold, folds, split_seed, seed`` (a config without a
        seed has TrainConfig's default, 0), ``test_<metric>`` for every metric of ``METRICS``,
        ``val_dice, best_epoch, n_train, n_val, n_test, n_images, image_size, epochs, run_dir,
        mtime``, and for PM Dice runs ``pm_variant`` (``PM_BOTH`` or ``PM_FOREGROUND``) and
        ``pm_field_missing`` (the config predates ``pm_include_background``: such runs were trained
        foreground-only). A field a summary lacks is NaN (never a difference). Where a (dataset,
        label, fold, seed) appears more than once the newest ``summary.json`` (mtime) is kept, with
        a warning. A ``summary.json`` that is unreadable, or whose metrics, ε or fold are not
        numbers (another version's, or edited by hand), is skipped with a warning naming it.

    Raises:
        ValueError: a folder does not exist or holds no tested run, or none that is usable.
    """
    rows, seen, skipped = [], set(), []
    for results_dir in map(Path, results_dirs):
        if not results_dir.is_dir():
            raise ValueError(f"results folder {results_dir} does not exist or is not a folder")
        found = 0
        for run_dir, summary in _run_dirs(results_dir):
            found += 1
            if run_dir.resolve() in seen:  # overlapping --results folders
                continue
            seen.add(run_dir.resolve())
            try:
                row = _run_row(summary, run_dir)
            except (TypeError, ValueError) as exc:  # a summary of another version, or edited by hand
                skipped.append(f"{run_dir / 'summary.json'}: {exc}")
                warnings.warn(f"skipping {skipped[-1]}", ReportWarning, stacklevel=2)
                continue
            rows.append(row)
        if not found:
            raise ValueError(
                f"no tested runs under {results_dir}: no summary.json with test metrics (search trials "
                "have none; pass the folder of the final runs or of the baseline grid)"
            )
    if not rows:
        raise ValueError(f"no usable tested run under {', '.join(map(str, results_dirs))}: {skipped[0]}"
                         + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    runs = pd.DataFrame(rows).sort_values("mtime", kind="stable")
    key = ["dataset", "label", "fold", "seed"]
    dup = runs.duplicated(key, keep="last")
    for _, old in runs[dup].iterrows():
        kept = runs[~dup].set_index(key).loc[tuple(old[key]), "run_dir"]
        warnings.warn(
            f"{old['label']} fold {old['fold']} seed {old['seed']} ({old['dataset']}) appears more than once: "
            f"keeping the newest "
            f"{kept}, ignoring {old['run_dir']}",
            ReportWarning,
            stacklevel=2,
        )
    return runs[~dup].sort_values(key).reset_index(drop=True)


def _number(value, what: str) -> float:
    """``value`` as a float (NaN for a missing one); a ``ValueError`` naming ``what`` otherwise."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ValueError(f"{what} is {value!r}, not a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{what} is {value!r}, not a number") from None


def _run_row(summary: dict, run_dir: Path) -> dict:
    """One row of :func:`collect_runs` from a run's ``summary.json``.

    Raises:
        ValueError: a metric, ε or fold that is not a number.
    """
    cfg = summary["config"]
    fold = _number(cfg.get("fold", 0), "config.fold")
    if not float(fold).is_integer():
        raise ValueError(f"config.fold is {cfg.get('fold')!r}, not a fold number")
    fixed_eps = cfg.get("method") == "polydice"
    eps = _number(cfg.get("eps", 0.0), "config.eps") if fixed_eps else math.nan
    seed = _number(cfg.get("seed", 0), "config.seed")
    if not float(seed).is_integer():
        raise ValueError(f"config.seed is {cfg.get('seed')!r}, not a seed")
    row = {
        "dataset": str(cfg.get("dataset", "unknown")),
        "label": run_label({**cfg, "eps": eps} if fixed_eps else cfg),
        "method": cfg.get("method"),
        "eps": eps,
        "fold": int(fold),
        "folds": cfg.get("folds"),
        "split_seed": cfg.get("split_seed"),
        "seed": int(seed),
        "image_size": cfg.get("image_size"),
        "epochs": cfg.get("epochs"),
        "pm_variant": None,
        "pm_field_missing": False,
    }
    if cfg.get("method") == "pm_dice":
        # Code older than the field trained the foreground-only variant.
        row["pm_field_missing"] = "pm_include_background" not in cfg
        row["pm_variant"] = PM_BOTH if cfg.get("pm_include_background", False) else PM_FOREGROUND
    for key in METRICS:
        row[f"test_{key}"] = _number(summary.get(f"test_{key}"), f"test_{key}")
    sizes = {k: _number(summary.get(k), k) for k in ("n_train", "n_val", "n_test")}
    row.update(val_dice=_number(summary.get("val_dice"), "val_dice"), best_epoch=summary.get("best_epoch"),
               **sizes, n_images=sum(sizes.values()), run_dir=str(run_dir),
               mtime=(run_dir / "summary.json").stat().st_mtime)
    return row


def _read_table(path: Path, columns: list[str], owner: str) -> pd.DataFrame | None:
    """A run's CSV file with at least ``columns`` (numeric), or ``None`` with a warning saying why
    (unreadable, not CSV, written by a version without one of the columns, non-numeric values)."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:  # pandas' parser and empty-file errors are ValueErrors
        warnings.warn(f"{owner}: {path} is unreadable ({type(exc).__name__}: {str(exc).strip()}); left out",
                      ReportWarning, stacklevel=3)
        return None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        warnings.warn(f"{owner}: {path} has no column {', '.join(map(repr, missing))} (columns: "
                      f"{', '.join(map(str, frame.columns))}); left out", ReportWarning, stacklevel=3)
        return None
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().sum() > frame[column].isna().sum():
            warnings.warn(f"{owner}: {path} has non-numeric values in column {column!r}; left out",
                          ReportWarning, stacklevel=3)
            return None
        frame[column] = values
    return frame


PER_IMAGE_COLUMNS = ["dataset", "label", "fold", "seed", "index", "group", "dice", "difficulty"]


def load_per_image(runs: pd.DataFrame) -> pd.DataFrame:
    """The ``per_image.csv`` of every run: ``dataset, label, fold, seed, index, group, dice, difficulty``.

    ``group`` is the video sequence on CVC-ClinicDB and the image itself elsewhere. An older
    ``per_image.csv`` without it takes each image's group from another run that tested the image;
    a dataset with an image that no run gives a group is paired per image, with a warning.
    A replicate (label, seed) whose folds test the same image twice keeps the first (the split
    check of :func:`check_splits` refuses such runs before they are paired).
    A ``per_image.csv`` that is unreadable, lacks ``index``, ``dice`` or ``difficulty`` or holds
    non-numeric values there is left out with a warning naming it.
    """
    frames, without_group = [], set()
    for run in runs.itertuples():
        path = Path(run.run_dir) / "per_image.csv"
        if not path.exists():
            warnings.warn(f"{run.label} fold {run.fold}: no per_image.csv in {run.run_dir}; "
                          "left out of the paired tests and the common hardest images", ReportWarning, stacklevel=2)
            continue
        frame = _read_table(path, ["index", "dice", "difficulty"], f"{run.label} fold {run.fold}")
        if frame is None:
            continue
        if "group" not in frame.columns:
            without_group.add((run.dataset, run.label))
            frame["group"] = math.nan
        frames.append(frame[["index", "group", "dice", "difficulty"]].assign(
            dataset=run.dataset, label=run.label, fold=run.fold, seed=run.seed))
    if not frames:
        return pd.DataFrame(columns=PER_IMAGE_COLUMNS)
    per_image = pd.concat(frames, ignore_index=True)[PER_IMAGE_COLUMNS]
    dup = per_image.duplicated(["dataset", "label", "seed", "index"])
    if dup.any():
        labels = sorted(per_image.loc[dup, "label"].unique())
        warnings.warn(f"images tested in more than one fold of {labels} (different splits?); "
                      "keeping each image's first fold", ReportWarning, stacklevel=2)
    per_image = per_image[~dup].reset_index(drop=True)
    for dataset in sorted(per_image["dataset"].unique()):
        of = per_image["dataset"] == dataset
        known = per_image[of].dropna(subset=["group"])
        if known.groupby("index")["group"].nunique().gt(1).any():
            warnings.warn(f"`{dataset}`: runs disagree on the video sequence of some images; "
                          "each image keeps the group of its first run", ReportWarning, stacklevel=2)
        group_of = known.drop_duplicates("index").set_index("index")["group"]
        groups = per_image.loc[of, "index"].map(group_of)
        missing = sorted(label for d, label in without_group if d == dataset)
        if groups.isna().any():
            warnings.warn(f"`{dataset}`: per_image.csv without a 'group' column (older runs of {missing}) and "
                          "no other run gives the group of every image: paired per image, not per video sequence",
                          ReportWarning, stacklevel=2)
            groups = per_image.loc[of, "index"]
        elif missing:
            warnings.warn(f"`{dataset}`: per_image.csv without a 'group' column (older runs of {missing}); "
                          "their images' groups are taken from the other runs that tested them",
                          ReportWarning, stacklevel=2)
        per_image.loc[of, "group"] = groups.to_numpy()
    return per_image


def pairing_units(per_image: pd.DataFrame) -> dict[str, dict]:
    """The unit of the paired tests per dataset, decided from the data.

    Returns:
        ``{dataset: {"unit": "image" | "sequence", "n_units", "n_images"}}`` over every tested image:
        ``"image"`` when every group holds one image (Kvasir-SEG, synthetic), else ``"sequence"``
        (CVC-ClinicDB: frames of one video sequence are not independent).
    """
    units = {}
    for dataset, images in per_image.groupby("dataset"):
        images = images.drop_duplicates("index")
        sizes = images.groupby("group").size()
        units[dataset] = {"unit": "image" if (sizes == 1).all() else "sequence",
                          "n_units": len(sizes), "n_images": len(images)}
    return units


def _count(n: int, unit: str) -> str:
    """``20 images``, ``1 sequence``."""
    return f"{n} {unit}{'' if n == 1 else 's'}"


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


def check_splits(runs: pd.DataFrame) -> None:
    """Refuse to pair runs whose splits differ; warn when other settings differ.

    Within a dataset every run must share ``SPLIT_FIELDS`` (the number of folds, the split seed,
    the set size ``n_train + n_val + n_test``) and, per fold, ``n_test``: the paired tests match
    runs by fold number and image index, which mean the same images only under one split. A field
    that a summary lacks is not a difference. ``SETTING_FIELDS`` (image size, epochs) that differ
    are a warning: such runs can be compared, but the reader should know.

    Raises:
        ValueError: naming two runs whose splits differ and the field.
    """
    for dataset, of in runs.groupby("dataset"):
        for column in SPLIT_FIELDS:
            known = of.dropna(subset=[column])
            if known[column].nunique() > 1:
                a, b = known.drop_duplicates(column).iloc[:2].itertuples()
                raise ValueError(f"runs with different splits cannot be paired (`{dataset}`, {column} "
                                 f"{getattr(a, column)!r} against {getattr(b, column)!r}): {a.run_dir} and {b.run_dir}")
        for fold, in_fold in of.dropna(subset=["n_test"]).groupby("fold"):
            if in_fold["n_test"].nunique() > 1:
                a, b = in_fold.drop_duplicates("n_test").iloc[:2].itertuples()
                raise ValueError(f"runs with different splits cannot be paired (`{dataset}` fold {fold}: "
                                 f"{a.n_test:g} against {b.n_test:g} test images): {a.run_dir} and {b.run_dir}")
        for column in SETTING_FIELDS:
            known = of.dropna(subset=[column])
            if known[column].nunique() > 1:
                values = ", ".join(f"{v} ({n} runs)" for v, n in known[column].value_counts().sort_index().items())
                a, b = known.drop_duplicates(column).iloc[:2].itertuples()
                warnings.warn(f"`{dataset}`: runs with different {column}: {values}; e.g. {a.run_dir} and "
                              f"{b.run_dir}", ReportWarning, stacklevel=2)


def eps_val_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """``polydice-eps-val``: per (dataset, fold), the runs of the fixed ε with the best mean
    validation Dice over its seeds, relabelled; a method like any other (no test image is read to
    pick it). Needs at least two fixed-ε labels with a validation Dice in the fold.

    Returns:
        ``(runs of EPS_VAL_LABEL, {dataset: {fold: (ε, candidates)}})``.
    """
    fixed = runs[runs["label"].map(lambda x: bool(FIXED_EPS_LABEL.match(str(x)))) & (runs["method"] == "polydice")]
    picked, choice = [], {}
    for (dataset, fold), of in fixed.dropna(subset=["val_dice"]).groupby(["dataset", "fold"]):
        means = of.groupby("eps")["val_dice"].mean()
        if len(means) < 2:
            continue
        eps = means.idxmax()  # ties: the lowest ε
        choice.setdefault(dataset, {})[int(fold)] = (float(eps), len(means))
        picked.append(of[of["eps"] == eps].assign(label=EPS_VAL_LABEL))
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


def epsilon_at_last_refresh(runs: pd.DataFrame) -> pd.DataFrame:
    """ε and difficulty of every training image at the last refresh of each adaptive run."""
    frames = []
    for run in runs[runs["method"] == "adaptive"].itertuples():
        path = Path(run.run_dir) / "epsilon.csv"
        if not path.exists() or path.stat().st_size == 0:
            continue
        eps = _read_table(path, ["epoch", "index", "difficulty", "epsilon"], f"{run.label} fold {run.fold}")
        if eps is None or eps.empty:
            continue
        last = eps[eps["epoch"] == eps["epoch"].max()]
        frames.append(last.assign(dataset=run.dataset, label=run.label, fold=run.fold))
    if not frames:
        return pd.DataFrame(columns=["epoch", "index", "difficulty", "epsilon", "dataset", "label", "fold"])
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- best configuration


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def load_best_config(path: Path) -> tuple[dict, pd.DataFrame]:
    """The search's ``best_config.json``: its header and one row per fold.

    Expected format (studies/tune_adaptive.py)::

        {"metric": ..., "protocol": "nested" | "single-fold", "optuna_storage": ...,
         "folds": {"0": {"study_name", "value", "params": {...}, "optuna_trial", "n_trials"}, ...},
         "base": {TrainConfig fields}}

    Anything malformed is a ``ReportWarning`` (listed in the report), never an exception: an
    unreadable file gives an empty frame, a malformed fold entry is left out.

    Returns:
        ``(header with metric, protocol, optuna_storage, frame)``; the frame has columns ``fold,
        study_name, optuna_trial, n_trials, value`` and one column per parameter, sorted by fold.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"best configuration {path} could not be read: {type(exc).__name__}: {exc}",
                      ReportWarning, stacklevel=2)
        return {}, pd.DataFrame()
    if not isinstance(data, dict) or not isinstance(data.get("folds"), dict):
        warnings.warn(f"best configuration {path} has no 'folds' object (expected "
                      '{"folds": {"0": {"params": {...}, "value": ...}, ...}}); no per-fold table',
                      ReportWarning, stacklevel=2)
        return (data if isinstance(data, dict) else {}), pd.DataFrame()
    rows = []
    for key, entry in data["folds"].items():
        try:
            fold = int(key)
        except ValueError:
            warnings.warn(f"best configuration {path}: fold key {key!r} is not a fold number; left out",
                          ReportWarning, stacklevel=2)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
            warnings.warn(f"best configuration {path}: fold {key} has no 'params' object; left out",
                          ReportWarning, stacklevel=2)
            continue
        value = entry.get("value")
        if not _is_number(value):
            warnings.warn(f"best configuration {path}: fold {key} has a non-numeric value {value!r}; "
                          "shown as missing", ReportWarning, stacklevel=2)
            value = math.nan
        row = {"fold": fold, "study_name": entry.get("study_name"), "optuna_trial": entry.get("optuna_trial"),
               "n_trials": entry.get("n_trials"), "value": float(value)}
        for name, param in entry["params"].items():
            if name in row:
                warnings.warn(f"best configuration {path}: fold {key} has a parameter named {name!r}, "
                              "which clashes with a column of the table; left out", ReportWarning, stacklevel=2)
                continue
            row[name] = param
        rows.append(row)
    header = {k: data.get(k) for k in ("metric", "protocol", "optuna_storage")}
    frame = pd.DataFrame(rows)
    return header, (frame.sort_values("fold").reset_index(drop=True) if rows else frame)


def best_config_spread(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Per numeric parameter (and the validation value) across folds: ``n_folds, min, max, mean,
    std`` (sample, ddof = 1; NaN for one fold) and ``cv = std / |mean|`` (NaN when the mean is 0)."""
    rows = []
    columns = [c for c in per_fold.columns if c not in ("fold", "study_name", "optuna_trial", "n_trials")]
    for name in columns:
        values = per_fold[name]
        if not all(_is_number(v) for v in values.dropna()) or values.dropna().empty:
            continue  # a categorical parameter: the per-fold table shows it
        values = values.dropna().astype(float)
        std = values.std(ddof=1) if len(values) > 1 else math.nan
        mean = values.mean()
        rows.append({"parameter": name, "n_folds": len(values), "min": values.min(), "max": values.max(),
                     "mean": mean, "std": std, "cv": std / abs(mean) if mean != 0 else math.nan})
    return pd.DataFrame(rows, columns=["parameter", "n_folds", "min", "max", "mean", "std", "cv"])


def _fmt_value(value) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)


def best_config_section(path: Path, header: dict, per_fold: pd.DataFrame, out_dir: Path) -> list[str]:
    """The "Best configuration per fold" section of :func:`load_best_config`'s ``(header, per_fold)``
    read from ``path``; writes ``best_config_per_fold.csv`` and ``best_config_spread.csv``."""
    lines = ["## Best configuration per fold", ""]
    if per_fold.empty:
        return lines + [f"Note: no per-fold best configuration could be read from `{path}` (see Warnings).", ""]
    per_fold.to_csv(out_dir / "best_config_per_fold.csv", index=False)
    protocol = header.get("protocol")
    described = {
        "nested": "nested cross-validation: each outer fold's controller was searched on that fold's "
                  "training part alone (scored on its inner validation split) and never saw the fold's test images",
        "single-fold": "a single-fold search: the controller was searched on one fold's training part and "
                       "tested on that fold only",
    }.get(protocol, f"protocol {protocol!r} (not described by this report)")
    lines.append(f"From `{path}`: {described}. Each row is the best trial of that fold's study by the search "
                 f"metric ({header.get('metric') or 'not named'}); the search never reads test images"
                 + (f"; storage {redact(str(header['optuna_storage']))}" if header.get("optuna_storage") else "")
                 + ". [best_config_per_fold.csv](best_config_per_fold.csv)")
    lines.append("")
    params = [c for c in per_fold.columns if c not in ("fold", "study_name", "optuna_trial", "n_trials", "value")]
    head = ["Fold", "Study", "Best trial", "Trials", "Validation value"] + [f"`{p}`" for p in params]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in per_fold.iterrows():
        cells = [str(r["fold"]), f"`{r['study_name']}`" if isinstance(r["study_name"], str) else "–",
                 _fmt_value(r["optuna_trial"]), _fmt_value(r["n_trials"]),
                 "–" if pd.isna(r["value"]) else f"{r['value']:.4f}"]
        cells += [_fmt_value(r[p]) for p in params]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    spread = best_config_spread(per_fold)
    spread.to_csv(out_dir / "best_config_spread.csv", index=False)
    if len(per_fold) < 2:
        return lines + ["One fold: no spread across folds.", ""]
    lines += [f"Spread across the {len(per_fold)} folds (sample std, ddof = 1; CV = std / |mean|), numeric "
              "parameters and the validation value: [best_config_spread.csv](best_config_spread.csv). "
              "A parameter whose best value varies widely between folds is not pinned down by the search.", "",
              "| Parameter | Min | Max | Mean | Std | CV |", "|---|---|---|---|---|---|"]
    for _, r in spread.iterrows():
        name = "validation value" if r["parameter"] == "value" else f"`{r['parameter']}`"
        lines.append("| " + " | ".join([name] + [_fmt_value(r[c]) for c in ("min", "max", "mean", "std", "cv")]) + " |")
    return lines + [""]


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_dice_per_method(runs: pd.DataFrame, path: Path) -> None:
    """Box plot with the folds as points, methods sorted by mean test Dice, a panel per dataset."""
    datasets = sorted(runs["dataset"].unique())
    n_labels = runs.groupby("dataset")["label"].nunique().max()
    fig = _figure(max(6.0, 0.6 * n_labels + 2), 4.0 * len(datasets))
    for ax, dataset in zip(fig.subplots(len(datasets), 1, squeeze=False)[:, 0], datasets):
        sub = runs[runs["dataset"] == dataset]
        order = sub.groupby("label")["test_dice"].mean().sort_values(ascending=False).index.tolist()
        values = [sub.loc[sub["label"] == label, "test_dice"].to_numpy() for label in order]
        ax.boxplot(values, showfliers=False)
        for i, vals in enumerate(values, start=1):
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
            ax.scatter(i + jitter, vals, s=14, zorder=3, color="tab:blue")
        ax.set_xticks(range(1, len(order) + 1), order, rotation=45, ha="right")
        ax.set_ylabel("test Dice (per run)")
        ax.set_title(f"{dataset}: test Dice per run (folds × seeds)")
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)


def plot_eps_vs_difficulty(eps: pd.DataFrame, path: Path) -> None:
    """ε against difficulty at the last refresh, a panel per adaptive label, coloured by fold."""
    panels = sorted(eps.groupby(["dataset", "label"]).groups)
    fig = _figure(4.5 * len(panels), 4.0)
    for ax, (dataset, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        sub = eps[(eps["dataset"] == dataset) & (eps["label"] == label)]
        for fold, points in sub.groupby("fold"):
            ax.scatter(points["difficulty"], points["epsilon"], s=10, alpha=0.7,
                       label=f"fold {fold} (epoch {points['epoch'].iloc[0]})")
        ax.set_xlabel("difficulty (MC-Dropout MI)")
        ax.set_ylabel("ε")
        ax.set_title(f"{label} ({dataset})")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def plot_search_history(numbers, values, maximize: bool, path: Path, study_name: str) -> None:
    best = np.maximum.accumulate(values) if maximize else np.minimum.accumulate(values)
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    ax.scatter(numbers, values, s=14, label="trial")
    ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel("objective (search metric)")
    ax.set_title(f"Optuna search history: {study_name}")
    ax.legend()
    fig.savefig(path, dpi=120)


def plot_importances(importances: dict, path: Path, study_name: str) -> None:
    names = list(importances)[::-1]
    fig = _figure(6.0, 0.4 * len(names) + 1.5)
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title(f"Hyperparameter importances: {study_name}")
    fig.savefig(path, dpi=120)


def _file_stem(name: str) -> str:
    """A study name usable in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _study_line(storage: str, name: str, out_dir: Path, importance_rows: list[dict]) -> str:
    """One markdown line on an Optuna study; writes its plots, appends its importances."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception as exc:  # a missing study (KeyError) or an unreachable database
        return f"`{name}`: the study could not be loaded ({type(exc).__name__}: {exc})."
    if len(study.directions) > 1:
        return f"`{name}`: a multi-objective study; no search history or importances."
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None]
    line = f"`{name}`: {len(study.trials)} trials, {len(done)} completed"
    if not done:
        return line + "; no search history."
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    stem = _file_stem(name)
    plot_search_history([t.number for t in done], np.array([t.value for t in done]), maximize,
                        out_dir / f"search_history_{stem}.png", name)
    best = max(done, key=lambda t: t.value) if maximize else min(done, key=lambda t: t.value)
    params = ", ".join(f"{k} = {_fmt_value(v)}" for k, v in best.params.items())
    line += f"; best {best.value:.4f} (trial {best.number}) with {params}; [search history](search_history_{stem}.png)"
    try:
        if len(done) < 2:  # optuna answers a single trial with equal, meaningless importances
            raise ValueError(f"{len(done)} completed trial")
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as exc:
        return line + (f"; no parameter importances ({exc}): they need at least 2 completed trials with "
                       "differing parameters and values.")
    importance_rows += [{"study": name, "param": p, "importance": v} for p, v in importances.items()]
    plot_importances(importances, out_dir / f"importances_{stem}.png", name)
    return line + f", [importances](importances_{stem}.png)."


def optuna_section(storage: str, study_names: list[str], out_dir: Path) -> list[str]:
    """One line per Optuna study of the search (per-fold studies ``<study>-fold<f>`` under nested
    cross-validation), its search-history and importance plots, and a table of the importances."""
    lines = [f"## Search (Optuna, {redact(storage)})", "",
             "The objective of every study is the search metric (`best_val_dice` in studies/tune_adaptive.py: "
             "validation Dice; the search never reads test images).", ""]
    importance_rows: list[dict] = []
    lines += [f"- {_study_line(storage, name, out_dir, importance_rows)}" for name in study_names] + [""]
    if not importance_rows:
        return lines
    frame = pd.DataFrame(importance_rows)
    frame.to_csv(out_dir / "importances.csv", index=False)
    params = list(dict.fromkeys(frame["param"]))
    wide = frame.pivot(index="study", columns="param", values="importance")
    lines += ["Parameter importances (fANOVA, seed 0, over each study's completed trials; they sum to 1 per "
              "study): [importances.csv](importances.csv)", "",
              "| Study | " + " | ".join(f"`{p}`" for p in params) + " |", "|" + "---|" * (len(params) + 1)]
    for name in dict.fromkeys(frame["study"]):
        lines.append(f"| `{name}` | " + " | ".join(_fmt_importance(wide.loc[name, p]) for p in params) + " |")
    return lines + [""]


# ----------------------------------------------------------------------------- the report


def _fmt(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def _fmt_p(p: float) -> str:
    return "–" if pd.isna(p) else f"{p:.3g}"


def _fmt_importance(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:.3f}"


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


def _markdown_table(table: pd.DataFrame, reference: str | None, unit: str | None, no_hard_set: str | None,
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
                             f"p = {_fmt_p(row[HARD + 'wilcoxon_p_holm'])} ({_count(n, 'run pair')})")
        n = int(row["n_pairs"])
        cells += [_fmt_diff(row["dice_diff_mean"], row["dice_diff_ci_low"], row["dice_diff_ci_high"]),
                  f"{_count(n, 'run pair')} ({_count(int(row['n_units_paired']), unit)})" if n else "–",
                  _fmt_p(row["wilcoxon_p_holm"]), _fmt_p(row["ttest_p_holm"])]
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


def _shares(runs: pd.DataFrame) -> str | None:
    """``64 % / 16 % / 20 %``: the median training, validation and test shares of the runs."""
    sizes = runs[["n_train", "n_val", "n_test"]].dropna()
    if sizes.empty:
        return None
    shares = sizes.div(sizes.sum(axis=1), axis=0).median()
    return " / ".join(f"{100 * v:.0f} %" for v in shares)


def _footnotes(table: pd.DataFrame, runs: pd.DataFrame, reference: str | None, info: dict) -> list[str]:
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
        picked = eps_runs[["dataset", "fold", "eps"]].drop_duplicates()
        source = runs[["dataset", "fold", "eps", "label"]].merge(picked, on=["dataset", "fold", "eps"])
        source = source[source["label"].map(lambda x: bool(FIXED_EPS_LABEL.match(str(x))))]
        copies = per_image.merge(source[["dataset", "fold", "label"]], on=["dataset", "fold", "label"])
        runs = pd.concat([runs, eps_runs], ignore_index=True)
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


def make_report(
    results_dirs: list[Path],
    out_dir: Path,
    *,
    optuna_storage: str | None = None,
    study_names: list[str] | None = None,
    reference: str | None = None,
    best_config: Path | None = None,
) -> Path:
    """Write ``table.md``, ``table.csv`` and the plots of the tested runs below ``results_dirs``.

    Args:
        results_dirs: run folders or Tune experiment folders (see :func:`collect_runs`).
        out_dir: created if missing.
        optuna_storage: storage URL of the search's Optuna studies, for their history and importances.
        study_names: the studies to show (``<study>-fold0``, … under nested cross-validation); with
            ``optuna_storage`` and ``best_config`` and no names, the studies that best_config.json names.
        reference: label the paired tests compare against (default: see :func:`choose_reference`).
        best_config: the search's ``best_config.json``, for the "Best configuration per fold"
            section and ``best_config_per_fold.csv``; a malformed file is listed under Warnings.

    Returns:
        The path of ``table.md``.

    Raises:
        ValueError: no results folder, a missing one, one without tested runs, runs whose splits
            differ, an unknown reference, or study names without ``optuna_storage``.
    """
    if not results_dirs:
        raise ValueError("no results folders given")
    names = list(study_names or [])
    if names and not optuna_storage:
        raise ValueError(f"study names {names} given without optuna_storage")
    out_dir = Path(out_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = collect_runs(results_dirs)
        per_image = load_per_image(runs)
        header, per_fold = load_best_config(best_config) if best_config is not None else ({}, pd.DataFrame())
        if optuna_storage and not names and not per_fold.empty:
            names = [n for n in per_fold["study_name"] if isinstance(n, str)]
        table, info = build_table(runs, per_image, reference, per_fold)
        reference, runs, units = info["reference"], info["runs"], info["units"]
        out_dir.mkdir(parents=True, exist_ok=True)
        table[TABLE_COLUMNS].to_csv(out_dir / "table.csv", index=False)

        compared = runs[runs["label"] != SELECTION_TAG]
        plot_dice_per_method(compared, out_dir / "dice_per_method.png")
        eps = epsilon_at_last_refresh(compared)
        if not eps.empty:
            plot_eps_vs_difficulty(eps, out_dir / "eps_vs_difficulty.png")

        md = ["# PolyDice study report", ""]
        labels = sorted(compared["label"].unique())
        select = runs[runs["label"] == SELECTION_TAG]
        md.append(f"Compared: {len(labels)} methods ({', '.join(f'`{x}`' for x in labels)}), results from "
                  + ", ".join(f"`{d}`" for d in results_dirs) + "."
                  + (f" `{SELECTION_TAG}` ({_count(len(select), 'run')}) only chooses the hard set (³)." if len(select) else ""))
        md.append("")
        for dataset, sub in compared.groupby("dataset"):
            folds = sorted(sub["fold"].unique())
            unit = units.get(dataset)
            paired = ("no per-image results, no paired tests" if unit is None else
                      f"paired per image (n = {_count(unit['n_units'], 'image')})" if unit["unit"] == "image" else
                      f"{unit['n_units']} video sequences, paired per video sequence "
                      f"(n = {_count(unit['n_units'], 'sequence')})")
            seeds = sorted(sub["seed"].unique())
            md.append(f"- `{dataset}`: {_count(len(folds), 'fold')} ({', '.join(map(str, folds))}), "
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
        md.append("")
        for dataset, sub in table.groupby("dataset"):
            if table["dataset"].nunique() > 1:
                md += [f"## {dataset}", ""]
            md += _markdown_table(sub, reference, units.get(dataset, {}).get("unit", "image"),
                                  info["no_hard_set"].get(dataset), info["hard_source"].get(dataset),
                                  info["eps_choice"]) + [""]
        for note in _footnotes(table, runs, reference, info):
            md += [note, ""]
        if best_config is not None:
            md += best_config_section(best_config, header, per_fold, out_dir)
        md += ["## Plots", "", "![Test Dice per method](dice_per_method.png)", ""]
        if eps.empty:
            md += ["Note: no adaptive run with ε refreshes, so no ε-against-difficulty plot.", ""]
        else:
            md += ["ε against difficulty at each adaptive run's last refresh (training images):", "",
                   "![ε against difficulty](eps_vs_difficulty.png)", ""]
        if optuna_storage and names:
            md += optuna_section(optuna_storage, names, out_dir)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [str(w.message) for w in caught if issubclass(w.category, ReportWarning)]
    if notes:
        md += ["## Warnings", ""] + [f"- {note}" for note in notes] + [""]
    path = out_dir / "table.md"
    path.write_text(redact("\n".join(md)))  # a database error can quote the URL it was given
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="+", required=True,
                   help="run or Tune experiment folders, local or URIs (s3://bucket/prefix/adaptive-final; only "
                        "their small result files are downloaded)")
    p.add_argument("--out", required=True,
                   help="folder of table.md, table.csv and the plots, or a URI (built in a temporary folder and "
                        "uploaded there)")
    p.add_argument("--optuna-storage", default=None,
                   help="storage URL of the search's Optuna studies (with --study-name or --best-config)")
    p.add_argument("--study-name", action="append", default=None,
                   help="an Optuna study of the search; repeat it for the per-fold studies of a nested search "
                        "(--study-name adaptive-fold0 --study-name adaptive-fold1 ...). Without it, "
                        "--optuna-storage shows the studies that --best-config names")
    p.add_argument("--best-config", default=None,
                   help="the search's best_config.json (a path or a URI): a table of the best configuration per fold "
                        "and its spread")
    p.add_argument("--reference", default=None,
                   help="label of the paired tests' reference (default: adaptive-tuned, else adaptive-tuned-fold<F>, "
                        "else adaptive-thesis, else the first adaptive* label)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.study_name and not args.optuna_storage:
        print("error: --study-name needs --optuna-storage", file=sys.stderr)
        return 2
    if args.optuna_storage and not (args.study_name or args.best_config):
        print("error: --optuna-storage needs --study-name or --best-config (which names the studies)", file=sys.stderr)
        return 2
    import storage  # beside this file

    try:  # results and --best-config from storage, the report to storage: local paths or URIs
        path, uploaded = storage.make_report(args.results, args.out, optuna_storage=args.optuna_storage,
                                             study_names=args.study_name, reference=args.reference,
                                             best_config=args.best_config, builder=make_report)
    except (ValueError, OSError) as exc:
        print(storage.redact(f"error: {exc}"), file=sys.stderr)
        return 2
    print(storage.redact(uploaded) if uploaded else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
