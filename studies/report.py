"""The final table of a study: test metrics per method, paired tests, the fixed-ε oracle, the
hardest images, plots.

    python studies/report.py --results results/adaptive-final results/baselines --out results/report
    python studies/report.py --results results/adaptive-final --out results/report \\
        --optuna-storage sqlite:///results/adaptive-optuna.db --study-name adaptive

Input: every run folder under the ``--results`` folders that holds a ``summary.json`` with test
metrics (``python -m polydice.train --out DIR`` or Ray Tune trial folders, at any depth). Search
trials have no test metrics and are skipped. A run's label is its ``tag``, else its method
(``polydice-eps+0.2`` for a fixed ε).

Honesty (DESIGN.md, "Study protocol"): the paired tests pair the same test images; the hardest
images are one set for all methods; the best fixed ε is picked on test Dice, so its row is marked
as an oracle, not a method.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

METRICS = ("dice", "iou", "precision", "recall", "nsd", "nll", "brier", "dice_hardest_quartile")
HEADERS = {
    "dice": "Dice", "iou": "IoU", "precision": "Precision", "recall": "Recall", "nsd": "NSD",
    "nll": "NLL", "brier": "Brier", "dice_hardest_quartile": "Hardest 25 % Dice (own)¹",
}
REFERENCE_PREFERENCE = ("adaptive-tuned", "adaptive-thesis")
ZERO_EPS_LABEL = "polydice-eps+0.0"
HARDEST_FRACTION = 0.25  # the same count rule as polydice.metrics.hardest_quartile_mean


class ReportWarning(UserWarning):
    """Something about the input the reader of the table should know (listed in table.md)."""


def run_label(config: dict) -> str:
    """``tag`` if set, else the method (``polydice-eps+0.2`` for a fixed ε), as the studies name runs."""
    if config.get("tag"):
        return str(config["tag"])
    if config.get("method") == "polydice":
        return f"polydice-eps{float(config.get('eps', 0.0)):+.1f}"
    return str(config.get("method"))


def _run_dirs(results_dir: Path):
    """Every ``summary.json`` below ``results_dir`` with test metrics, one per trial.

    Tune's last checkpoint of a tested trial carries a copy of the run's files
    (``<trial>/checkpoint_000009/summary.json``): that copy is the same run, not a duplicate.
    """
    by_trial: dict[Path, list[tuple[Path, dict]]] = {}
    for path in sorted(results_dir.rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable {path}: {exc}", ReportWarning, stacklevel=3)
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
    """One row per (dataset, label, fold) of the tested runs below ``results_dirs``.

    Args:
        results_dirs: folders of runs or of Tune experiments (trials at any depth).

    Returns:
        Columns ``dataset, label, method, eps, fold, folds, split_seed, seed``, ``test_<metric>`` for
        every metric of ``METRICS``, ``val_dice, best_epoch, n_test, run_dir, mtime``. Where a
        (dataset, label, fold) appears more than once the newest ``summary.json`` (mtime) is kept,
        with a warning.

    Raises:
        ValueError: a folder does not exist or holds no tested run.
    """
    rows, seen = [], set()
    for results_dir in map(Path, results_dirs):
        if not results_dir.is_dir():
            raise ValueError(f"results folder {results_dir} does not exist or is not a folder")
        found = 0
        for run_dir, summary in _run_dirs(results_dir):
            found += 1
            if run_dir.resolve() in seen:  # overlapping --results folders
                continue
            seen.add(run_dir.resolve())
            cfg = summary["config"]
            row = {
                "dataset": cfg.get("dataset", "unknown"),
                "label": run_label(cfg),
                "method": cfg.get("method"),
                "eps": float(cfg["eps"]) if cfg.get("method") == "polydice" else math.nan,
                "fold": int(cfg.get("fold", 0)),
                "folds": cfg.get("folds"),
                "split_seed": cfg.get("split_seed"),
                "seed": cfg.get("seed"),
            }
            for key in METRICS:
                value = summary.get(f"test_{key}")
                row[f"test_{key}"] = math.nan if value is None else float(value)
            row.update(val_dice=summary.get("val_dice"), best_epoch=summary.get("best_epoch"),
                       n_test=summary.get("n_test"), run_dir=str(run_dir),
                       mtime=(run_dir / "summary.json").stat().st_mtime)
            rows.append(row)
        if not found:
            raise ValueError(
                f"no tested runs under {results_dir}: no summary.json with test metrics (search trials "
                "have none; pass the folder of the final runs or of the baseline grid)"
            )
    runs = pd.DataFrame(rows).sort_values("mtime", kind="stable")
    key = ["dataset", "label", "fold"]
    dup = runs.duplicated(key, keep="last")
    for _, old in runs[dup].iterrows():
        kept = runs[~dup].set_index(key).loc[tuple(old[key]), "run_dir"]
        warnings.warn(
            f"{old['label']} fold {old['fold']} ({old['dataset']}) appears more than once: keeping the newest "
            f"{kept}, ignoring {old['run_dir']}",
            ReportWarning,
            stacklevel=2,
        )
    return runs[~dup].sort_values(key).reset_index(drop=True)


def load_per_image(runs: pd.DataFrame) -> pd.DataFrame:
    """The ``per_image.csv`` of every run: ``dataset, label, fold, index, dice, difficulty``.

    A label whose folds test the same image twice (runs with different splits) keeps the first.
    """
    frames = []
    for run in runs.itertuples():
        path = Path(run.run_dir) / "per_image.csv"
        if not path.exists():
            warnings.warn(f"{run.label} fold {run.fold}: no per_image.csv in {run.run_dir}; "
                          "left out of the paired tests and the common hardest images", ReportWarning, stacklevel=2)
            continue
        frame = pd.read_csv(path, usecols=["index", "dice", "difficulty"])
        frames.append(frame.assign(dataset=run.dataset, label=run.label, fold=run.fold))
    if not frames:
        return pd.DataFrame(columns=["dataset", "label", "fold", "index", "dice", "difficulty"])
    per_image = pd.concat(frames, ignore_index=True)[["dataset", "label", "fold", "index", "dice", "difficulty"]]
    dup = per_image.duplicated(["dataset", "label", "index"])
    if dup.any():
        labels = sorted(per_image.loc[dup, "label"].unique())
        warnings.warn(f"images tested in more than one fold of {labels} (different splits?); "
                      "keeping each image's first fold", ReportWarning, stacklevel=2)
    return per_image[~dup].reset_index(drop=True)


def paired_wilcoxon(values: np.ndarray, reference: np.ndarray) -> tuple[float, float, int]:
    """Two-sided Wilcoxon signed-rank test of paired per-image values.

    Returns:
        ``(p, mean difference values − reference, n pairs)``; p = 1 when every difference is 0 and
        NaN without pairs.
    """
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    diff = values - reference
    if len(diff) == 0:
        return math.nan, math.nan, 0
    if np.all(diff == 0):
        return 1.0, 0.0, len(diff)
    return float(stats.wilcoxon(values, reference).pvalue), float(diff.mean()), len(diff)


def fold_ttest(values: np.ndarray, reference: np.ndarray) -> float:
    """Paired t-test p of per-fold means (NaN below 3 folds; 1 when every difference is 0)."""
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    if len(values) < 3:
        return math.nan
    if np.all(values == reference):
        return 1.0
    return float(stats.ttest_rel(values, reference).pvalue)


def choose_reference(labels, reference: str | None = None) -> str | None:
    """``reference`` if given, else ``adaptive-tuned``, ``adaptive-thesis`` or the first ``adaptive*`` label.

    Raises:
        ValueError: ``reference`` is not one of ``labels``.
    """
    labels = sorted(set(labels))
    if reference is not None:
        if reference not in labels:
            raise ValueError(f"reference {reference!r} is not among the labels: {', '.join(labels)}")
        return reference
    for name in REFERENCE_PREFERENCE:
        if name in labels:
            return name
    return next((name for name in labels if name.startswith("adaptive")), None)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof = 1) over folds of every test metric, per (dataset, label)."""
    rows = []
    for (dataset, label), group in runs.groupby(["dataset", "label"], sort=True):
        if group["method"].nunique() > 1:
            warnings.warn(f"label {label!r} mixes methods {sorted(group['method'].unique())}", ReportWarning, stacklevel=2)
        row = {"dataset": dataset, "label": label, "method": group["method"].iloc[0],
               "eps": group["eps"].iloc[0], "folds": len(group), "n_test": group["n_test"].sum(min_count=1)}
        for key in METRICS:
            row[f"{key}_mean"] = group[f"test_{key}"].mean()
            row[f"{key}_std"] = group[f"test_{key}"].std(ddof=1)
        rows.append(row)
    return pd.DataFrame(rows)


