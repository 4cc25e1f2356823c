"""Grid of the baselines and the fixed-ε oracle candidates, every method on every fold and seed.

    python studies/grid_baselines.py --num-gpus 8 --dataset kvasir --data-dir /data/kvasir-seg
    python studies/grid_baselines.py --smoke

Methods (thesis Sec. 4.1.3 and the comparison papers): Dice (Eq. 1, squared denominator), the soft
Dice with a linear denominator (``dice-linear``, the DSC++ paper's contrast), Focal (γ = 2),
PolyDice-1 with fixed ε ∈ {−0.3, −0.2, …, 0.5} (ε = 0 is the "PolyDice ε = 0" baseline; the report
picks the oracle among them on **test** Dice and labels it as an oracle), PM Dice (γ = 1), CE + Dice,
and the adaptive method at the thesis settings (``adaptive-thesis``). DSC++ (γ = 2) runs only when
named (``--methods dsc_pp``): on binary masks it is the Dice loss of Eq. 1, a replicate of ``dice``.

Each method runs on each fold with ``--seeds`` training seeds (``--seed`` + 0, 1, …), so that
training randomness is part of the comparison. Each fold also trains one more Dice-loss run, tagged
``dice-select`` with the seed ``--seed`` + 10000 that no compared run uses: its per-image test Dice
selects the thesis's "cases difficult for conventional methods", on which the report compares every
method, ``dice`` included; it is never a row of the table (``--no-dice-select`` leaves it out).
Every run is tested; the table comes from ``studies/report.py``.
"""

from __future__ import annotations

import argparse
import sys
import time

import storage
import study_cli

from ray import tune

from polydice.config import SELECTION_SEED_OFFSET, SELECTION_TAG
from polydice.train import load_data
from polydice.tune import make_trainable, restore_or_create, run_config

FIXED_EPS = [round(-0.3 + 0.1 * i, 1) for i in range(9)]  # -0.3 ... 0.5


# Not in the default grid, run when named in --methods: DSC++ at γ = 2, which on binary masks is the
# Dice loss of Eq. 1 (a replicate of ``dice``, not another method), and PolyDice-1 with the thesis's
# printed scale s = 2<p,y>/(|p|²+|y|²), the ablation of the two readings of s
# (``--methods polydice-inner-eps+0.0 adaptive-thesis-inner``).
ABLATION = [
    {"method": "polydice", "eps": 0.0, "polydice_scale": "inner", "tag": "polydice-inner-eps+0.0"},
    {"method": "adaptive", "polydice_scale": "inner", "tag": "adaptive-thesis-inner"},
]
NAMED_ONLY = [{"method": "dsc_pp", "tag": "dsc_pp"}, *ABLATION]


def method_specs(methods: list[str] | None = None, scale: str = "norm") -> list[dict]:
    """One TrainConfig override dict per compared method of the grid, each with its report label.

    ``methods`` picks by tag, or by method name among the default grid's methods; the
    :data:`NAMED_ONLY` ones run only when their tag is named. ``dice-select`` is accepted and left
    to :func:`grid_runs`. ``scale="inner"`` runs every PolyDice method with the printed scale and
    labels it ``-inner``.
    """
    specs = [
        {"method": "dice", "tag": "dice"},
        {"method": "dice_linear", "tag": "dice-linear"},
        {"method": "focal", "tag": "focal"},
        *({"method": "polydice", "eps": eps, "tag": f"polydice-eps{eps:+.1f}"} for eps in FIXED_EPS),
        {"method": "pm_dice", "tag": "pm_dice"},
        {"method": "ce_dice", "tag": "ce_dice"},
        {"method": "adaptive", "tag": "adaptive-thesis"},
    ]
    if scale == "inner":
        specs = [dict(s, tag=f"{s['tag']}-inner") if s["method"] in ("polydice", "adaptive") else s for s in specs]
    if methods:
        every = specs + NAMED_ONLY
        unknown = set(methods) - {s["tag"] for s in every} - {s["method"] for s in specs} - {SELECTION_TAG}
        if unknown:
            valid = [s["tag"] for s in every] + [SELECTION_TAG]
            raise SystemExit(f"error: unknown methods {sorted(unknown)}; valid: {valid}")
        specs = [s for s in every if s["tag"] in methods or (s in specs and s["method"] in methods)]
    return specs


