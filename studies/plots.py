"""The report's figures (matplotlib's Agg canvas, no display needed): test Dice per method, ε
against difficulty, an Optuna study's search history and its parameter importances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_dice_per_method(runs: pd.DataFrame, path: Path) -> None:
    """Box plot with the folds as points, methods sorted by mean test Dice, a panel per dataset."""
    datasets = sorted(runs["dataset"].unique())
    n_labels = runs.groupby("dataset")["label"].nunique().max()
    fig = figure(max(6.0, 0.6 * n_labels + 2), 4.0 * len(datasets))
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
    fig = figure(4.5 * len(panels), 4.0)
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
    fig = figure(6.0, 4.0)
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
    fig = figure(6.0, 0.4 * len(names) + 1.5)
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title(f"Hyperparameter importances: {study_name}")
    fig.savefig(path, dpi=120)
