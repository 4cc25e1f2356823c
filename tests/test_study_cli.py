"""The study scripts' shared helpers, without starting Ray: flags, labels, trial folder names,
credentials kept out of written files, the grid's method list and the nested search's bookkeeping."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.tune")
pytest.importorskip("optuna")

STUDIES = Path(__file__).resolve().parents[1] / "studies"
if str(STUDIES) not in sys.path:
    sys.path.insert(0, str(STUDIES))

import grid_baselines  # noqa: E402
import study_cli  # noqa: E402
import tune_adaptive  # noqa: E402
from polydice.config import SELECTION_SEED_OFFSET, SELECTION_TAG  # noqa: E402
from search_space import AdaptiveSpace, thesis_point  # noqa: E402


def _trial(config: dict, trial_id: str = "ab12c_00003"):
    return SimpleNamespace(config=config, trial_id=trial_id)


@pytest.mark.parametrize("config,expected", [
    ({"overrides": {"method": "dice", "tag": "dice", "seed": 1}, "fold": 2}, "dice-fold2-seed1-ab12c_00003"),
    ({"overrides": {"k": 2.0, "fold": 0, "tag": "adaptive-tuned", "seed": 0}}, "adaptive-tuned-fold0-seed0-ab12c_00003"),
    ({"overrides": {"method": "dice", "tag": "dice-select", "seed": 10000}, "fold": 3},
     "dice-select-fold3-seed10000-ab12c_00003"),
    ({"k": 2.0, "q": 25.0, "fold": 1}, "search-fold1-ab12c_00003"),  # a search trial trains with --seed
    ({"overrides": {"tag": "polydice-eps+0.2"}, "fold": 4}, "polydice-eps+0.2-fold4-ab12c_00003"),  # saved before --seeds
    ({"overrides": {"tag": "a/b c", "seed": 2}, "fold": 0}, "a_b_c-fold0-seed2-ab12c_00003"),
])
def test_trial_folders_are_named_by_method_fold_and_seed(config, expected):
    assert study_cli.trial_dirname(_trial(config)) == expected


def test_trial_lines_show_the_seed_of_replicates(capsys):
    lines = study_cli.progress(SimpleNamespace(verbose=False), 4)["callbacks"][0]
    replicate = SimpleNamespace(config={"overrides": {"method": "dice", "tag": "dice", "seed": 1}, "fold": 2},
                                last_result={"best_val_dice": 0.5, "best_epoch": 3, "test_dice": 0.25},
                                is_finished=lambda: True)
    search = SimpleNamespace(config={"k": 2.0, "q": 25.0, "fold": 1}, last_result={"best_val_dice": 0.75},
                             is_finished=lambda: False)
    lines.on_trial_complete(0, [replicate, search], replicate)
    lines.on_trial_complete(0, [replicate, search], search)
    assert capsys.readouterr().out.splitlines() == [
        "  [1/4] fold 2 seed 1 dice: val Dice 0.5000 (epoch 3), test Dice 0.2500 done",
        "  [2/4] fold 1 k=2, q=25: val Dice 0.7500 (epoch ?) done",
    ]


def test_controller_params_are_printed_to_three_significant_digits():
    config = {"k": 2.450168594529694, "q": 55.063255646069365, "e0": 2, "tau": 2, "eps_min": -0.045807120396657186,
              "eps_max": 0.6177922870166661, "fold": 0, "epochs": 3}
    assert study_cli.controller_params(config) == "k=2.45, q=55.1, e0=2, tau=2, eps_min=-0.0458, eps_max=0.618"
    assert study_cli.controller_params({"method": "dice"}) == ""


@pytest.mark.parametrize("url,expected", [
    ("postgresql://optuna:s3cret@db.internal:5432/studies", "postgresql://optuna:***@db.internal:5432/studies"),
    ("postgresql+psycopg://u:p%40ss@127.0.0.1/x", "postgresql+psycopg://u:***@127.0.0.1/x"),
    ("sqlite:////tmp/results/adaptive-optuna.db", "sqlite:////tmp/results/adaptive-optuna.db"),
])
def test_storage_urls_are_redacted(url, expected):
    assert study_cli.redact(url) == expected


def test_every_study_flag_has_a_help_text_with_its_default():
    for parser in (tune_adaptive.build_parser(), grid_baselines.build_parser()):
        for action in parser._actions:
            if action.option_strings == ["-h", "--help"] or action.const is True:
                continue  # --help and on/off switches
            assert action.help and "default" in action.help, (action.option_strings, action.help)


def test_tuned_labels():
    def args(fold=None, scale="norm"):
        return SimpleNamespace(search_fold=fold, polydice_scale=scale)

    assert tune_adaptive.tuned_tag(args(), 0) == "adaptive-tuned"
    assert tune_adaptive.tuned_tag(args(), 1) == "adaptive-tuned-2"
    assert tune_adaptive.tuned_tag(args(fold=3), 0) == "adaptive-tuned-fold3"
    assert tune_adaptive.tuned_tag(args(scale="inner"), 0) == "adaptive-tuned-inner"


def test_search_space_carries_the_outer_fold_without_searching_it():
    import optuna

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(thesis_point(30))
    space = AdaptiveSpace(30, constants={"fold": 3})
    for _ in range(3):
        trial = study.ask()
        extra = space(trial)
        assert extra == {"fold": 3}
        assert "fold" not in trial.params and set(trial.params) == {"k", "q", "e0", "tau", "eps_min", "eps_max"}
        assert trial.params["eps_min"] < trial.params["eps_max"]
        study.tell(trial, 0.5)
    assert study.trials[0].params["k"] == 2.0 and study.trials[0].params["q"] == 25.0
    assert AdaptiveSpace(30)(study.ask()) is None


def test_default_grid_has_the_linear_dice_and_not_dsc_pp():
    """DSC++ at γ = 2 is the Dice loss on binary masks: a replicate of dice, run only when named."""
    specs = grid_baselines.method_specs()
    tags = [s["tag"] for s in specs]
    assert "dice-linear" in tags and "adaptive-thesis" in tags and "dice" in tags
    assert "dsc_pp" not in tags and "dsc_pp" not in {s["method"] for s in specs}
    assert {s["tag"]: s["method"] for s in specs}["dice-linear"] == "dice_linear"
    assert grid_baselines.method_specs(["dsc_pp"]) == [{"method": "dsc_pp", "tag": "dsc_pp"}]
    assert [s["tag"] for s in grid_baselines.method_specs(["dice_linear", "dsc_pp"])] == ["dice-linear", "dsc_pp"]
    assert [s["tag"] for s in grid_baselines.method_specs(["dice"])] == ["dice"]  # not dice-select
    assert grid_baselines.method_specs(["dice-select"]) == []  # left to grid_runs


def _grid_args(*argv: str):
    return grid_baselines.build_parser().parse_args(list(argv))


def test_grid_runs_every_method_once_per_seed_and_one_selection_run():
    runs = grid_baselines.grid_runs(_grid_args("--methods", "dice", "focal", "--seeds", "2", "--seed", "5"))
    assert [(r["tag"], r["seed"]) for r in runs] == [
        ("dice", 5), ("dice", 6), ("focal", 5), ("focal", 6), ("dice-select", 10005)]
    assert runs[-1] == {"method": "dice", "tag": SELECTION_TAG, "seed": 5 + SELECTION_SEED_OFFSET}
    # The same arguments give the same grid (a resumed grid is the same grid).
    assert runs == grid_baselines.grid_runs(_grid_args("--methods", "dice", "focal", "--seeds", "2", "--seed", "5"))
    default = grid_baselines.grid_runs(_grid_args())
    assert len(default) == 3 * len(grid_baselines.method_specs()) + 1
    assert [r for r in default if r["tag"] == SELECTION_TAG] == [default[-1]]
    assert len({(r["tag"], r["seed"]) for r in default}) == len(default)


def test_no_dice_select_leaves_the_selection_run_out():
    runs = grid_baselines.grid_runs(_grid_args("--methods", "dice", "--seeds", "2", "--no-dice-select"))
    assert [(r["tag"], r["seed"]) for r in runs] == [("dice", 0), ("dice", 1)]
    alone = grid_baselines.grid_runs(_grid_args("--methods", "dice-select", "--seeds", "2"))
    assert alone == [{"method": "dice", "tag": "dice-select", "seed": SELECTION_SEED_OFFSET}]
    with pytest.raises(ValueError, match="nothing to run"):
        grid_baselines.grid_runs(_grid_args("--methods", "dice-select", "--no-dice-select"))


@pytest.mark.parametrize("script", ["tune_adaptive", "grid_baselines"])
@pytest.mark.parametrize("seeds,message", [
    ("0", "error: --seeds must be at least 1, got 0"),
    (str(SELECTION_SEED_OFFSET), f"error: --seeds must be below {SELECTION_SEED_OFFSET}, got {SELECTION_SEED_OFFSET}"),
])
def test_seeds_out_of_range_is_one_error_line(script, seeds, message, tmp_path, capsys):
    main = tune_adaptive.main if script == "tune_adaptive" else grid_baselines.main
    assert main(["--smoke", "--storage-path", str(tmp_path), "--seeds", seeds]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not list(tmp_path.iterdir())


def test_grid_scale_ablation_runs_only_when_named():
    tags = [s["tag"] for s in grid_baselines.method_specs()]
    assert "polydice-inner-eps+0.0" not in tags and "adaptive-thesis" in tags and len(tags) == 15
    named = grid_baselines.method_specs(["dice", "polydice-inner-eps+0.0", "adaptive-thesis-inner"])
    assert [s["tag"] for s in named] == ["dice", "polydice-inner-eps+0.0", "adaptive-thesis-inner"]
    assert all(s.get("polydice_scale") == "inner" for s in named[1:])
    inner = {s["tag"]: s for s in grid_baselines.method_specs(None, "inner")}
    assert "polydice-eps+0.0-inner" in inner and "dice" in inner and "adaptive-thesis-inner" in inner
    with pytest.raises(SystemExit, match="unknown methods"):
        grid_baselines.method_specs(["dice", "nope"])


def test_base_config_takes_the_scale_and_learning_rate():
    args = tune_adaptive.build_parser().parse_args(["--smoke", "--polydice-scale", "inner", "--lr", "0.003"])
    cfg = study_cli.base_config(args, method="adaptive")
    assert (cfg.polydice_scale, cfg.lr, cfg.epochs, cfg.image_size) == ("inner", 0.003, 3, 32)


def test_resume_refuses_a_best_config_of_another_protocol(tmp_path, capsys):
    report = tmp_path / "adaptive-report"
    report.mkdir()
    (report / "best_config.json").write_text(json.dumps({"protocol": "single-fold", "folds": {}}))
    rc = tune_adaptive.main(["--smoke", "--storage-path", str(tmp_path), "--resume"])
    assert rc == 2
    assert "single-fold search, not a nested one" in capsys.readouterr().err


def test_search_fold_out_of_range_is_one_error_line(tmp_path, capsys):
    rc = tune_adaptive.main(["--smoke", "--storage-path", str(tmp_path), "--search-fold", "5"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --search-fold must be in [0, 5)")


def test_unreadable_best_config_on_resume_names_the_file(tmp_path):
    report = tmp_path / "adaptive-report"
    report.mkdir()
    (report / "best_config.json").write_text("{not json")
    with pytest.raises(SystemExit, match="best_config.json is unreadable"):
        tune_adaptive.main(["--smoke", "--storage-path", str(tmp_path), "--resume"])


@pytest.mark.parametrize("script", ["tune_adaptive", "grid_baselines"])
def test_a_saved_study_of_that_name_is_never_started_over(script, tmp_path, capsys):
    """A Tune experiment saved under the study's name: without --resume, one error line and exit 2,
    before Ray starts or anything is written."""
    experiment = tmp_path / ("adaptive-fold0" if script == "tune_adaptive" else "baselines")
    experiment.mkdir()
    (experiment / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    before = sorted(p.name for p in tmp_path.iterdir())
    main = tune_adaptive.main if script == "tune_adaptive" else grid_baselines.main
    assert main(["--smoke", "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a ") and f"already exists ({experiment})" in err and "--resume" in err, err
    assert "\n" not in err and sorted(p.name for p in tmp_path.iterdir()) == before


def test_logical_gpus_beyond_the_machine_are_said_at_start(monkeypatch, capsys):
    import torch

    import polydice.tune

    monkeypatch.setattr(polydice.tune, "init_ray", lambda *a, **k: "local")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = tune_adaptive.build_parser().parse_args(["--num-gpus", "8"])
    assert study_cli.start_ray(args) == "local"
    assert "note: --num-gpus 8 on a machine with 0 CUDA devices" in capsys.readouterr().out
    args = tune_adaptive.build_parser().parse_args([])
    study_cli.start_ray(args)
    assert args.num_gpus == 0 and "note:" not in capsys.readouterr().out
