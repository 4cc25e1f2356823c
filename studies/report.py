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
import sys
import warnings
from pathlib import Path

import pandas as pd

import study_cli  # noqa: F401  (puts the checkout on sys.path, for a run without installing)
from method_table import TABLE_COLUMNS, build_table
from plots import plot_dice_per_method, plot_eps_vs_difficulty
from polydice.config import SELECTION_TAG
from rendering import footnotes, markdown_table, page_head
from run_results import ReportWarning, collect_runs, epsilon_at_last_refresh, load_per_image
from search_summary import best_config_section, load_best_config, optuna_section
from storage import redact


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

        md = page_head(results_dirs, runs, units, reference)
        for dataset, sub in table.groupby("dataset"):
            if table["dataset"].nunique() > 1:
                md += [f"## {dataset}", ""]
            md += markdown_table(sub, reference, units.get(dataset, {}).get("unit", "image"),
                                  info["no_hard_set"].get(dataset), info["hard_source"].get(dataset),
                                  info["eps_choice"]) + [""]
        for note in footnotes(table, runs, reference, info):
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