def common_hardest(per_image: pd.DataFrame, fraction: float = HARDEST_FRACTION) -> tuple[pd.DataFrame, dict]:
    """Each method's mean Dice over one hardest set of images per dataset.

    An image's difficulty is the mean over all methods of the MC-Dropout difficulty their final
    models gave it; the hardest ``fraction`` of the images (at least one) by that mean is shared.

    Returns:
        ``(frame with dataset, label, dice_hardest_quartile_common, n_hardest_common,
        {dataset: sorted hardest indices})``.
    """
    rows, hardest = [], {}
    for dataset, images in per_image.groupby("dataset"):
        difficulty = images.groupby("index")["difficulty"].mean().dropna()
        if difficulty.empty:
            continue
        n = max(1, int(round(fraction * len(difficulty))))
        ranked = np.argsort(-difficulty.to_numpy(), kind="stable")
        hard = np.sort(difficulty.index.to_numpy()[ranked[:n]])
        hardest[dataset] = hard.tolist()
        for label, rows_of in images.groupby("label"):
            on = rows_of[rows_of["index"].isin(hard)]
            rows.append({"dataset": dataset, "label": label,
                         "dice_hardest_quartile_common": on["dice"].mean() if len(on) else math.nan,
                         "n_hardest_common": len(on)})
    return pd.DataFrame(rows, columns=["dataset", "label", "dice_hardest_quartile_common", "n_hardest_common"]), hardest


