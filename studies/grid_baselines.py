"""Grid of the baselines and the fixed-ε oracle candidates, every method on every fold.

    python studies/grid_baselines.py --num-gpus 8 --dataset kvasir --data-dir /data/kvasir-seg
    python studies/grid_baselines.py --smoke

Methods (thesis Sec. 4.1.3 and the comparison papers): Dice, Focal (γ = 2), PolyDice-1 with fixed
ε ∈ {−0.3, −0.2, …, 0.5} (ε = 0 is the "PolyDice ε = 0" baseline; the report picks the oracle among
them on **test** Dice and labels it as an oracle), PM Dice (γ = 1), DSC++ (γ = 2), CE + Dice, and
the adaptive method at the thesis settings (``adaptive-thesis``). Every run is tested; the table
comes from ``studies/report.py``.
"""

from __future__ import annotations

import argparse
import sys
import time

import storage
import study_cli

from ray import tune

from polydice.train import load_data
from polydice.tune import make_trainable, restore_or_create, run_config

FIXED_EPS = [round(-0.3 + 0.1 * i, 1) for i in range(9)]  # -0.3 ... 0.5


# Not in the default grid: PolyDice-1 with the thesis's printed scale s = 2<p,y>/(|p|²+|y|²), the
# ablation of the two readings of s (``--methods polydice-inner-eps+0.0 adaptive-thesis-inner``).
ABLATION = [
    {"method": "polydice", "eps": 0.0, "polydice_scale": "inner", "tag": "polydice-inner-eps+0.0"},
    {"method": "adaptive", "polydice_scale": "inner", "tag": "adaptive-thesis-inner"},
]


def method_specs(methods: list[str] | None = None, scale: str = "norm") -> list[dict]:
    """One TrainConfig override dict per method of the grid, each with its report label.

    ``scale="inner"`` runs every PolyDice method with the printed scale and labels it ``-inner``.
    """
    specs = [
        {"method": "dice", "tag": "dice"},
        {"method": "focal", "tag": "focal"},
        *({"method": "polydice", "eps": eps, "tag": f"polydice-eps{eps:+.1f}"} for eps in FIXED_EPS),
        {"method": "pm_dice", "tag": "pm_dice"},
        {"method": "dsc_pp", "tag": "dsc_pp"},
        {"method": "ce_dice", "tag": "ce_dice"},
        {"method": "adaptive", "tag": "adaptive-thesis"},
    ]
    if scale == "inner":
        specs = [dict(s, tag=f"{s['tag']}-inner") if s["method"] in ("polydice", "adaptive") else s for s in specs]
    if methods:
        every = specs + ABLATION
        unknown = set(methods) - {s["tag"] for s in every} - {s["method"] for s in specs}
        if unknown:
            raise SystemExit(f"error: unknown methods {sorted(unknown)}; valid: {[s['tag'] for s in every]}")
        specs = [s for s in every if s["tag"] in methods or (s in specs and s["method"] in methods)]
    return specs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study_cli.add_common_flags(p)
    p.add_argument("--name", default="baselines", help="name of the Tune experiment (default: baselines)")
    p.add_argument("--methods", nargs="*", default=None,
                   help="subset of the grid by tag or method name; the scale ablation's tags "
                        f"({', '.join(s['tag'] for s in ABLATION)}) only run when named (default: the whole grid)")
    p.add_argument("--fold-list", type=int, nargs="*", default=None, help="subset of folds (default: all)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="extra checkpoints every N epochs (default: 0)")
    p.add_argument("--no-report", action="store_true", help="skip writing the table at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    study_cli.quiet_console(args)
    base = study_cli.base_config(args)
    specs = method_specs(args.methods, args.polydice_scale)
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
    print(f"data: {base.dataset}, {len(data)} images, {data.n_groups} groups; grid: {len(specs)} methods x {len(folds)} folds")
    study_cli.start_ray(args)
    cpus, gpus = study_cli.resources(args)
    concurrent = study_cli.max_concurrent(args, gpus)
    trainable = make_trainable(base, data, cpus_per_trial=cpus, gpus_per_trial=gpus, evaluate_test=True,
                               checkpoint_every=args.checkpoint_every)

    def new_grid() -> tune.Tuner:
        return tune.Tuner(
            trainable,
            param_space={"overrides": tune.grid_search(specs), "fold": tune.grid_search(folds)},
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
