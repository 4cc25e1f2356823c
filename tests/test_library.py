"""polydice as a library: the top-level imports, and the README's training-loop block run as shown."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Use the adaptive loss in your own training loop"


def readme_block(heading: str) -> str:
    """The first ```python block of the README section under ``heading``, verbatim."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_top_level_names_are_the_modules_objects():
    from polydice import EpsilonController, PolyDiceLoss, UNet, estimate_uncertainty
    from polydice.losses import PolyDiceLoss as loss_cls
    from polydice.model import UNet as unet_cls
    from polydice.schedule import EpsilonController as controller_cls
    from polydice.uncertainty import estimate_uncertainty as estimate_fn

    assert (PolyDiceLoss, EpsilonController, estimate_uncertainty, UNet) == (loss_cls, controller_cls, estimate_fn,
                                                                             unet_cls)


def test_import_polydice_loads_neither_torch_nor_ray():
    code = (
        "import sys, polydice; "
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules); "
        "from polydice import PolyDiceLoss, EpsilonController, estimate_uncertainty, UNet; "
        "assert 'ray' not in sys.modules; "
        "print(sorted(set(polydice.__all__) - set(dir(polydice))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_unknown_top_level_name_is_an_attribute_error():
    import polydice

    try:
        polydice.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_readme_training_loop_block_runs_as_shown():
    block = readme_block(HEADING)
    assert len(block.splitlines()) <= 30
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on shared cores
    namespace: dict = {"__name__": "readme_block"}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block, "README.md", "exec"), namespace)
    finally:
        torch.set_num_threads(previous)
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"epoch {e}" for e in range(1, 7)]
    controller = namespace["controller"]
    assert controller.last_refresh == 6  # E0 = 2, τ = 2: refreshes before epochs 2, 4, 6
    eps = controller.epsilon
    assert eps.shape == (32,) and bool((eps >= 0).all() and (eps <= 0.5).all()) and float(eps.std()) > 0
    assert torch.isfinite(namespace["loss"])
