"""Nested Optuna search of the adaptive controller (k, q, E0, τ, ε_min, ε_max) with Ray Tune.

    python studies/tune_adaptive.py --num-gpus 8                      # on a Ray cluster (RAY_ADDRESS)
    python studies/tune_adaptive.py --smoke                           # a first look on a laptop CPU
    python studies/tune_adaptive.py --num-gpus 8 --resume             # continue an interrupted study

1. Search, nested in the cross-validation: for every outer fold f, ``--num-samples`` trials on f's
   training part only, each scored by its best **validation** Dice on f's inner validation split.
   No image that fold f tests on is read by f's search. One Optuna study per fold, named
   ``<study>-fold<f>``, in one database (SQLite in the results folder by default, PostgreSQL with
   ``--optuna-storage postgresql://...``). The thesis configuration (k = 2, q = 25, E0 = 10,
   τ = 10, ε ∈ [0, 0.5]) is evaluated first in each; Optuna's multivariate TPE proposes the rest.
   ``--search-fold F`` searches fold F alone (then only fold F is tested).
2. Final: fold f's best configuration re-run on fold f and tested on its test part (labelled
   ``adaptive-tuned``; ``adaptive-tuned-fold<F>`` for a single-fold search), once per training seed
   ``--seed`` + r, r < ``--seeds``, as the baseline grid runs every method, so that the report
   compares them across training randomness, paired by fold and seed.
3. Report: the table of the final runs (and of any baseline grid passed with ``--compare``), with
   each fold's best configuration and how much they differ.

Layout under ``--storage-path`` (default ``results/``; a local folder or a URI such as
``s3://bucket/prefix``)::

    <study>-fold<f>/  Tune experiment of fold f's search (one folder per trial, TensorBoard events)
    <study>-final/    Tune experiment of the final runs
    <study>-optuna.db Optuna studies <study>-fold<f> (unless --optuna-storage)
    <study>-report/   best_config.json (best configuration per fold), table.md, table.csv, plots

``--resume`` continues whichever fold's search or final run was interrupted; a fold whose search
finished (it is in best_config.json) is not searched again.

Remote storage (``s3://...``): Tune writes the experiments there; the report is built in
``./<study>-report`` and uploaded to ``<storage>/<study>-report/``. Without ``--optuna-storage`` the
Optuna studies are a SQLite file that the driver keeps in its current folder,
``./<study>-optuna.db`` (an object store cannot hold a SQLite database): ``--resume`` must run in
the same folder, or pass ``--optuna-storage sqlite:////path/to/<study>-optuna.db``. A copy is
uploaded to ``<storage>/<study>-optuna.db`` after each fold's search, for reading. For a driver
that may run elsewhere on resume, give a database every machine can reach:
``--optuna-storage postgresql://...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import storage
import study_cli

import optuna
from ray import tune

from polydice.resume import StudySearch, TrialCount, close_stale_trials, study_search_alg
from polydice.train import load_data
from polydice.studydb import DB_TIMEOUT_S, study_storage
from polydice.tune import make_trainable, restore_or_create, run_config
from search_space import AdaptiveSpace, search_ranges, thesis_point
from warmup_asha import WarmupASHA, epochs_saved

METRIC, MODE = "best_val_dice", "max"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study_cli.add_common_flags(p, seeds_help=(
        "training replicates of the final runs: each fold's best configuration(s) (see --final-top) re-run "
        "once per seed --seed + r, r < N; the search trials train with --seed alone (default: 3)"))
    g = p.add_argument_group("search")
    g.add_argument("--num-samples", type=int, default=None,
                   help="trials of each fold's search (default: 32; 3 with --smoke)")
    g.add_argument("--study-name", default="adaptive",
                   help="prefix of the Tune experiments and Optuna studies (default: adaptive)")
    g.add_argument("--optuna-storage", default=None,
                   help="SQLAlchemy URL of the Optuna studies (default: the SQLite file <study>-optuna.db in "
                        "--storage-path; with a remote --storage-path, in the current folder)")
    g.add_argument("--optuna-timeout", type=float, default=DB_TIMEOUT_S, metavar="SECONDS",
                   help="how long the driver waits for an unreachable Optuna database (a restart, a failover) "
                        "before it stops the study with one error line; --resume continues it "
                        f"(default: {DB_TIMEOUT_S:g})")
    g.add_argument("--scheduler", choices=("none", "asha"), default="none",
                   help="ASHA early stopping, never before a trial's own E0 + τ epochs (default: none)")
    g.add_argument("--search-fold", type=int, default=None,
                   help="search and test this outer fold only (default: every fold, nested)")
    g.add_argument("--final-top", type=int, default=1,
                   help="re-run each fold's best N configurations on that fold and test them (0: skip; default: 1)")
    g.add_argument("--compare", nargs="*", default=[], help="baseline grid result folders to put in the table (default: none)")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="extra checkpoints every N epochs (refreshes always checkpoint; default: 0)")
    return p


def open_study(url: str, name: str, timeout_s: float = DB_TIMEOUT_S) -> tuple[optuna.storages.BaseStorage, int]:
    """The Optuna storage (waiting up to ``timeout_s`` for a database that restarts: see
    ``polydice.studydb.study_storage``) and how many finished trials the study already has."""
    storage = study_storage(url, timeout_s)
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
        done = len(existing.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    except KeyError:
        done = 0
    return storage, done


def tuned_tag(args: argparse.Namespace, rank: int) -> str:
    """Report label of a final run: ``adaptive-tuned`` (nested), ``adaptive-tuned-fold<F>`` (one
    fold searched), ``-<rank>`` for the runner-up configurations, ``-inner`` for the printed scale."""
    tag = "adaptive-tuned" if args.search_fold is None else f"adaptive-tuned-fold{args.search_fold}"
    if rank > 0:
        tag += f"-{rank + 1}"
    return tag + ("-inner" if args.polydice_scale == "inner" else "")


def read_best(path: str) -> dict:
    """best_config.json of an earlier run of this study, local or in remote storage ({} when there
    is none)."""
    try:
        if not storage.exists(path):
            return {}
        return json.loads(storage.read_text(path))
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(storage.redact(f"error: {path} is unreadable ({exc}); move it away to search again"))


def search_fold(args, fold: int, base, trainable, optuna_url: str, num_samples: int, concurrent: int,
                resume: bool) -> dict:
    """Fold ``fold``'s search; returns its best_config.json entry (None when no trial finished)."""
    name = f"{args.study_name}-fold{fold}"
    path = storage.join(storage.resolve(args.storage_path), name)
    optuna_storage, finished = open_study(optuna_url, name, args.optuna_timeout)
    if finished:
        print(f"optuna: continuing study {name!r} with {finished} finished trials")
    searcher = StudySearch(
        space=AdaptiveSpace(base.epochs, constants={"fold": fold}),
        metric=METRIC,
        mode=MODE,
        points_to_evaluate=[] if finished else [thesis_point(base.epochs)],
        sampler=optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=args.seed + fold),
        study_name=name,
        storage=optuna_storage,
    )
    scheduler = None
    if args.scheduler == "asha":
        # Rungs from the shortest warm-up the search can propose; no trial is stopped before its
        # own E0 + τ epochs, when its ε adaptation has acted for a whole refresh interval.
        r = search_ranges(base.epochs)
        grace = min(base.epochs, r["e0"][0] + r["tau"][0])
        scheduler = WarmupASHA(time_attr="epoch", max_t=base.epochs, grace_period=grace, reduction_factor=3)

    def new_search() -> tune.Tuner:
        # The searcher's own concurrency limiter (not max_concurrent_trials), one that a restore
        # cannot leave waiting for a trial the experiment never had, and a restored search that
        # counts the experiment's trials (polydice.resume).
        search_alg = study_search_alg(searcher, concurrent)
        console = study_cli.progress(args, num_samples)
        console["callbacks"] = [TrialCount(search_alg), *console.get("callbacks", [])]
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=search_alg, scheduler=scheduler,
                                        trial_dirname_creator=study_cli.trial_dirname, reuse_actors=True,
                                        num_samples=num_samples),
            run_config=run_config(name, args.storage_path, max_failures=args.max_failures, **console),
        )

    print(f"search: fold {fold}, {num_samples} trials on its training part (study {name!r})")
    results = restore_or_create(path, trainable, new_search, resume and tune.Tuner.can_restore(path)).fit()
    if results.errors:
        print(storage.redact(f"search: fold {fold}: {len(results.errors)} trials failed: {results.errors[0]}"),
              file=sys.stderr)
    if scheduler is not None:
        saved = epochs_saved(results, base.epochs)
        print(f"asha: fold {fold}: {saved['stopped']} of {saved['trials']} trials stopped early, "
              f"{saved['epochs_saved']} of {saved['trials'] * base.epochs} epochs saved ({saved['fraction_saved']:.0%})")
    study = optuna.load_study(study_name=name, storage=optuna_storage)
    stale = close_stale_trials(study)
    if stale:
        print(f"search: fold {fold}: Optuna trials {stale} were suggested before an interruption and never run; "
              "marked failed")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    ranked = sorted(complete, key=lambda t: t.value, reverse=True)[: max(1, args.final_top)]
    print(f"search: fold {fold}: {len(complete)} finished trials, best validation Dice {ranked[0].value:.4f} "
          f"with {study_cli.controller_params(ranked[0].params)} (full values in best_config.json)")
    return {
        "study_name": name,
        "value": ranked[0].value,
        "params": ranked[0].params,
        "optuna_trial": ranked[0].number,
        "n_trials": len(study.trials),
        "n_complete": len(complete),
        "n_errors": len(results.errors),
        "top": [{"value": t.value, "params": t.params, "optuna_trial": t.number} for t in ranked],
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    study_cli.quiet_console(args)
    num_samples = args.num_samples or (3 if args.smoke else 32)
    try:
        seeds = study_cli.replicate_seeds(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base = study_cli.base_config(args, method="adaptive", tag="adaptive-search")
    if args.search_fold is not None and not 0 <= args.search_fold < base.folds:
        print(f"error: --search-fold must be in [0, {base.folds}), got {args.search_fold}", file=sys.stderr)
        return 2
    folds = list(range(base.folds)) if args.search_fold is None else [args.search_fold]
    # Every path below is a local path or a URI (s3://...), built and read through storage: no URI in a Path.
    root = storage.resolve(args.storage_path)
    remote = storage.is_remote(root)
    final_name = f"{args.study_name}-final"
    final_path = storage.join(root, final_name)
    report_uri, report_local = storage.report_dirs(args.storage_path, args.study_name)
    best_path = storage.join(report_uri, "best_config.json")
    experiments = [storage.join(root, f"{args.study_name}-fold{f}") for f in folds] + [final_path]
    existing, refused = study_cli.existing_experiments(root, experiments, args.resume, f"a study named {args.study_name!r}")
    if refused is not None:
        return refused
    if not remote:
        Path(root).mkdir(parents=True, exist_ok=True)

    # The Optuna studies: --optuna-storage, else a SQLite file that only this driver uses.
    db = None if args.optuna_storage else storage.optuna_db(args.storage_path, args.study_name)
    optuna_url = args.optuna_storage or f"sqlite:///{db}"
    protocol = "nested" if args.search_fold is None else "single-fold"
    best = read_best(best_path) if args.resume else {}
    if best and best.get("protocol") != protocol:
        print(storage.redact(f"error: {best_path} holds a {best.get('protocol')} search, not a {protocol} one; "
                             "resume with the same --search-fold or choose another --study-name"), file=sys.stderr)
        return 2
    db_copy = storage.join(root, f"{args.study_name}-optuna.db")
    if remote and db is not None and args.resume and (existing or best) and not db.exists():
        copy = storage.exists(db_copy)
        print(storage.redact(
            f"error: the Optuna studies of {args.study_name!r} are the SQLite file {db.name} that the driver kept in "
            f"the folder it started in (--storage-path is remote), and there is none in {db.parent}: run --resume "
            f"in that folder, or pass --optuna-storage sqlite:////path/to/{db.name}"
            + (f"; {db_copy} is its copy as of the last finished fold search (complete if every fold's "
               "search had finished)" if copy else "")), file=sys.stderr)
        return 2
    print(storage.redact(f"storage: {root}" + (
        f" (remote): Tune experiments there; the report is built in {report_local} and uploaded to {report_uri}"
        if remote else "")))
    if remote and db is not None:
        print(f"optuna: SQLite file {db}, kept by this driver in the current folder, since an object store "
              f"cannot hold a database: --resume must run in this folder (or pass --optuna-storage "
              f"sqlite:///{db}). A copy goes to {storage.redact(db_copy)} after each fold's search. For a "
              "study any machine can resume, pass --optuna-storage postgresql://...")
    if remote and storage.has_credentials(root):
        print("warning: the storage URI carries credentials; Ray Tune keeps the URI in its experiment files "
              "(tuner.pkl) in storage. Prefer AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the nodes' instance "
              "role; the study's own files and output show it redacted", file=sys.stderr)
    best.update(metric=f"{METRIC}: a trial's best validation Dice on its outer fold's inner validation split",
                protocol=protocol, optuna_storage=study_cli.redact(optuna_url), base=base.to_dict())
    best.setdefault("folds", {})

    t0 = time.time()
    data = load_data(base)  # decoded once here, shared with every trial through the object store
    print(f"data: {base.dataset}, {len(data)} images at {base.image_size}px, {data.n_groups} groups "
          f"({time.time() - t0:.1f}s)")
    mode = study_cli.start_ray(args)
    cpus, gpus = study_cli.resources(args)
    concurrent = study_cli.max_concurrent(args, gpus)
    print(f"ray: {mode}, {args.num_gpus:g} GPUs for the study, {cpus:g} CPU + {gpus:g} GPU per trial, "
          f"at most {concurrent or 'as many as fit'} trials at once")
    print(f"protocol: {protocol} ({'every fold searched on its own training part' if protocol == 'nested' else f'fold {folds[0]} only'}), "
          f"{num_samples} trials per fold, Optuna storage {study_cli.redact(optuna_url)}")

    # One trainable for every fold's search: the fold comes with each trial's config.
    trainable = make_trainable(base, data, cpus_per_trial=cpus, gpus_per_trial=gpus,
                               evaluate_test=False, checkpoint_every=args.checkpoint_every)
    failed = []
    for fold in folds:
        if str(fold) in best["folds"]:
            print(f"search: fold {fold} finished earlier (best validation Dice {best['folds'][str(fold)]['value']:.4f})")
            continue
        try:
            entry = search_fold(args, fold, base, trainable, optuna_url, num_samples, concurrent, args.resume)
        except ValueError as exc:
            print(storage.redact(f"error: {exc}"), file=sys.stderr)
            return 2
        if entry is None:
            failed.append(fold)
            continue
        best["folds"][str(fold)] = entry
        storage.write_json(best_path, best)
        if remote and db is not None:
            storage.upload(db, db_copy)
    if failed:
        print(f"error: no search trial of fold(s) {failed} finished; see the trial errors above "
              "(--resume retries them)", file=sys.stderr)
        return 1
    print(f"best configuration per fold: {storage.redact(best_path)}")

    results_dirs = []
    if args.final_top > 0:
        final_base = base.replace(tag=tuned_tag(args, 0))
        final_trainable = make_trainable(final_base, data, cpus_per_trial=cpus, gpus_per_trial=gpus,
                                         evaluate_test=True, checkpoint_every=args.checkpoint_every)
        # One run per (fold, rank, seed): fold f's own best configurations, tested on fold f only.
        overrides = [dict(top["params"], fold=fold, tag=tuned_tag(args, rank), seed=seed)
                     for fold in folds for rank, top in enumerate(best["folds"][str(fold)]["top"]) for seed in seeds]

        def new_final() -> tune.Tuner:
            return tune.Tuner(
                final_trainable,
                param_space={"overrides": tune.grid_search(overrides)},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrent or None, reuse_actors=True,
                                        trial_dirname_creator=study_cli.trial_dirname),
                run_config=run_config(final_name, args.storage_path, max_failures=args.max_failures,
                                  **study_cli.progress(args)),
            )

        print(f"final: {len(overrides)} runs, each fold's best configuration tested on that fold with "
              f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})")
        final = restore_or_create(final_path, final_trainable, new_final,
                                  args.resume and tune.Tuner.can_restore(final_path)).fit()
        errors = [r.error for r in final if r.error]
        if errors:
            print(storage.redact(f"error: {len(errors)} final runs failed: {errors[0]}"), file=sys.stderr)
            return 1
        results_dirs.append(final_path)

    if results_dirs or args.compare:
        # Remote results are read from storage; a remote report is built locally and uploaded.
        table, uploaded = storage.make_report(
            results_dirs + list(args.compare), report_uri, local_out=report_local, optuna_storage=optuna_url,
            best_config=best_path, study_names=[best["folds"][str(f)]["study_name"] for f in folds])
        print(f"table: {table}" + (f" (uploaded to {storage.redact(uploaded)})" if uploaded else ""))
    else:  # --final-top 0 and nothing to compare: no tested run, so no table
        print("table: none (--final-top 0 and no --compare: no tested runs)")
    print(f"tensorboard --logdir {storage.redact(root)}")
    print(f"done in {time.time() - t0:.0f}s")
    # A failed search trial leaves the study usable but is reported (exit 1), as Tune reports it.
    return 1 if any(best["folds"][str(f)].get("n_errors") for f in folds) else 0


if __name__ == "__main__":
    sys.exit(main())