def paired_tests(runs: pd.DataFrame, per_image: pd.DataFrame, reference: str | None) -> pd.DataFrame:
    """Every label against ``reference`` within its dataset, on the folds both have.

    Per image: the Dice of each test image of the shared folds paired by dataset index (each image
    is tested once across folds), Wilcoxon signed-rank. Per fold: paired t-test of fold mean Dice.
    """
    rows = []
    for (dataset, label), group in runs.groupby(["dataset", "label"]):
        row = {"dataset": dataset, "label": label, "reference": reference, "folds_shared": 0,
               "n_pairs": 0, "dice_diff_mean": math.nan, "wilcoxon_p": math.nan, "ttest_p": math.nan}
        ref = runs[(runs["dataset"] == dataset) & (runs["label"] == reference)]
        if reference is None or label == reference or ref.empty:
            rows.append(row)
            continue
        folds = pd.merge(group[["fold", "test_dice"]], ref[["fold", "test_dice"]], on="fold", suffixes=("", "_ref"))
        shared = set(folds["fold"])
        images = per_image[(per_image["dataset"] == dataset) & per_image["fold"].isin(shared)]
        pairs = pd.merge(images[images["label"] == label][["index", "dice"]],
                         images[images["label"] == reference][["index", "dice"]], on="index", suffixes=("", "_ref"))
        p, diff, n = paired_wilcoxon(pairs["dice"], pairs["dice_ref"])
        row.update(folds_shared=len(shared), n_pairs=n, dice_diff_mean=diff, wilcoxon_p=p,
                   ttest_p=fold_ttest(folds["test_dice"], folds["test_dice_ref"]))
        rows.append(row)
    return pd.DataFrame(rows)


