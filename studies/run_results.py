"""The tested runs of a study, read from their run folders: one row per replicate (dataset,
label, fold, seed) from each ``summary.json``, the per-image results of each ``per_image.csv``,
the ε of each ``epsilon.csv``, and the check that runs to be paired share one split.

Input: every run folder under the ``--results`` folders that holds a ``summary.json`` with test
metrics (``python -m polydice.train --out DIR`` or Ray Tune trial folders, at any depth). Search
trials have no test metrics and are skipped. A run's label is its ``tag``, else its method
(``polydice-eps+0.2`` for a fixed ε). Nothing here reads a pickle.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path

import pandas as pd

from polydice.config import run_label



class ReportWarning(UserWarning):
    """Something about the input the reader of the table should know (listed in table.md)."""


METRICS = ("dice", "iou", "precision", "recall", "nsd", "nll", "brier", "dice_hardest_quartile")
PM_BOTH, PM_FOREGROUND = "background+foreground", "foreground"
# The split every paired run must share, and settings that should (a warning when they differ).
SPLIT_FIELDS = ("folds", "split_seed", "n_images")


SETTING_FIELDS = ("image_size", "epochs")


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


def number(value, what: str) -> float:
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
    fold = number(cfg.get("fold", 0), "config.fold")
    if not float(fold).is_integer():
        raise ValueError(f"config.fold is {cfg.get('fold')!r}, not a fold number")
    fixed_eps = cfg.get("method") == "polydice"
    eps = number(cfg.get("eps", 0.0), "config.eps") if fixed_eps else math.nan
    seed = number(cfg.get("seed", 0), "config.seed")
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
        row[f"test_{key}"] = number(summary.get(f"test_{key}"), f"test_{key}")
    sizes = {k: number(summary.get(k), k) for k in ("n_train", "n_val", "n_test")}
    row.update(val_dice=number(summary.get("val_dice"), "val_dice"), best_epoch=summary.get("best_epoch"),
               **sizes, n_images=sum(sizes.values()), run_dir=str(run_dir),
               mtime=(run_dir / "summary.json").stat().st_mtime)
    return row


def read_table(path: Path, columns: list[str], owner: str) -> pd.DataFrame | None:
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
        frame = read_table(path, ["index", "dice", "difficulty"], f"{run.label} fold {run.fold}")
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


def epsilon_at_last_refresh(runs: pd.DataFrame) -> pd.DataFrame:
    """ε and difficulty of every training image at the last refresh of each adaptive run."""
    frames = []
    for run in runs[runs["method"] == "adaptive"].itertuples():
        path = Path(run.run_dir) / "epsilon.csv"
        if not path.exists() or path.stat().st_size == 0:
            continue
        eps = read_table(path, ["epoch", "index", "difficulty", "epsilon"], f"{run.label} fold {run.fold}")
        if eps is None or eps.empty:
            continue
        last = eps[eps["epoch"] == eps["epoch"].max()]
        frames.append(last.assign(dataset=run.dataset, label=run.label, fold=run.fold))
    if not frames:
        return pd.DataFrame(columns=["epoch", "index", "difficulty", "epsilon", "dataset", "label", "fold"])
    return pd.concat(frames, ignore_index=True)
