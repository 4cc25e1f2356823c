"""``python -m benchmarks`` runs end to end and prints its six ratios as finite numbers.

The values are not checked: timings belong in the benchmark's output, not in a test's verdict.
The run is the hidden ``--smoke`` mode (tiny synthetic data, one repeat); it starts a local Ray
instance, so it runs in its own session, torn down whole by ``ray_fixtures.run_study``.
"""

from __future__ import annotations

import math
import re
import shutil

import pytest

pytest.importorskip("ray.tune")
pytest.importorskip("psutil")

import ray_fixtures as rf  # noqa: E402

RATIOS = {"refresh_vs_naive", "loader_vs_tensors", "epoch_vs_bare_loop", "tune_vs_direct", "tune_whole_vs_direct",
          "memory_4trials_vs_4x1"}
RATIO_LINE = re.compile(r"^RATIO (\S+) (\S+) target <= (\S+)$", re.MULTILINE)


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_run_prints_six_finite_ratios(tmp_path):
    ray_tmp = rf.short_tmpdir("pdbench")
    try:
        rc, out = rf.run_study(["-m", "benchmarks", "--smoke", "--data-dir", "", "--threads", "1"],
                               rf.ray_env(ray_tmp), tmp_path / "bench.log", timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rc == 0, out[-4000:]
    found = {name: (float(value), float(target)) for name, value, target in RATIO_LINE.findall(out)}
    assert set(found) == RATIOS, out[-4000:]
    assert all(math.isfinite(value) and math.isfinite(target) for value, target in found.values()), found
    assert out.count("RATIO ") == len(RATIOS)
    # The loader's feed rate at 224 px on one core, with and without augmentation: no ratio, a rate.
    feed = re.search(r"^LOADER loader_images_per_s_per_core (\d+) \(augmentation on; (\d+) off\)$", out, re.MULTILINE)
    assert feed and all(int(x) > 0 for x in feed.groups()), out[-4000:]
    # tune_whole_vs_direct says where the Tune side's extra time went, in finite seconds.
    breakdown = re.search(r"([-\d.]+) s of each fit\(\) lie outside the trials.*?takes ([-\d.]+) s longer", out)
    assert breakdown and all(math.isfinite(float(x)) for x in breakdown.groups()), out[-4000:]
    assert "Experiment state snapshotting" not in out
