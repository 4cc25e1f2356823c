"""Tests of polydice.losses against hand-worked values, numpy and MONAI.

References are independent of the code under test: closed forms worked out by hand from thesis
Eq. 1 and Eq. 5–6, a float64 numpy transcription of the equations, MONAI's losses and torch's
cross-entropy. Tensors are tiny so the whole file runs in a couple of seconds on a CPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss as MonaiDiceLoss
from monai.losses import FocalLoss as MonaiFocalLoss

from polydice.config import METHODS, TrainConfig
from polydice.losses import (
    LOSSES,
    PolyDiceLoss,
    SegmentationLoss,
    arccos_squared,
    build_loss,
    ce_dice_loss,
    dice_linear_loss,
    dice_loss,
    dsc_pp_loss,
    focal_loss,
    pm_dice_loss,
    polydice_loss,
)
from polydice.train import build_method_loss


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

RTOL = 1e-5
PI = math.pi


def t64(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Independent references (numpy, float64, no smoothing)
# ---------------------------------------------------------------------------------------------


def np_scale_theta(p: np.ndarray, y: np.ndarray, scale: str = "norm") -> tuple[float, float]:
    """s and θ of thesis Eq. 2 for one image (``scale="inner"``: the thesis's printed s)."""
    p, y = p.ravel().astype(np.float64), y.ravel().astype(np.float64)
    inner = float(p @ y)
    top = np.linalg.norm(p) * np.linalg.norm(y) if scale == "norm" else inner
    s = 2.0 * top / (p @ p + y @ y)
    cos = inner / (np.linalg.norm(p) * np.linalg.norm(y))
    return s, float(np.arccos(np.clip(cos, -1.0, 1.0)))


def np_polydice(p: np.ndarray, y: np.ndarray, eps: float, order: int = 1, scale: str = "norm") -> float:
    """Eq. 5 truncated at ``order`` terms, ε added to α_1 = 1/2 (Eq. 6 for order 1)."""
    s, theta = np_scale_theta(p, y, scale)
    poly = 0.0
    for k in range(1, order + 1):
        alpha = (-1) ** (k - 1) / math.factorial(2 * k)
        if k == 1:
            alpha += eps
        poly += alpha * theta ** (2 * k)
    return (1.0 - s) + s * poly


def np_dice(p: np.ndarray, y: np.ndarray, smooth: float = 0.0) -> float:
    """Eq. 1."""
    p, y = p.ravel().astype(np.float64), y.ravel().astype(np.float64)
    return 1.0 - (2.0 * p @ y + smooth) / (p @ p + y @ y + smooth)


def np_pm_dice(p: np.ndarray, y: np.ndarray, gamma: float, smooth: float = 1e-6, background: bool = True) -> float:
    """PM Dice paper Eq. 5 with m = |y − p|^γ: background and foreground averaged, or foreground only."""
    p, y = p.ravel().astype(np.float64), y.ravel().astype(np.float64)

    def term(p, y):
        m = np.abs(y - p) ** gamma
        return 1.0 - (2.0 * np.sum(m * p * y) + smooth) / (np.sum(m * (p * p + y * y)) + smooth)

    return 0.5 * (term(p, y) + term(1 - p, 1 - y)) if background else term(p, y)


def np_dsc_pp(p: np.ndarray, y: np.ndarray, gamma: float, smooth: float = 1e-6) -> float:
    """DSC++ paper Eq. 9."""
    p, y = p.ravel().astype(np.float64), y.ravel().astype(np.float64)
    tp = np.sum(p * y)
    fp = np.sum((p * (1 - y)) ** gamma)
    fn = np.sum(((1 - p) * y) ** gamma)
    return 1.0 - (2 * tp + smooth) / (2 * tp + fp + fn + smooth)


def random_case(seed: int, batch: int = 3, size: int = 6, lo: float = 0.05, hi: float = 0.95):
    """Interior probabilities and binary masks with at least one positive per image."""
    g = torch.Generator().manual_seed(seed)
    p = lo + (hi - lo) * torch.rand(batch, size, size, generator=g, dtype=torch.float64)
    y = (torch.rand(batch, size, size, generator=g) > 0.5).double()
    y[:, 0, 0] = 1.0
    return p, y



# ---------------------------------------------------------------------------------------------
# PolyDice-1: hand-worked values of Eq. 6
# ---------------------------------------------------------------------------------------------

# (name, probs 2x2, target 2x2, s, θ) worked by hand with the scale of Eq. 2 (the default,
# scale="norm"), s = 2|p||y|/(|p|² + |y|²); INNER_S holds the thesis's printed s = 2<p,y>/(|p|² + |y|²)
# (scale="inner"). The two agree whenever θ = 0:
#   half: <p,y> = 1.5, |p|² = 1.5, |y|² = 2  -> s = 2√3/3.5, inner 3/3.5; cos θ = 1.5/√3 = √3/2, θ = π/6
#   over: <p,y> = 1,   |p|² = 2,   |y|² = 1  -> s = 2√2/3, inner 2/3; cos θ = 1/√2, θ = π/4
#   under: <p,y> = 2,  |p|² = 2,   |y|² = 4  -> s = 2√8/6, inner 2/3; cos θ = 2/√8 = 1/√2, θ = π/4
#   scale: p = y/2:    <p,y> = 2,  |p|² = 1, |y|² = 4 -> s = 4/5 (both), cos θ = 1, θ = 0
#   disjoint: <p,y> = 0, |p|² = |y|² = 1 -> s = 1, inner 0; θ = π/2
#   mixed: <p,y> = 1,  |p|² = 2,   |y|² = 3  -> s = 2√6/5, inner 2/5; cos θ = 1/√6
HAND = [
    ("half", [[1.0, 0.5], [0.5, 0.0]], [[1, 1], [0, 0]], 2 * math.sqrt(3) / 3.5, PI / 6),
    ("over", [[1.0, 1.0], [0.0, 0.0]], [[1, 0], [0, 0]], 2 * math.sqrt(2) / 3, PI / 4),
    ("under", [[1.0, 1.0], [0.0, 0.0]], [[1, 1], [1, 1]], 2 * math.sqrt(8) / 6, PI / 4),
    ("scale", [[0.5, 0.5], [0.5, 0.5]], [[1, 1], [1, 1]], 4 / 5, 0.0),
    ("disjoint", [[0.0, 1.0], [0.0, 0.0]], [[1, 0], [0, 0]], 1.0, PI / 2),
    ("mixed", [[1.0, 0.0], [0.0, 1.0]], [[1, 1], [1, 0]], 2 * math.sqrt(6) / 5, math.acos(1 / math.sqrt(6))),
]
INNER_S = {"half": 6 / 7, "over": 2 / 3, "under": 2 / 3, "scale": 4 / 5, "disjoint": 0.0, "mixed": 2 / 5}
EPS_VALUES = [0.0, 0.3, -0.2, 1.0]


@pytest.mark.parametrize("eps", EPS_VALUES)
@pytest.mark.parametrize("name,p,y,s,theta", HAND, ids=[c[0] for c in HAND])
def test_polydice1_hand_values_exact(name, p, y, s, theta, eps):
    expected = (1 - s) + s * (0.5 + eps) * theta**2  # Eq. 6
    got = polydice_loss(t64([p]), t64([y]), eps, order=1, smooth=0.0)
    assert got.shape == (1,)
    np.testing.assert_allclose(got.numpy(), [expected], rtol=1e-10, atol=1e-12)
    s_inner = INNER_S[name]
    expected_inner = (1 - s_inner) + s_inner * (0.5 + eps) * theta**2
    got_inner = polydice_loss(t64([p]), t64([y]), eps, order=1, smooth=0.0, scale="inner")
    np.testing.assert_allclose(got_inner.numpy(), [expected_inner], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eps", EPS_VALUES)
@pytest.mark.parametrize("name,p,y,s,theta", HAND, ids=[c[0] for c in HAND])
def test_polydice1_hand_values_default_smoothing_float32(name, p, y, s, theta, eps):
    """The smoothing constant 1e-6 must not move O(1) losses beyond rtol = 1e-5."""
    expected = (1 - s) + s * (0.5 + eps) * theta**2
    got = polydice_loss(torch.tensor([p]), torch.tensor([y], dtype=torch.float32), eps)
    np.testing.assert_allclose(got.numpy(), [expected], rtol=RTOL, atol=1e-6)


def test_polydice1_hand_values_batched_4d():
    """All hand cases in one (B, 1, H, W) batch with a per-image ε vector."""
    eps = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    p = t64([c[1] for c in HAND])[:, None]
    y = t64([c[2] for c in HAND])[:, None]
    expected = [(1 - s) + s * (0.5 + e) * th**2 for (_, _, _, s, th), e in zip(HAND, eps.tolist())]
    got = polydice_loss(p, y, eps, smooth=0.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.0, 0.25, -0.3])
@pytest.mark.parametrize("scale", ["norm", "inner"])
def test_polydice1_matches_numpy_eq6_random(seed, eps, scale):
    p, y = random_case(seed)
    expected = [np_polydice(p[i].numpy(), y[i].numpy(), eps, scale=scale) for i in range(len(p))]
    np.testing.assert_allclose(polydice_loss(p, y, eps, smooth=0.0, scale=scale).numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(polydice_loss(p, y, eps, scale=scale).numpy(), expected, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# PolyDice-K
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("eps", [0.0, 0.4, -0.25])
@pytest.mark.parametrize("seed", [0, 5])
def test_polydice_order_k_matches_truncated_eq5(order, eps, seed):
    p, y = random_case(seed, lo=0.0, hi=1.0)
    expected = [np_polydice(p[i].numpy(), y[i].numpy(), eps, order) for i in range(len(p))]
    np.testing.assert_allclose(polydice_loss(p, y, eps, order=order, smooth=0.0).numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("name,p,y,s,theta", HAND[:3], ids=[c[0] for c in HAND[:3]])
def test_polydice2_hand_values(name, p, y, s, theta):
    eps = 0.2
    expected = (1 - s) + s * ((0.5 + eps) * theta**2 - theta**4 / 24)
    got = polydice_loss(t64([p]), t64([y]), eps, order=2, smooth=0.0)
    np.testing.assert_allclose(got.numpy(), [expected], rtol=1e-10)


def test_polydice_high_order_converges_to_dice():
    """Thesis Eq. 2–5: Dice loss = 1 − s·cos θ and Σ_k α_k θ^{2k} = 1 − cos θ, so at ε = 0 PolyDice-K
    tends to the Dice loss of Eq. 1 as K grows (K = 8: Taylor remainder < θ^18/18! ≈ 1e-16).

    This pins the decomposition itself: it holds only with the scale s = 2|p||y|/(|p|² + |y|²).
    With s = 2<p,y>/(|p|² + |y|²) (itself the Dice coefficient, ``scale="inner"``) the limit is
    1 − Dice·cos θ instead, which is not the Dice loss.
    """
    p, y = random_case(3)
    dice = np.array([np_dice(p[i].numpy(), y[i].numpy()) for i in range(len(p))])
    np.testing.assert_allclose(polydice_loss(p, y, 0.0, order=8, smooth=0.0).numpy(), dice, rtol=1e-10)
    errors = [abs(polydice_loss(p, y, 0.0, order=k, smooth=0.0).numpy() - dice).max() for k in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6

    inner = polydice_loss(p, y, 0.0, order=8, smooth=0.0, scale="inner").numpy()
    cos = np.array([np.cos(np_scale_theta(p[i].numpy(), y[i].numpy())[1]) for i in range(len(p))])
    np.testing.assert_allclose(inner, 1 - (1 - dice) * cos, rtol=1e-10)
    assert np.all(np.abs(inner - dice) > 1e-2)


@pytest.mark.parametrize("order", [0, -1, 1.5])
def test_polydice_invalid_order(order):
    p, y = random_case(0)
    with pytest.raises(ValueError, match="order"):
        polydice_loss(p, y, 0.0, order=order)
    with pytest.raises(ValueError, match="order"):
        build_loss("polydice", order=order)


# ---------------------------------------------------------------------------------------------
# arccos² near cos = 1 (series branch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x", [0.0, 1e-8, 1e-6, 5e-5, 9.99e-5, 1.01e-4, 1e-3, 0.5, 1.0, 2.0])
def test_arccos_squared_matches_arcsin_form_float64(x):
    """θ² for cos = 1 − x in float64, against θ = 2·arcsin(√(x/2)) (well conditioned near x = 0).

    The series arccos(1 − x)² = 2x + x²/3 + 4x³/45 + O(x⁴) is used below x = 1e-4; a wrong x³
    coefficient shows up as a relative error of ~4e-10 just below the switch.
    """
    cos = torch.tensor([1.0 - x], dtype=torch.float64)
    x_eff = 1.0 - cos.item()  # exact (Sterbenz), the x the function sees
    expected = (2.0 * math.asin(math.sqrt(x_eff / 2.0))) ** 2
    np.testing.assert_allclose(arccos_squared(cos).numpy(), [expected], rtol=1e-12, atol=1e-300)


def test_arccos_squared_gradient_finite_at_one():
    cos = torch.tensor([1.0, 1.0 - 1e-7, 1.0 - 1e-3], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(arccos_squared(cos).sum(), cos)
    assert torch.isfinite(g).all()
    # dθ²/dcos = −2θ/sin θ → −2 as θ → 0
    np.testing.assert_allclose(g[:2].numpy(), [-2.0, -2.0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Per-image reduction and ε handling
# ---------------------------------------------------------------------------------------------


def batch_with_empties():
    """Four images: random, empty target with non-empty prediction, both empty, perfect."""
    g = torch.Generator().manual_seed(7)
    p = torch.rand(4, 5, 5, generator=g)
    y = (torch.rand(4, 5, 5, generator=g) > 0.5).float()
    y[1] = 0.0
    p[2] = 0.0
    y[2] = 0.0
    p[3] = y[3]
    logits = torch.randn(4, 2, 5, 5, generator=g) * 3
    return p, y, logits


PROB_LOSSES = {
    "polydice1": lambda p, y, e: polydice_loss(p, y, e),
    "polydice2": lambda p, y, e: polydice_loss(p, y, e, order=2),
    "polydice1_inner": lambda p, y, e: polydice_loss(p, y, e, scale="inner"),
    "polydice2_inner": lambda p, y, e: polydice_loss(p, y, e, order=2, scale="inner"),
    "dice": lambda p, y, e: dice_loss(p, y),
    "pm_dice": lambda p, y, e: pm_dice_loss(p, y, 1.0),
    "pm_dice_foreground": lambda p, y, e: pm_dice_loss(p, y, 1.0, include_background=False),
    "dsc_pp": lambda p, y, e: dsc_pp_loss(p, y, 2.0),
    "dice_linear": lambda p, y, e: dice_linear_loss(p, y),
}


@pytest.mark.parametrize("name", list(PROB_LOSSES))
def test_batch_equals_per_image_loop(name):
    fn = PROB_LOSSES[name]
    p, y, _ = batch_with_empties()
    eps = torch.tensor([0.0, 0.5, -0.3, 0.2])
    batched = fn(p, y, eps)
    assert batched.shape == (4,)
    looped = torch.cat([fn(p[i : i + 1], y[i : i + 1], eps[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [focal_loss, ce_dice_loss], ids=["focal", "ce_dice"])
def test_logit_losses_batch_equals_per_image_loop(fn):
    _, y, logits = batch_with_empties()
    batched = fn(logits, y)
    assert batched.shape == (4,)
    looped = torch.cat([fn(logits[i : i + 1], y[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("eps", [0.0, 0.37, -0.3])
def test_constant_eps_vector_equals_scalar(order, eps):
    p, y, _ = batch_with_empties()
    scalar = polydice_loss(p, y, eps, order=order)
    torch.testing.assert_close(polydice_loss(p, y, torch.full((4,), eps), order=order), scalar)
    torch.testing.assert_close(polydice_loss(p, y, torch.tensor(eps), order=order), scalar)


def test_eps_vector_is_applied_per_image():
    p, y, _ = batch_with_empties()
    eps = torch.tensor([0.5, 0.0, 0.0, 0.0])
    got = polydice_loss(p, y, eps)
    torch.testing.assert_close(got[0], polydice_loss(p[:1], y[:1], 0.5)[0])
    torch.testing.assert_close(got[1:], polydice_loss(p[1:], y[1:], 0.0))


@pytest.mark.parametrize("shape", [(5,), (3,), (1,), (4, 1), (1, 4), (2, 2)])
def test_eps_wrong_shape_raises(shape):
    p, y, _ = batch_with_empties()
    with pytest.raises(ValueError, match="eps"):
        polydice_loss(p, y, torch.zeros(shape))


# ---------------------------------------------------------------------------------------------
# Degenerate inputs: finite loss and gradient
# ---------------------------------------------------------------------------------------------

_MASK = torch.zeros(6, 6)
_MASK[1:4, 2:5] = 1.0
_PRED_ON_EMPTY = torch.full((6, 6), 0.3)

# (case, probs, target, expected loss)
DEGENERATE = [
    ("perfect", _MASK.clone(), _MASK.clone(), 0.0),
    ("all_zero_prediction", torch.zeros(6, 6), _MASK.clone(), 1.0),
    ("empty_mask_empty_prediction", torch.zeros(6, 6), torch.zeros(6, 6), 0.0),
    ("empty_mask_nonempty_prediction", _PRED_ON_EMPTY.clone(), torch.zeros(6, 6), 1.0),
]


@pytest.mark.parametrize("loss_name", list(PROB_LOSSES))
@pytest.mark.parametrize("case,p,y,expected", DEGENERATE, ids=[c[0] for c in DEGENERATE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_inputs_finite_loss_and_gradient(loss_name, case, p, y, expected, dtype):
    fn = PROB_LOSSES[loss_name]
    p = p[None].to(dtype).requires_grad_(True)
    loss = fn(p, y[None].to(dtype), 0.3)
    assert torch.isfinite(loss).all(), loss
    (grad,) = torch.autograd.grad(loss.sum(), p)
    assert torch.isfinite(grad).all(), grad
    if loss_name == "pm_dice" and case == "empty_mask_nonempty_prediction":
        # The background term (1 − p = 0.7 against 1 − y = 1, m = 0.3) is not a total miss.
        expected = 0.5 * (expected + 1 - 2 * 0.3 * 0.7 / (0.3 * (0.49 + 1)))
    np.testing.assert_allclose(loss.detach().double().numpy(), [expected], atol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_modules_finite_gradient_on_saturated_logits(name):
    """Logits of ±30 give probabilities exactly 0/1 in float32: perfect and empty cases."""
    y = torch.zeros(3, 6, 6)
    y[0] = _MASK
    y[2] = _MASK
    sign = torch.stack([_MASK * 2 - 1, -torch.ones(6, 6), -torch.ones(6, 6)])  # perfect, both empty, all-zero
    logits = torch.stack([-30 * sign, 30 * sign], dim=1).requires_grad_(True)
    loss = build_loss(name)(logits, y, eps=torch.tensor([0.2, 0.4, 0.1]))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["norm", "inner"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("eps", [0.0, 0.3, -0.2])
def test_gradcheck_polydice(order, eps, scale):
    """Autograd against finite differences, for both readings of s."""
    p, y = random_case(11, batch=2, size=4)
    eps_t = torch.full((2,), eps, dtype=torch.float64, requires_grad=True)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, e: polydice_loss(a, y, e, order=order, scale=scale), (p, eps_t))


@pytest.mark.parametrize("scale", ["norm", "inner"])
def test_gradcheck_polydice_smoothed_near_empty_prediction(scale):
    """|p| = 0 is where |p||y| has no derivative: the smoothed form must be differentiable there."""
    y = torch.zeros(2, 4, 4, dtype=torch.float64)
    y[:, :2] = 1.0
    p = torch.full((2, 4, 4), 1e-4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: polydice_loss(a, y, 0.3, scale=scale), (p,))


def test_unknown_scale_is_rejected():
    p, y = random_case(0)
    with pytest.raises(ValueError, match="scale"):
        polydice_loss(p, y, 0.0, scale="dice")
    with pytest.raises(ValueError, match="scale"):
        build_loss("polydice", scale="dice")


@pytest.mark.parametrize("order", [1, 2])
def test_gradcheck_polydice_near_perfect_series_branch(order):
    """1 − cos θ ≈ 5e-7 < 1e-4: the gradient runs through the Taylor series of arccos²."""
    y = torch.zeros(2, 4, 4, dtype=torch.float64)
    y[:, :2] = 1.0
    p = (y * 0.999 + (1 - y) * 0.001).requires_grad_(True)
    s, theta = np_scale_theta(p[0].detach().numpy(), y[0].numpy())
    assert 1 - math.cos(theta) < 1e-5
    assert torch.autograd.gradcheck(lambda a: polydice_loss(a, y, 0.3, order=order), (p,))


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, y: dice_loss(p, y),
        lambda p, y: pm_dice_loss(p, y, gamma=0.0),
        lambda p, y: dsc_pp_loss(p, y, gamma=1.0),
        lambda p, y: dsc_pp_loss(p, y, gamma=2.0),
        lambda p, y: dice_linear_loss(p, y),
    ],
    ids=["dice", "pm_dice_gamma0", "dsc_pp_gamma1", "dsc_pp_gamma2", "dice_linear"],
)
def test_gradcheck_dice_family(fn):
    p, y = random_case(13, batch=2, size=4)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: fn(a, y), (p,))


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_pm_dice_gradient_treats_modulating_term_as_constant(gamma):
    """m = |y − p̂|^γ is detached (PM Dice paper): the gradient is that of the loss with m frozen.

    A plain gradcheck must therefore fail for γ > 0 (the numerical derivative moves m too); the
    analytic gradient is compared with central differences of the numpy formula with m fixed.
    """
    p, y = random_case(17, batch=1, size=4)
    p.requires_grad_(True)
    (grad,) = torch.autograd.grad(pm_dice_loss(p, y, gamma, include_background=False).sum(), p)

    p0, y0 = p.detach().numpy()[0], y.numpy()[0]
    m = np.abs(y0 - p0) ** gamma

    def frozen(a):
        return 1.0 - (2.0 * np.sum(m * a * y0) + 1e-6) / (np.sum(m * (a * a + y0 * y0)) + 1e-6)

    h = 1e-6
    numeric = np.zeros_like(p0)
    for idx in np.ndindex(p0.shape):
        up, dn = p0.copy(), p0.copy()
        up[idx] += h
        dn[idx] -= h
        numeric[idx] = (frozen(up) - frozen(dn)) / (2 * h)
    np.testing.assert_allclose(grad.numpy()[0], numeric, rtol=1e-6, atol=1e-8)

    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(lambda a: pm_dice_loss(a, y, gamma, include_background=False), (p,))


# ---------------------------------------------------------------------------------------------
# PolyDice-1 vs Dice, and the effect of ε
# ---------------------------------------------------------------------------------------------


def test_polydice1_eps0_close_to_dice_only_for_small_theta():
    """Eq. 6 at ε = 0 is the Taylor truncation of Dice = 1 − s·cos θ (Eq. 2–4): 1 − cos θ is replaced
    by θ²/2, so the gap to the Dice loss is s(θ²/2 − 1 + cos θ) ≈ sθ⁴/24 with the scale of Eq. 2,
    s = 2|p||y|/(|p|² + |y|²) — negligible for a near-perfect prediction, visible for a poor one
    (STYLE point 9: a Taylor truncation, not an identity).
    """
    y = torch.zeros(2, 8, 8, dtype=torch.float64)
    y[:, 2:6, 2:6] = 1.0
    near = y * 0.97 + (1 - y) * 0.02  # near-perfect: θ ≈ 0.036
    poor = torch.zeros_like(y)
    poor[:, 4:8, 4:8] = 1.0  # quarter overlap: cos θ = 1/4
    for p, small in [(near, True), (poor, False)]:
        gap = polydice_loss(p, y, 0.0, smooth=0.0).numpy() - dice_loss(p, y, smooth=0.0).numpy()
        a, b = p[0].numpy().ravel(), y[0].numpy().ravel()
        theta = math.acos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        s_eq2 = 2 * np.linalg.norm(a) * np.linalg.norm(b) / (a @ a + b @ b)
        np.testing.assert_allclose(gap, s_eq2 * (theta**2 / 2 - 1 + math.cos(theta)), rtol=1e-6, atol=1e-15)
        if small:
            assert theta < 0.05 and np.all(np.abs(gap) < 1e-6)
        else:
            assert np.all(np.abs(gap) > 1e-3)


def test_polydice1_eps0_loose_closeness_to_dice():
    """Weaker form of the above that holds for either reading of s: the gap vanishes as θ → 0."""
    y = torch.zeros(1, 8, 8, dtype=torch.float64)
    y[:, 2:6, 2:6] = 1.0
    gaps = []
    for a in (0.9, 0.99, 0.999):
        p = y * a + (1 - y) * (1 - a)
        gaps.append(abs(polydice_loss(p, y, 0.0, smooth=0.0).item() - dice_loss(p, y, smooth=0.0).item()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4


def test_larger_eps_gives_larger_loss_when_theta_positive():
    p, y = random_case(21, batch=2)
    eps = [-0.3, -0.1, 0.0, 0.2, 0.5]
    losses = np.stack([polydice_loss(p, y, e).numpy() for e in eps])  # E, B
    assert np.all(np.diff(losses, axis=0) > 0)


def test_eps_has_no_effect_when_theta_is_zero():
    """A prediction parallel to the target (p = y/2) has θ = 0: only the scale term remains."""
    y = torch.zeros(1, 4, 4, dtype=torch.float64)
    y[0, :2] = 1.0
    losses = [polydice_loss(y / 2, y, e, smooth=0.0).item() for e in (-0.3, 0.0, 0.5)]
    np.testing.assert_allclose(losses, [1 - 4 / 5] * 3, rtol=1e-12)  # <p,y> = 4, |p|² = 2, |y|² = 8


def _good_bad():
    y = torch.zeros(2, 12, 12)
    y[:, 3:9, 3:9] = 1.0
    good = y * 0.9 + 0.05
    bad = torch.roll(y, shifts=(3, 3), dims=(1, 2)) * 0.7 + 0.1
    return good, bad, y


@pytest.mark.parametrize("name", list(PROB_LOSSES))
def test_good_prediction_has_lower_loss_than_bad(name):
    good, bad, y = _good_bad()
    fn = PROB_LOSSES[name]
    assert torch.all(fn(good, y, 0.3) < fn(bad, y, 0.3))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_good_logits_have_lower_loss_than_bad(name):
    good, bad, y = _good_bad()

    def to_logits(p):
        return torch.stack([torch.zeros_like(p), torch.logit(p)], dim=1)

    loss = build_loss(name)
    assert torch.all(loss(to_logits(good), y) < loss(to_logits(bad), y))


# ---------------------------------------------------------------------------------------------
# Cross-checks against MONAI and torch
# ---------------------------------------------------------------------------------------------


def _monai_per_image(loss: torch.Tensor) -> torch.Tensor:
    # reduction='none' keeps (B, C, 1, 1): one value per image and channel; C = 1 here.
    assert loss.shape[1] == 1
    return loss.reshape(loss.shape[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_dice_matches_monai_squared_pred(seed):
    p, y = random_case(seed, batch=4, lo=0.0, hi=1.0)
    y[3] = 0.0  # an empty target
    monai = MonaiDiceLoss(
        squared_pred=True, reduction="none", smooth_nr=1e-6, smooth_dr=1e-6, include_background=True
    )
    expected = _monai_per_image(monai(p[:, None], y[:, None]))
    torch.testing.assert_close(dice_loss(p, y), expected, rtol=RTOL, atol=1e-8)
    np.testing.assert_allclose(
        dice_loss(p, y).numpy()[:3], [np_dice(p[i].numpy(), y[i].numpy(), 1e-6) for i in range(3)], rtol=RTOL
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_dsc_pp_gamma1_matches_monai_linear_dice(seed):
    p, y = random_case(seed, batch=4, lo=0.0, hi=1.0)
    y[3] = 0.0
    monai = MonaiDiceLoss(
        squared_pred=False, reduction="none", smooth_nr=1e-6, smooth_dr=1e-6, include_background=True
    )
    expected = _monai_per_image(monai(p[:, None], y[:, None]))
    torch.testing.assert_close(dsc_pp_loss(p, y, gamma=1.0), expected, rtol=RTOL, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_dice_linear_matches_monai_linear_dice(seed):
    p, y = random_case(seed, batch=4, lo=0.0, hi=1.0)
    y[3] = 0.0
    monai = MonaiDiceLoss(
        squared_pred=False, reduction="none", smooth_nr=1e-6, smooth_dr=1e-6, include_background=True
    )
    expected = _monai_per_image(monai(p[:, None], y[:, None]))
    torch.testing.assert_close(dice_linear_loss(p, y), expected, rtol=RTOL, atol=1e-8)


def test_dice_linear_hand_value():
    # p = [1, 0.5, 0.5, 0], y = [1, 1, 0, 0]: Σpy = 1.5, Σp = 2, Σy = 2 -> L = 1 − 3/4.
    # The squared denominator of Eq. 1 has Σp² = 1.5 instead -> 1 − 3/3.5 = 1/7.
    p = t64([[[1.0, 0.5], [0.5, 0.0]]])
    y = t64([[[1.0, 1.0], [0.0, 0.0]]])
    np.testing.assert_allclose(dice_linear_loss(p, y, smooth=0.0).numpy(), [0.25], rtol=1e-12)
    np.testing.assert_allclose(dice_loss(p, y, smooth=0.0).numpy(), [1 / 7], rtol=1e-12)


@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
def test_dice_linear_equals_dsc_pp_gamma1(soft):
    """2TP + Σp(1 − y) + Σ(1 − p)y = Σp + Σy for any target, soft ones included."""
    p, y = random_case(6, batch=4, lo=0.0, hi=1.0)
    y[3] = 0.0
    if soft:
        y = torch.rand(y.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(dice_linear_loss(p, y), dsc_pp_loss(p, y, gamma=1.0), rtol=1e-12, atol=1e-14)


def _binary_masks_and_probs(seed: int, batch: int = 6, size: int = 8):
    """Random probabilities in [0, 1] (some exactly 0 or 1) and binary masks, one empty, one full."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(batch, size, size, generator=g, dtype=torch.float64)
    p[0, 0, :2] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y = (torch.rand(batch, size, size, generator=g) > 0.5).double()
    y[1] = 0.0
    y[2] = 1.0
    return p, y


def _loss_and_grad(fn, p: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = p.clone().requires_grad_(True)
    loss = fn(p, y)
    (grad,) = torch.autograd.grad(loss.sum(), p)  # images are independent: each gets its own gradient
    return loss.detach(), grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dsc_pp_gamma2_is_dice_on_binary_masks(seed):
    """For y ∈ {0, 1}: 2TP + Σ(p(1 − y))² + Σ((1 − p)y)² = Σp² + Σy², so DSC++ (γ = 2) is Eq. 1,
    loss and gradient, up to rounding."""
    p, y = _binary_masks_and_probs(seed)
    loss_pp, grad_pp = _loss_and_grad(lambda a, b: dsc_pp_loss(a, b, gamma=2.0), p, y)
    loss_dice, grad_dice = _loss_and_grad(dice_loss, p, y)
    torch.testing.assert_close(loss_pp, loss_dice, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_pp, grad_dice, rtol=1e-12, atol=1e-14)


def test_dsc_pp_gamma2_is_not_dice_on_soft_targets():
    """The denominators differ by 2Σ p·y·(1 − p)(1 − y), zero only where p or y is 0 or 1."""
    g = torch.Generator().manual_seed(3)
    p = 0.05 + 0.9 * torch.rand(4, 6, 6, generator=g, dtype=torch.float64)
    y = 0.05 + 0.9 * torch.rand(4, 6, 6, generator=g, dtype=torch.float64)
    pp, dice = dsc_pp_loss(p, y, gamma=2.0, smooth=0.0), dice_loss(p, y, smooth=0.0)
    num = 2.0 * (p * y).flatten(1).sum(1)
    gap = 2.0 * (p * y * (1 - p) * (1 - y)).flatten(1).sum(1)
    torch.testing.assert_close(pp, 1 - num / (num / (1 - dice) + gap), rtol=1e-12, atol=1e-14)
    assert torch.all((pp - dice).abs() > 1e-2), pp - dice


@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.0])
def test_dsc_pp_matches_numpy_eq9(gamma):
    p, y = random_case(3, batch=3, lo=0.0, hi=1.0)
    expected = [np_dsc_pp(p[i].numpy(), y[i].numpy(), gamma) for i in range(3)]
    np.testing.assert_allclose(dsc_pp_loss(p, y, gamma).numpy(), expected, rtol=RTOL)


def test_pm_dice_gamma0_equals_dice():
    """γ = 0: the foreground term is the Dice loss; the default averages it with the background's."""
    p, y = random_case(4, batch=3, lo=0.0, hi=1.0)
    torch.testing.assert_close(pm_dice_loss(p, y, gamma=0.0, include_background=False), dice_loss(p, y))
    torch.testing.assert_close(pm_dice_loss(p, y, gamma=0.0), 0.5 * (dice_loss(p, y) + dice_loss(1 - p, 1 - y)))


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_pm_dice_matches_numpy_eq5(gamma, background):
    p, y = random_case(5, batch=3, lo=0.0, hi=1.0)
    expected = [np_pm_dice(p[i].numpy(), y[i].numpy(), gamma, background=background) for i in range(3)]
    got = pm_dice_loss(p, y, gamma, include_background=background)
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL)


def test_pm_dice_hand_value():
    # p = [0.5, 1, 0, 0.5], y = [1, 1, 0, 0], γ = 1: m = [0.5, 0, 0, 0.5]
    # num = 2·(0.5·0.5·1) = 0.5, den = 0.5·(0.25 + 1) + 0.5·0.25 = 0.75 -> L = 1 − 2/3
    p = t64([[[0.5, 1.0], [0.0, 0.5]]])
    y = t64([[[1.0, 1.0], [0.0, 0.0]]])
    np.testing.assert_allclose(pm_dice_loss(p, y, 1.0, smooth=0.0, include_background=False).numpy(), [1 / 3],
                               rtol=1e-12)
    # Background: 1 − p = [0.5, 0, 1, 0.5], 1 − y = [0, 0, 1, 1], m = [0.5, 0, 0, 0.5]:
    # num = 2·(0.5·0.5·1) = 0.5, den = 0.5·0.25 + 0.5·(0.25 + 1) = 0.75 -> also 1/3; the mean is 1/3.
    np.testing.assert_allclose(pm_dice_loss(p, y, 1.0, smooth=0.0).numpy(), [1 / 3], rtol=1e-12)
    # An empty mask predicted empty is perfect in both classes.
    zero = torch.zeros_like(p)
    np.testing.assert_allclose(pm_dice_loss(zero, zero, 1.0).numpy(), [0.0], atol=1e-6)


def _logits_and_target(seed: int, batch: int = 3, size: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 2, size, size, generator=g) * 2
    y = (torch.rand(batch, size, size, generator=g) > 0.6).long()
    y[-1] = 0
    return logits, y


@pytest.mark.parametrize("seed", [0, 1])
def test_focal_gamma0_is_pixel_mean_cross_entropy(seed):
    logits, y = _logits_and_target(seed)
    ce = F.cross_entropy(logits, y, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(focal_loss(logits, y, gamma=0.0), ce, rtol=RTOL, atol=1e-7)


def test_focal_hand_value():
    # logits (0, ln 3) -> p_fg = 3/4; target fg: −(1/4)² ln(3/4); target bg: −(3/4)² ln(1/4)
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3), math.log(3)]]]])  # 1, 2, 1, 2
    y = torch.tensor([[[1, 0]]])
    expected = 0.5 * (-(0.25**2) * math.log(0.75) - 0.75**2 * math.log(0.25))
    np.testing.assert_allclose(focal_loss(logits, y, 2.0).numpy(), [expected], rtol=RTOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_focal_gamma2_matches_monai(seed):
    logits, y = _logits_and_target(seed)
    onehot = F.one_hot(y, 2).permute(0, 3, 1, 2).float()  # B, 2, H, W
    ours = focal_loss(logits, y, gamma=2.0)
    # reduction='none' keeps (B, C, H, W): −(1 − p_c)^γ y_c log p_c per class channel. With one-hot
    # targets only the true class is non-zero, so the channel sum is the per-pixel focal loss.
    none = MonaiFocalLoss(use_softmax=True, gamma=2.0, reduction="none")(logits, onehot)
    assert none.shape == (3, 2, 5, 5)
    torch.testing.assert_close(ours, none.sum(1).flatten(1).mean(1), rtol=RTOL, atol=1e-7)
    # reduction='mean' averages over B·C·H·W elements, i.e. also over the C = 2 class channels of
    # which one is zero per pixel: it is the batch mean of ours divided by C.
    mean = MonaiFocalLoss(use_softmax=True, gamma=2.0, reduction="mean")(logits, onehot)
    torch.testing.assert_close(ours.mean() / 2, mean, rtol=RTOL, atol=1e-8)


def test_ce_dice_is_cross_entropy_plus_dice_of_softmax():
    logits, y = _logits_and_target(3)
    ce = F.cross_entropy(logits, y, reduction="none").flatten(1).mean(1)
    p = torch.softmax(logits, 1)[:, 1].double().numpy()
    dice = [np_dice(p[i], y[i].double().numpy(), 1e-6) for i in range(3)]
    np.testing.assert_allclose(ce_dice_loss(logits, y).numpy(), ce.numpy() + np.array(dice), rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# Registry, module interface, shapes
# ---------------------------------------------------------------------------------------------


def test_registry_holds_the_design_losses():
    assert {"polydice", "dice", "focal", "ce_dice", "pm_dice", "dsc_pp", "dice_linear"} <= set(LOSSES)
    assert isinstance(build_loss("dice_linear"), SegmentationLoss)


@pytest.mark.parametrize("method", METHODS)
def test_every_config_method_builds_a_per_image_loss(method):
    """build_method_loss reaches every TrainConfig method (the training command line offers them all)."""
    logits, y = _logits_and_target(8)
    loss = build_method_loss(TrainConfig(method=method))
    assert isinstance(loss, SegmentationLoss)
    assert loss(logits, y).shape == (3,)


def test_build_loss_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_loss("tversky")
    msg = str(info.value)
    assert "tversky" in msg
    for name in LOSSES:
        assert name in msg


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("target_4d", [False, True])
def test_every_module_returns_per_image_losses_with_finite_gradients(name, target_4d):
    logits, y = _logits_and_target(9, batch=3, size=6)
    logits.requires_grad_(True)
    target = y[:, None].float() if target_4d else y.float()
    loss = build_loss(name)(logits, target)
    assert loss.shape == (3,)
    assert torch.isfinite(loss).all()
    (grad,) = torch.autograd.grad(loss.mean(), logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_polydice_module_binds_eps_and_forward_eps_overrides():
    logits, y = _logits_and_target(2)
    p = torch.softmax(logits, 1)[:, 1]
    torch.testing.assert_close(build_loss("polydice", eps=0.2)(logits, y), polydice_loss(p, y, 0.2))
    per_image = torch.tensor([0.0, 0.5, -0.1])
    torch.testing.assert_close(build_loss("polydice", eps=0.2)(logits, y, per_image), polydice_loss(p, y, per_image))
    torch.testing.assert_close(build_loss("polydice", order=2)(logits, y), polydice_loss(p, y, 0.0, order=2))


def test_modules_equal_functions_on_softmax_channel_1():
    logits, y = _logits_and_target(4)
    p = torch.softmax(logits, 1)[:, 1]
    torch.testing.assert_close(build_loss("dice")(logits, y), dice_loss(p, y))
    torch.testing.assert_close(build_loss("pm_dice", gamma=2.0)(logits, y), pm_dice_loss(p, y, 2.0))
    torch.testing.assert_close(build_loss("dsc_pp", gamma=1.5)(logits, y), dsc_pp_loss(p, y, 1.5))
    torch.testing.assert_close(build_loss("dice_linear")(logits, y), dice_linear_loss(p, y))
    torch.testing.assert_close(build_loss("focal", gamma=0.5)(logits, y), focal_loss(logits, y, 0.5))


@pytest.mark.parametrize("name", list(PROB_LOSSES))
def test_prob_losses_accept_b1hw(name):
    fn = PROB_LOSSES[name]
    p, y, _ = batch_with_empties()
    ref = fn(p, y, 0.1)
    torch.testing.assert_close(fn(p[:, None], y[:, None], 0.1), ref)
    torch.testing.assert_close(fn(p[:, None], y, 0.1), ref)
    torch.testing.assert_close(fn(p, y[:, None], 0.1), ref)


@pytest.mark.parametrize("name", list(PROB_LOSSES))
@pytest.mark.parametrize(
    "p_shape,y_shape", [((2, 4, 4), (2, 4, 5)), ((2, 4, 4), (3, 4, 4)), ((2, 1, 4, 4), (2, 1, 5, 4))]
)
def test_prob_losses_shape_mismatch_names_both_shapes(name, p_shape, y_shape):
    with pytest.raises(ValueError) as info:
        PROB_LOSSES[name](torch.rand(p_shape), torch.rand(y_shape), 0.0)
    msg = str(info.value)
    squeeze = lambda s: s[:1] + s[2:] if len(s) == 4 else s  # noqa: E731 - (B, 1, H, W) is reported squeezed
    assert str(squeeze(p_shape)) in msg or str(p_shape) in msg
    assert str(squeeze(y_shape)) in msg or str(y_shape) in msg


def test_prob_losses_reject_multichannel_probs():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\)"):
        dice_loss(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4))


@pytest.mark.parametrize("fn", [focal_loss, ce_dice_loss], ids=["focal", "ce_dice"])
def test_logit_losses_shape_errors(fn):
    with pytest.raises(ValueError) as info:
        fn(torch.randn(2, 2, 4, 4), torch.zeros(2, 4, 5))
    assert "(2, 2, 4, 4)" in str(info.value) and "(2, 4, 5)" in str(info.value)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\)"):
        fn(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4))


# ---------------------------------------------------------------------------------------------
# PolyDiceLoss as a library loss: sigmoid / softmax logits, classes, reductions
# ---------------------------------------------------------------------------------------------

TINY = 1e-10  # smoothing small enough that PolyDice-K and MONAI's Dice meet in the limit


def _multiclass_case(seed: int, batch: int = 3, classes: int = 3, size: int = 6):
    """float64 logits and class indices in which every class occurs in every image."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, size, size, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, classes, (batch, 1, size, size), generator=g)
    y[:, 0, 0, :classes] = torch.arange(classes)
    return logits, y


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_polydice_loss_high_order_matches_monai_dice_sigmoid(reduction):
    """PolyDice-K at ε = 0, scale "norm", K → ∞ is 1 − s·cos θ = the Dice loss (thesis Eq. 2–5)."""
    logits, y = _multiclass_case(30, classes=1)
    y = (torch.rand(y.shape, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    y[:, 0, 0, 0] = 1.0
    ours = PolyDiceLoss(order=12, reduction=reduction, smooth=TINY)(logits, y)
    monai = MonaiDiceLoss(sigmoid=True, squared_pred=True, smooth_nr=TINY, smooth_dr=TINY, reduction=reduction)
    expected = monai(logits, y)
    torch.testing.assert_close(ours, expected.reshape(ours.shape), rtol=RTOL, atol=1e-8)


@pytest.mark.parametrize("onehot_target", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_polydice_loss_high_order_matches_monai_dice_softmax_three_classes(include_background, onehot_target):
    logits, y = _multiclass_case(31, classes=3)
    monai = MonaiDiceLoss(softmax=True, to_onehot_y=True, squared_pred=True, include_background=include_background,
                          smooth_nr=TINY, smooth_dr=TINY, reduction="mean")
    expected = monai(logits, y)
    target = F.one_hot(y[:, 0], 3).permute(0, 3, 1, 2) if onehot_target else y  # B, C, H, W or B, 1, H, W
    loss = PolyDiceLoss(order=12, include_background=include_background, smooth=TINY)
    torch.testing.assert_close(loss(logits, target), expected, rtol=RTOL, atol=1e-8)
    # K = 1 is only a Taylor truncation of it: close, not equal.
    first = PolyDiceLoss(order=1, include_background=include_background, smooth=TINY)(logits, target)
    assert abs(float(first - expected)) > 1e-4


def test_polydice_loss_reductions_reduce_the_per_image_vector():
    logits, y = _multiclass_case(32, batch=4, classes=3)
    eps = torch.tensor([0.0, 0.1, 0.3, -0.2], dtype=torch.float64)
    per_image = PolyDiceLoss(reduction="none")(logits, y, eps)
    assert per_image.shape == (4,)
    torch.testing.assert_close(PolyDiceLoss(reduction="mean")(logits, y, eps), per_image.mean())
    torch.testing.assert_close(PolyDiceLoss(reduction="sum")(logits, y, eps), per_image.sum())
    # "none": each image's mean over its classes, each class term with that image's ε.
    probs = torch.softmax(logits, 1)
    for i in range(4):
        terms = [polydice_loss(probs[i : i + 1, c], (y[i : i + 1, 0] == c).double(), float(eps[i])) for c in range(3)]
        torch.testing.assert_close(per_image[i], torch.cat(terms).mean())


def test_polydice_loss_two_classes_with_background_averages_both_terms():
    logits, y = _logits_and_target(5)
    p = torch.softmax(logits, 1)[:, 1]
    both = PolyDiceLoss(order=2, include_background=True, reduction="none")(logits, y, 0.2)
    expected = 0.5 * (polydice_loss(p, y, 0.2, order=2) + polydice_loss(1 - p, 1 - y, 0.2, order=2))
    torch.testing.assert_close(both, expected)


def test_polydice_loss_single_channel_is_sigmoid_foreground():
    logits, y = _logits_and_target(6)
    one = logits[:, 1:] - logits[:, :1]  # sigmoid(l1 − l0) = softmax channel 1
    for background in (True, False):
        got = PolyDiceLoss(include_background=background, reduction="none")(one, y[:, None].float(), 0.3)
        torch.testing.assert_close(got, polydice_loss(torch.sigmoid(one)[:, 0], y, 0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_registered_polydice_is_the_training_loops_per_image_foreground_loss(dtype):
    """build_loss("polydice", ...) on (B, 2, H, W) logits gives exactly the numbers the training
    loop had before the module was generalised: polydice_loss of softmax channel 1 in float32."""
    logits, y = _logits_and_target(7, batch=4, size=8)
    logits = logits.to(dtype)
    eps = torch.tensor([0.0, 0.5, 0.25, -0.1])
    p = torch.softmax(logits.float(), dim=1)[:, 1]
    for order, scale in [(1, "norm"), (2, "inner"), (3, "norm")]:
        loss = build_loss("polydice", eps=0.1, order=order, scale=scale)
        assert torch.equal(loss(logits, y, eps), polydice_loss(p, y, eps, order, scale=scale))
        assert torch.equal(loss(logits, y.to(torch.uint8)), polydice_loss(p, y, 0.1, order, scale=scale))


def test_polydice_loss_rejects_bad_settings_and_shapes():
    with pytest.raises(ValueError, match="reduction"):
        PolyDiceLoss(reduction="batch")
    with pytest.raises(ValueError, match="scale"):
        PolyDiceLoss(scale="dot")
    with pytest.raises(ValueError, match="order"):
        PolyDiceLoss(order=0)
    loss = PolyDiceLoss()
    with pytest.raises(ValueError) as info:
        loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 2, 4, 4))
    assert "(2, 3, 4, 4)" in str(info.value) and "(2, 2, 4, 4)" in str(info.value)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        loss(torch.randn(2, 3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="eps"):
        loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4), torch.zeros(3))
