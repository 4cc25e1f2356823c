"""A first study on the embedded synthetic data: the tuned adaptive method against its baselines.

    python studies/demo.py                 # a few minutes on a laptop CPU (``make demo``)
    python studies/demo.py --verbose       # with Ray Tune's full progress tables

On one fold of the synthetic set (nothing to download), it runs

1. the baselines ``dice`` and ``polydice-eps+0.0`` (PolyDice-1 with ε = 0) with
   ``studies/grid_baselines.py``, and the ``dice-select`` run, a Dice-loss replicate with a seed of
   its own whose worst test images are the report's hard set,
2. an Optuna search of the adaptive controller on that fold's training part, scored on its
   validation split, and the best configuration tested on the fold (``studies/tune_adaptive.py
   --search-fold``),
3. the report comparing the three on the same test images,

each run under its own name (``demo-<date>-<time>``), so the demo can be run again and again.
Every method trains once (``--seeds 1``): one fold and one seed make one run pair per comparison,
which shows a difference but cannot test it. A full study searches every outer fold (nested
cross-validation) and trains every method with 3 seeds: see the README.
"""

from __future__ import annotations

import argparse
import sys
import time

import study_cli  # noqa: F401  (puts the checkout on sys.path)

import pandas as pd

import grid_baselines
import storage
import tune_adaptive

# Sized to learn on two CPU cores in a few minutes: 64 px, a slim U-Net, a higher learning rate.
DEMO = ["--image-size", "64", "--base-channels", "8", "--batch-size", "16", "--epochs", "20", "--lr", "3e-3",
        "--mc-samples", "4", "--seeds", "1"]
FOLD = 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage-path", default="results",
                   help="where the results go: a folder or a URI such as s3://bucket/prefix (default: results)")
    p.add_argument("--name", default=None, help="name of this demo's studies (default: demo-<date>-<time>)")
    p.add_argument("--num-samples", type=int, default=4, help="trials of the search (default: 4)")
    p.add_argument("--verbose", action="store_true", help="show Ray Tune's progress tables and the trials' logs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.name or time.strftime("demo-%Y%m%d-%H%M%S")
    common = [*DEMO, "--storage-path", args.storage_path] + (["--verbose"] if args.verbose else [])
    t0 = time.time()
    print(f"demo {name!r}: baselines and the tuned adaptive method on fold {FOLD} of the synthetic set")
    rc = grid_baselines.main([*common, "--methods", "dice", "polydice-eps+0.0", "--fold-list", str(FOLD),
                              "--name", f"{name}-baselines", "--no-report"])
    if rc:
        return rc
    rc = tune_adaptive.main([*common, "--search-fold", str(FOLD), "--num-samples", str(args.num_samples),
                             "--study-name", name, "--compare", storage.join(args.storage_path, f"{name}-baselines")])
    _, report = storage.report_dirs(args.storage_path, name)  # built here, also for remote storage
    if (report / "table.csv").exists():
        table = pd.read_csv(report / "table.csv")
        table = table[~table["oracle"]].sort_values("dice_mean", ascending=False)
        print(f"\nTest Dice on fold {FOLD} ({int(table['n_test'].max())} test images; validation picked the "
              "adaptive configuration and every run's epoch):")
        for row in table.itertuples():
            delta = "" if pd.isna(row.dice_diff_mean) else f"   ΔDice vs adaptive {row.dice_diff_mean:+.4f}"
            print(f"  {row.label:<28} {row.dice_mean:.4f}{delta}")
    optuna_db = storage.optuna_db(args.storage_path, name)
    print(f"\nreport:      {report / 'table.md'} (and its plots)")
    print(f"TensorBoard: tensorboard --logdir {storage.redact(args.storage_path)}")
    print(f"Optuna:      optuna-dashboard sqlite:///{optuna_db}   (pip install '.[dashboard]')")
    print(f"demo done in {time.time() - t0:.0f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