def grid_runs(args: argparse.Namespace) -> list[dict]:
    """The TrainConfig overrides of the grid's runs, each trained on every fold: every method of
    ``--methods`` once per seed of ``--seeds``, then the hard-set selection run (method dice, tag
    ``dice-select``, seed ``--seed`` + ``SELECTION_SEED_OFFSET``) unless ``--no-dice-select``.

    The order is fixed by the arguments, so that a resumed grid is the same grid.

    Raises:
        ValueError: ``--seeds`` out of range, or nothing to run.
    """
    seeds = study_cli.replicate_seeds(args)
    runs = [dict(spec, seed=seed) for spec in method_specs(args.methods, args.polydice_scale) for seed in seeds]
    if not args.no_dice_select:
        runs.append({"method": "dice", "tag": SELECTION_TAG, "seed": args.seed + SELECTION_SEED_OFFSET})
    if not runs:
        raise ValueError(f"nothing to run: --methods {SELECTION_TAG} alone with --no-dice-select")
    return runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study_cli.add_common_flags(p, seeds_help=(
        "training replicates: every method trains on every fold once per seed --seed + r, r < N, so that "
        f"training randomness is part of the comparison; the {SELECTION_TAG} run has its own seed, --seed + "
        f"{SELECTION_SEED_OFFSET} (default: 3)"))
    p.add_argument("--name", default="baselines", help="name of the Tune experiment (default: baselines)")
    p.add_argument("--methods", nargs="*", default=None,
                   help="subset of the grid by tag or method name; "
                        f"{', '.join(s['tag'] for s in NAMED_ONLY)} only run when named; "
                        f"'--methods {SELECTION_TAG}' trains the hard-set selection runs alone (default: the whole grid)")
    p.add_argument("--no-dice-select", action="store_true",
                   help=f"leave out the per-fold {SELECTION_TAG} run, the Dice-loss replicate that selects the "
                        "report's hard images; without it the report has no hard set independent of the runs it judges")
    p.add_argument("--fold-list", type=int, nargs="*", default=None, help="subset of folds (default: all)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="extra checkpoints every N epochs (default: 0)")
    p.add_argument("--no-report", action="store_true", help="skip writing the table at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    study_cli.quiet_console(args)
    base = study_cli.base_config(args)
    try:
        runs = grid_runs(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folds = args.fold_list if args.fold_list is not None else list(range(base.folds))
    root = storage.resolve(args.storage_path)  # a local folder or a URI (s3://...)
    exp_path = storage.join(root, args.name)
    _, refused = study_cli.existing_experiments(root, [exp_path], args.resume, f"a grid named {args.name!r}")
    if refused is not None:
        return refused
    report_uri, report_local = storage.report_dirs(args.storage_path, args.name)
    if storage.is_remote(root):
        print(storage.redact(f"storage: {root} (remote): the Tune experiment there; the report is built in "
                             f"{report_local} and uploaded to {report_uri}"))

    t0 = time.time()
    data = load_data(base)
    methods = len({run["tag"] for run in runs} - {SELECTION_TAG})
    selection = "" if args.no_dice_select else f" + {SELECTION_TAG}"
    print(f"data: {base.dataset}, {len(data)} images, {data.n_groups} groups; grid: ({methods} methods x "
          f"{args.seeds} seeds{selection}) x {len(folds)} folds = {len(runs) * len(folds)} runs")
    study_cli.start_ray(args)
    cpus, gpus = study_cli.resources(args)
    concurrent = study_cli.max_concurrent(args, gpus)
    trainable = make_trainable(base, data, cpus_per_trial=cpus, gpus_per_trial=gpus, evaluate_test=True,
                               checkpoint_every=args.checkpoint_every)

    def new_grid() -> tune.Tuner:
        return tune.Tuner(
            trainable,
            param_space={"overrides": tune.grid_search(runs), "fold": tune.grid_search(folds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent or None, reuse_actors=True,
                                        trial_dirname_creator=study_cli.trial_dirname),
            run_config=run_config(args.name, args.storage_path, max_failures=args.max_failures,
                                  **study_cli.progress(args)),
        )

    try:
        results = restore_or_create(exp_path, trainable, new_grid, args.resume).fit()
    except ValueError as exc:
        print(storage.redact(f"error: {exc}"), file=sys.stderr)
        return 2
    print(f"grid: {len(results)} runs, {len(results.errors)} errors, {time.time() - t0:.0f}s")
    if not args.no_report:
        table, uploaded = storage.make_report([exp_path], report_uri, local_out=report_local)
        print(f"table: {table}" + (f" (uploaded to {storage.redact(uploaded)})" if uploaded else ""))
    return 0 if not results.errors else 1


if __name__ == "__main__":
    sys.exit(main())
