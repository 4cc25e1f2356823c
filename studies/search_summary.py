"""What the search found: the best configuration per fold (``best_config.json``) and its spread,
and each Optuna study's history and parameter importances, as sections of the report."""

from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from plots import plot_importances, plot_search_history
from run_results import ReportWarning
from storage import redact


def is_number(value) -> bool:
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
        if not is_number(value):
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
        if not all(is_number(v) for v in values.dropna()) or values.dropna().empty:
            continue  # a categorical parameter: the per-fold table shows it
        values = values.dropna().astype(float)
        std = values.std(ddof=1) if len(values) > 1 else math.nan
        mean = values.mean()
        rows.append({"parameter": name, "n_folds": len(values), "min": values.min(), "max": values.max(),
                     "mean": mean, "std": std, "cv": std / abs(mean) if mean != 0 else math.nan})
    return pd.DataFrame(rows, columns=["parameter", "n_folds", "min", "max", "mean", "std", "cv"])


def fmt_value(value) -> str:
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
                 fmt_value(r["optuna_trial"]), fmt_value(r["n_trials"]),
                 "–" if pd.isna(r["value"]) else f"{r['value']:.4f}"]
        cells += [fmt_value(r[p]) for p in params]
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
        lines.append("| " + " | ".join([name] + [fmt_value(r[c]) for c in ("min", "max", "mean", "std", "cv")]) + " |")
    return lines + [""]


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
    params = ", ".join(f"{k} = {fmt_value(v)}" for k, v in best.params.items())
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


def _fmt_importance(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:.3f}"