def add_oracle(table: pd.DataFrame) -> pd.DataFrame:
    """Append, per dataset, a copy of the fixed-ε PolyDice row with the best mean TEST Dice.

    The copy is labelled ``polydice-oracle (eps=+0.2)`` and flagged ``oracle=True``: ε was picked
    on test data, so it is an upper bound for a fixed ε, not a method.
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
        eps = pd.read_csv(path)
        if eps.empty:
            continue
        last = eps[eps["epoch"] == eps["epoch"].max()]
        frames.append(last.assign(dataset=run.dataset, label=run.label, fold=run.fold))
    if not frames:
        return pd.DataFrame(columns=["epoch", "index", "difficulty", "epsilon", "dataset", "label", "fold"])
    return pd.concat(frames, ignore_index=True)


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
        ax.set_ylabel("test Dice (per fold)")
        ax.set_title(f"{dataset}: test Dice per fold")
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


def plot_search_history(numbers, values, maximize: bool, path: Path) -> None:
    best = np.maximum.accumulate(values) if maximize else np.minimum.accumulate(values)
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    ax.scatter(numbers, values, s=14, label="trial")
    ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel("objective (search metric)")
    ax.set_title("Optuna search history")
    ax.legend()
    fig.savefig(path, dpi=120)


def plot_importances(importances: dict, path: Path) -> None:
    names = list(importances)[::-1]
    fig = _figure(6.0, 0.4 * len(names) + 1.5)
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("Hyperparameter importances")
    fig.savefig(path, dpi=120)


def _redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def optuna_section(storage: str, study_name: str, out_dir: Path) -> list[str]:
    """Search-history and importance plots of an Optuna study; markdown lines describing them."""
    import optuna

    lines = [f"## Search (Optuna study `{study_name}`, {_redact(storage)})", ""]
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except Exception as exc:  # a missing study (KeyError) or an unreachable database
        return lines + [f"Note: the study could not be loaded ({type(exc).__name__}: {exc}).", ""]
    if len(study.directions) > 1:
        return lines + ["Note: a multi-objective study; no search history or importances.", ""]
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None]
    lines.append(f"{len(study.trials)} trials, {len(done)} completed; the objective is the study's metric "
                 "(`best_val_dice` in studies/tune_adaptive.py: validation Dice, the search never reads test images).")
    lines.append("")
    if not done:
        return lines + ["Note: no completed trial; no search history.", ""]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    plot_search_history([t.number for t in done], np.array([t.value for t in done]), maximize,
                        out_dir / "search_history.png")
    best = max(done, key=lambda t: t.value) if maximize else min(done, key=lambda t: t.value)
    lines += [f"Best trial {best.number}: {best.value:.4f} with {best.params}.", "",
              "![Search history](search_history.png)", ""]
    try:
        if len(done) < 2:  # optuna answers a single trial with equal, meaningless importances
            raise ValueError(f"{len(done)} completed trial")
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as exc:
        return lines + [f"Note: no parameter importances ({exc}); they need at least 2 completed "
                        "trials with differing parameters and values.", ""]
    pd.DataFrame({"param": list(importances), "importance": list(importances.values())}).to_csv(
        out_dir / "importances.csv", index=False)
    plot_importances(importances, out_dir / "importances.png")
    return lines + ["Parameter importances (fANOVA over the completed trials): [importances.csv](importances.csv)",
                    "", "![Importances](importances.png)", ""]


# ----------------------------------------------------------------------------- the report


def _fmt(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def _fmt_p(p: float) -> str:
    return "–" if pd.isna(p) else f"{p:.3g}"


def _display_label(row, reference: str | None) -> str:
    if row["oracle"]:
        return f"*{row['label']}* † (oracle, not a method)"
    if row["label"] == reference:
        return f"**{row['label']}** (reference)"
    if row["label"] == ZERO_EPS_LABEL:
        return f"{row['label']} (PolyDice ε = 0 baseline)"
    return row["label"]


def _markdown_table(table: pd.DataFrame, reference: str | None) -> list[str]:
    header = (["Method", "Folds"] + [HEADERS[m] for m in METRICS]
              + ["Hardest 25 % Dice (common)²", "ΔDice vs ref³", "n pairs", "Wilcoxon p³", "Fold t-test p⁴"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [_display_label(row, reference), str(int(row["folds"]))]
        cells += [_fmt(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
        common = row["dice_hardest_quartile_common"]
        cells.append("–" if pd.isna(common) else f"{common:.4f} (n={int(row['n_hardest_common'])})")
        diff = row["dice_diff_mean"]
        cells += ["–" if pd.isna(diff) else f"{diff:+.4f}", str(int(row["n_pairs"])) if row["n_pairs"] else "–",
                  _fmt_p(row["wilcoxon_p"]), _fmt_p(row["ttest_p"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def make_report(
    results_dirs: list[Path],
    out_dir: Path,
    *,
    optuna_storage: str | None = None,
    study_name: str | None = None,
    reference: str | None = None,
) -> Path:
    """Write ``table.csv``, ``table.md`` and the plots of the tested runs below ``results_dirs``.

    Args:
        results_dirs: run folders or Tune experiment folders (see :func:`collect_runs`).
        out_dir: created if missing.
        optuna_storage, study_name: the search study, for its history and importance plots.
        reference: label the paired tests compare against (default: ``adaptive-tuned``, else
            ``adaptive-thesis``, else the first ``adaptive*`` label).

    Returns:
        The path of ``table.md``.

    Raises:
        ValueError: no results folder, a missing one, one without tested runs, or an unknown reference.
    """
    if not results_dirs:
        raise ValueError("no results folders given")
    out_dir = Path(out_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = collect_runs(results_dirs)
        reference = choose_reference(runs["label"], reference)
        per_image = load_per_image(runs)
        table = summarize(runs)
        common, hardest = common_hardest(per_image)
        table = table.merge(common, on=["dataset", "label"], how="left")
        table = table.merge(paired_tests(runs, per_image, reference), on=["dataset", "label"], how="left")
        table = add_oracle(table)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [str(w.message) for w in caught if issubclass(w.category, ReportWarning)]
    table["n_hardest_common"] = table["n_hardest_common"].fillna(0).astype(int)
    table = table.sort_values(["dataset", "oracle", "dice_mean"], ascending=[True, True, False], kind="stable")
    table = table.reset_index(drop=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    columns = (["dataset", "label", "method", "eps", "oracle", "folds", "n_test"]
               + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
               + ["dice_hardest_quartile_common", "n_hardest_common", "reference", "folds_shared", "n_pairs",
                  "dice_diff_mean", "wilcoxon_p", "ttest_p"])
    table[columns].to_csv(out_dir / "table.csv", index=False)

    plot_dice_per_method(runs, out_dir / "dice_per_method.png")
    eps = epsilon_at_last_refresh(runs)
    if not eps.empty:
        plot_eps_vs_difficulty(eps, out_dir / "eps_vs_difficulty.png")

    md = ["# PolyDice study report", ""]
    labels = sorted(runs["label"].unique())
    md.append(f"Compared: {len(labels)} methods ({', '.join(f'`{x}`' for x in labels)}), results from "
              + ", ".join(f"`{d}`" for d in results_dirs) + ".")
    md.append("")
    for dataset, sub in runs.groupby("dataset"):
        folds = sorted(sub["fold"].unique())
        images = per_image.loc[per_image["dataset"] == dataset, "index"].nunique()
        md.append(f"- `{dataset}`: {len(folds)} folds ({', '.join(map(str, folds))}), {images} test images "
                  f"(every image is tested once per method across its folds), {len(sub)} runs.")
    md += ["", f"Reference of the paired tests: `{reference}`." if reference else
           "No adaptive run: no paired tests (pass --reference LABEL).", ""]
    for dataset, sub in table.groupby("dataset"):
        if table["dataset"].nunique() > 1:
            md += [f"## {dataset}", ""]
        md += _markdown_table(sub, reference) + [""]

    sizes = ", ".join(f"{len(v)} images of `{k}`" for k, v in hardest.items())
    footnotes = [
        "Values are the mean ± sample standard deviation (ddof = 1) over folds of each fold's test mean; "
        "a single fold has no std.",
        "¹ Hardest 25 % Dice (own): each run ranks its own test images by its own final model's MC-Dropout "
        "difficulty (mutual information) and averages the Dice of the top quarter; the sets differ between "
        "methods, so this is not a like-for-like comparison.",
        "² Hardest 25 % Dice (common): one set of images for all methods: each test image's difficulty is "
        "averaged over every method's final model, and the top quarter by that mean "
        f"({sizes or 'no per-image results'}) is shared; mean Dice over it, pooled across folds.",
        f"³ Paired per image against `{reference}`: ΔDice is the mean of (method − reference) Dice over the "
        "test images of the folds both share (n pairs, joined on the dataset index); two-sided Wilcoxon "
        "signed-rank test (p = 1 when every difference is 0). Images of one patient or video sequence are "
        "correlated, so n overstates the independent evidence and p is optimistic. No correction for "
        "multiple comparisons.",
        "⁴ Paired t-test of the per-fold mean test Dice over the shared folds (needs ≥ 3): with 5 folds it "
        "has 4 degrees of freedom, a weak test.",
    ]
    if table["oracle"].any():
        footnotes.append("† Oracle, not a valid method: picked on test Dice. A copy of the fixed-ε PolyDice-1 "
                         "row with the best mean **test** Dice, an upper bound for a tuned fixed ε (as in the thesis).")
    if ZERO_EPS_LABEL in labels:
        footnotes.append(f"`{ZERO_EPS_LABEL}` is the PolyDice ε = 0 baseline.")
    for note in footnotes:
        md += [note, ""]
    md += ["## Plots", "", "![Test Dice per method](dice_per_method.png)", ""]
    if eps.empty:
        md += ["Note: no adaptive run with ε refreshes, so no ε-against-difficulty plot.", ""]
    else:
        md += ["ε against difficulty at each adaptive run's last refresh (training images):", "",
               "![ε against difficulty](eps_vs_difficulty.png)", ""]
    if optuna_storage and study_name:
        md += optuna_section(optuna_storage, study_name, out_dir)
    if notes:
        md += ["## Warnings", ""] + [f"- {note}" for note in notes] + [""]
    path = out_dir / "table.md"
    path.write_text("\n".join(md))
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="+", type=Path, required=True, help="run or Tune experiment folders")
    p.add_argument("--out", type=Path, required=True, help="folder of table.md, table.csv and the plots")
    p.add_argument("--optuna-storage", default=None, help="storage URL of the search study (with --study-name)")
    p.add_argument("--study-name", default=None, help="name of the Optuna study of the search")
    p.add_argument("--reference", default=None, help="label of the paired tests' reference (default: adaptive-tuned)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.optuna_storage) != bool(args.study_name):
        print("error: --optuna-storage and --study-name go together", file=sys.stderr)
        return 2
    try:
        path = make_report(args.results, args.out, optuna_storage=args.optuna_storage,
                           study_name=args.study_name, reference=args.reference)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
