"""Optuna search of the adaptive controller (k, q, E0, τ, ε_min, ε_max) with Ray Tune.

    python studies/tune_adaptive.py --num-gpus 8                      # on a Ray cluster (RAY_ADDRESS)
    python studies/tune_adaptive.py --smoke                           # a first look on a laptop CPU
    python studies/tune_adaptive.py --num-gpus 8 --resume             # continue an interrupted study

1. Search: ``--num-samples`` trials on the search fold's training part, each scored by its best
   **validation** Dice (the fold's inner validation split). The test part is never read. The
   thesis configuration (k = 2, q = 25, E0 = 10, τ = 10, ε ∈ [0, 0.5]) is evaluated first.
   Optuna's multivariate TPE proposes the rest; the study lives in a database (SQLite in the results
   folder by default, PostgreSQL with ``--optuna-storage postgresql://...``) and survives the run.
2. Final: the best configuration(s) re-run on every fold, now tested (labelled ``adaptive-tuned``).
3. Report: the table of the final runs (and of any baseline grid passed with ``--compare``).

Layout under ``--storage-path`` (default ``results/``)::

    <study>/          Tune experiment of the search (one folder per trial, TensorBoard events)
    <study>-final/    Tune experiment of the final runs
    <study>-optuna.db Optuna study (unless --optuna-storage)
    <study>-report/   best_config.json, table.md, table.csv, plots
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import study_cli

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from polydice.train import load_data
from polydice.tune import StudyPaths, make_trainable, restore_or_create, run_config, storage_uri, write_json
from search_space import AdaptiveSpace, search_ranges, thesis_point

METRIC, MODE = "best_val_dice", "max"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study_cli.add_common_flags(p)
    g = p.add_argument_group("search")
    g.add_argument("--num-samples", type=int, default=None, help="trials of the search (default 32; 3 with --smoke)")
    g.add_argument("--study-name", default="adaptive", help="name of the Tune experiment and the Optuna study")
    g.add_argument("--optuna-storage", default=None, help="SQLAlchemy URL of the Optuna study (default: SQLite file in --storage-path)")
    g.add_argument("--scheduler", choices=("none", "asha"), default="none", help="ASHA early stopping; its grace period covers the largest E0")
    g.add_argument("--search-fold", type=int, default=0, help="fold whose training part the search uses (its test part is never read)")
    g.add_argument("--final-top", type=int, default=1, help="re-run the best N configurations on every fold (0: skip)")
    g.add_argument("--compare", nargs="*", default=[], help="baseline grid result folders to put in the table")
    g.add_argument("--checkpoint-every", type=int, default=0, help="extra checkpoints every N epochs (refreshes always checkpoint)")
    return p


def open_study(url: str, name: str) -> tuple[optuna.storages.BaseStorage, int]:
    """The Optuna storage and how many finished trials the study already has."""
    storage = optuna.storages.RDBStorage(url)
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
        done = len(existing.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    except KeyError:
        done = 0
    return storage, done


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    num_samples = args.num_samples or (3 if args.smoke else 32)
    base = study_cli.base_config(args, method="adaptive", fold=args.search_fold, tag="adaptive-search")
    paths = StudyPaths(Path(args.storage_path) if "://" not in args.storage_path else Path("."), args.study_name)
    search_path = f"{storage_uri(args.storage_path)}/{args.study_name}"
    final_name = f"{args.study_name}-final"
    report_dir = Path(args.storage_path) / f"{args.study_name}-report"
    if not args.resume and tune.Tuner.can_restore(search_path):
        print(f"error: a study named {args.study_name!r} already exists at {search_path}; "
              "pass --resume to continue it or choose another --study-name", file=sys.stderr)
        return 2
    Path(args.storage_path).mkdir(parents=True, exist_ok=True) if "://" not in args.storage_path else None

    t0 = time.time()
    data = load_data(base)  # decoded once here, shared with every trial through the object store
    print(f"data: {base.dataset}, {len(data)} images at {base.image_size}px, {data.n_groups} groups "
          f"({time.time() - t0:.1f}s)")
    mode = study_cli.start_ray(args)
    cpus, gpus = study_cli.resources(args)
    concurrent = study_cli.max_concurrent(args, gpus)
    print(f"ray: {mode}, {args.num_gpus:g} GPUs for the study, {cpus:g} CPU + {gpus:g} GPU per trial, "
          f"at most {concurrent or 'as many as fit'} trials at once")

    optuna_url = args.optuna_storage or paths.sqlite_url
    storage, finished = open_study(optuna_url, args.study_name)
    points = [] if finished else [thesis_point(base.epochs)]
    if finished:
        print(f"optuna: continuing study {args.study_name!r} with {finished} finished trials")
    searcher = OptunaSearch(
        space=AdaptiveSpace(base.epochs),
        metric=METRIC,
        mode=MODE,
        points_to_evaluate=points,
        sampler=optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=args.seed),
        study_name=args.study_name,
        storage=storage,
    )
    scheduler = None
    if args.scheduler == "asha":
        # No trial is stopped before its adaptive phase has begun: the first rung lies past the
        # largest E0 the search can propose.
        grace = min(base.epochs, search_ranges(base.epochs)["e0"][1] + 1)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=base.epochs, grace_period=grace, reduction_factor=3)

    trainable = make_trainable(base, data, cpus_per_trial=cpus, gpus_per_trial=gpus,
                               evaluate_test=False, checkpoint_every=args.checkpoint_every)

    def new_search() -> tune.Tuner:
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                        num_samples=num_samples, max_concurrent_trials=concurrent or None),
            run_config=run_config(args.study_name, args.storage_path, max_failures=args.max_failures),
        )

    try:
        tuner = restore_or_create(search_path, trainable, new_search, args.resume)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    search = tuner.fit()
    study = optuna.load_study(study_name=args.study_name, storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not complete:
        print("error: no search trial finished; see the trial errors above", file=sys.stderr)
        return 1
    ranked = sorted(complete, key=lambda t: t.value, reverse=True)
    best = [dict(t.params) for t in ranked[: max(1, args.final_top)]]
    write_json(report_dir / "best_config.json", {
        "metric": f"{METRIC} (validation, fold {args.search_fold})",
        "best": [{"value": t.value, "params": t.params, "optuna_trial": t.number} for t in ranked[: max(1, args.final_top)]],
        "base": base.to_dict(),
        "optuna_storage": optuna_url if "://" in optuna_url else optuna_url,
        "n_trials": len(study.trials),
    })
    print(f"search: {len(complete)} finished trials, best validation Dice {ranked[0].value:.4f} with {ranked[0].params}")

    results_dirs = []
    if args.final_top > 0:
        final_base = base.replace(tag="adaptive-tuned")
        final_trainable = make_trainable(final_base, data, cpus_per_trial=cpus, gpus_per_trial=gpus,
                                         evaluate_test=True, checkpoint_every=args.checkpoint_every)
        overrides = [dict(params, tag="adaptive-tuned" if i == 0 else f"adaptive-tuned-{i + 1}") for i, params in enumerate(best)]
        final_path = f"{storage_uri(args.storage_path)}/{final_name}"

        def new_final() -> tune.Tuner:
            return tune.Tuner(
                final_trainable,
                param_space={"overrides": tune.grid_search(overrides), "fold": tune.grid_search(list(range(base.folds)))},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrent or None),
                run_config=run_config(final_name, args.storage_path, max_failures=args.max_failures),
            )

        final = restore_or_create(final_path, final_trainable, new_final, args.resume and tune.Tuner.can_restore(final_path)).fit()
        errors = [r.error for r in final if r.error]
        if errors:
            print(f"error: {len(errors)} final runs failed: {errors[0]}", file=sys.stderr)
            return 1
        results_dirs.append(Path(args.storage_path) / final_name)

    print(f"best configuration: {report_dir / 'best_config.json'}")
    if results_dirs or args.compare:
        import report

        table = report.make_report(results_dirs + [Path(p) for p in args.compare], report_dir,
                                   optuna_storage=optuna_url, study_name=args.study_name)
        print(f"table: {table}")
    else:  # --final-top 0 and nothing to compare: no tested run, so no table
        print("table: none (--final-top 0 and no --compare: no tested runs)")
    print(f"tensorboard --logdir {args.storage_path}")
    print(f"done in {time.time() - t0:.0f}s")
    return 0 if not search.errors else 1


if __name__ == "__main__":
    sys.exit(main())
