"""Tests of polydice.uncertainty: entropy / mutual information (Eq. 8–9), difficulty (Eq. 10–11),
the difficulty → ε mapping (Eq. 12–13) and the MC-Dropout estimators.

References are numpy transcriptions of the equations and hand-worked cases; the fast estimator is
checked against the literal one (T full passes) and against samples drawn independently through
the same seeded dropout stream. The model is a 4-channel U-Net on 32×32 images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polydice.model import UNet, to_input
from polydice.uncertainty import (
    DropoutSampler,
    binary_entropy,
    difficulty_scores,
    epsilon_from_difficulty,
    estimate_uncertainty,
    estimate_uncertainty_naive,
    expected_entropy,
    mc_samples_of,
    mutual_information,
    predictive_entropy,
    predictive_variance,
)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

RTOL = 1e-5

# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def np_entropy(p: np.ndarray) -> np.ndarray:
    """Eq. 9 in nats with 0·log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, -p * np.log(p), 0.0)
        b = np.where(p < 1, -(1 - p) * np.log(1 - p), 0.0)
    return a + b


def np_mutual_information(samples: np.ndarray) -> np.ndarray:
    """Eq. 8: H(mean_t p_t) − mean_t H(p_t), samples (T, B, H, W)."""
    return np_entropy(samples.mean(0)) - np_entropy(samples).mean(0)


def np_difficulty(mi: np.ndarray, mask: np.ndarray) -> float:
    """Eq. 10–11 for one image."""
    vals = mi[mask > 0.5].astype(np.float64)
    if vals.size == 0:
        return 0.0
    mu, sigma = vals.mean(), vals.std()  # population std
    return float(vals[np.abs(vals - mu) <= 2 * sigma].mean())


def np_epsilon(d, q=25, k=2.0, eps_min=0.0, eps_max=0.5, delta=1e-8) -> np.ndarray:
    """Eq. 12–13."""
    d = np.asarray(d, dtype=np.float64)
    norm = (d - np.percentile(d, q)) / (np.std(d) + delta)
    return eps_min + (eps_max - eps_min) / (1.0 + np.exp(-k * norm))


# ---------------------------------------------------------------------------------------------
# Entropy and mutual information
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p,expected",
    [(0.0, 0.0), (1.0, 0.0), (0.5, math.log(2)), (0.25, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_entropy_values(p, expected, dtype):
    got = binary_entropy(torch.tensor([p], dtype=dtype))
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.double().numpy(), [expected], rtol=RTOL, atol=1e-12)


def test_binary_entropy_is_symmetric_and_matches_numpy():
    p = torch.linspace(0, 1, 101, dtype=torch.float64)
    np.testing.assert_allclose(binary_entropy(p).numpy(), np_entropy(p.numpy()), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(binary_entropy(p).numpy(), binary_entropy(1 - p).numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("t", [2, 5, 10])
def test_mutual_information_matches_numpy_eq8(seed, t):
    rng = np.random.default_rng(seed)
    samples = rng.uniform(0, 1, size=(t, 3, 4, 5))
    samples[:, 0, 0, 0] = 0.0  # exercises 0·log 0
    samples[:, 0, 0, 1] = 1.0
    samples[0, 1, 1, 1] = 0.0
    got = mutual_information(torch.from_numpy(samples))
    assert got.shape == (3, 4, 5)
    np.testing.assert_allclose(got.numpy(), np_mutual_information(samples), rtol=1e-10, atol=1e-12)
    assert (got >= 0).all()


def test_mutual_information_hand_value():
    # Two samples 0 and 1 at a pixel: H(1/2) − (H(0) + H(1))/2 = ln 2 (maximal disagreement).
    samples = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    np.testing.assert_allclose(mutual_information(samples).numpy().ravel(), [math.log(2)], rtol=1e-12)


@pytest.mark.parametrize("value", [0.0, 0.3, 0.5, 0.9999, 1.0])
def test_mutual_information_zero_when_samples_identical(value):
    samples = torch.full((7, 2, 3, 3), value, dtype=torch.float64)
    np.testing.assert_allclose(mutual_information(samples).numpy(), 0.0, atol=1e-12)


def test_mutual_information_non_negative_float32():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 4, 16, 16, generator=g)
    samples = (base + 1e-4 * torch.randn(10, 4, 16, 16, generator=g)).clamp(0, 1)  # nearly identical
    assert (mutual_information(samples) >= 0).all()


def test_decomposition_entropy_maps():
    rng = np.random.default_rng(3)
    samples = rng.uniform(0, 1, size=(6, 2, 3, 3))
    s = torch.from_numpy(samples)
    np.testing.assert_allclose(predictive_entropy(s).numpy(), np_entropy(samples.mean(0)), rtol=1e-12)
    np.testing.assert_allclose(expected_entropy(s).numpy(), np_entropy(samples).mean(0), rtol=1e-12)
    np.testing.assert_allclose(predictive_variance(s).numpy(), samples.var(0), rtol=1e-10)


@pytest.mark.parametrize("fn", [mutual_information, predictive_entropy, expected_entropy, predictive_variance])
def test_sample_maps_reject_non_4d(fn):
    with pytest.raises(ValueError, match=r"\(T, B, H, W\)"):
        fn(torch.rand(3, 4, 4))


# ---------------------------------------------------------------------------------------------
# Difficulty (Eq. 10–11)
# ---------------------------------------------------------------------------------------------


def _image(lesion_values, background_value=5.0, size=4):
    """MI map and mask: the first len(lesion_values) pixels (row-major) form the lesion."""
    mi = np.full(size * size, background_value)
    mask = np.zeros(size * size)
    mi[: len(lesion_values)] = lesion_values
    mask[: len(lesion_values)] = 1.0
    return mi.reshape(size, size), mask.reshape(size, size)


# Hand-worked (lesion MI values, expected D). Background pixels carry MI = 5 and must be ignored.
DIFFICULTY_CASES = [
    # nine 0.1 and one 1.0: μ = 1.9/10 = 0.19; deviations −0.09 (×9), 0.81;
    # σ² = (9·0.0081 + 0.6561)/10 = 0.0729, σ = 0.27, 2σ = 0.54 < 0.81 -> 1.0 removed, D = 0.1
    ("high_outlier", [0.1] * 9 + [1.0], 0.1),
    # nine 0.5 and one 0.0: μ = 0.45, σ² = (9·0.0025 + 0.2025)/10 = 0.0225, σ = 0.15, 2σ = 0.3 < 0.45
    ("low_outlier", [0.5] * 9 + [0.0], 0.5),
    # [0.1, 0.2, 0.3, 0.4]: μ = 0.25, σ² = 0.0125, 2σ ≈ 0.2236 > 0.15 -> nothing removed, D = 0.25
    ("no_outlier", [0.1, 0.2, 0.3, 0.4], 0.25),
    # [0, 0, 0, 0, 0.2, 0.9]: μ = 1.1/6; population σ² = 0.648333/6 = 0.108056, 2σ = 0.6574 < 0.7167
    # -> 0.9 removed, D = 0.2/5 = 0.04. (With ddof = 1, 2σ = 0.7202 would keep it: D = μ ≈ 0.1833.)
    ("population_std", [0.0, 0.0, 0.0, 0.0, 0.2, 0.9], 0.04),
    # all equal: σ = 0, every pixel kept, D = 0.3
    ("all_equal", [0.3] * 7, 0.3),
    # a single lesion pixel: D is its value
    ("single_pixel", [0.42], 0.42),
    # no positives: D = 0 whatever the MI
    ("no_positives", [], 0.0),
]


@pytest.mark.parametrize("name,values,expected", DIFFICULTY_CASES, ids=[c[0] for c in DIFFICULTY_CASES])
def test_difficulty_hand_cases(name, values, expected):
    mi, mask = _image(values)
    got = difficulty_scores(torch.from_numpy(mi)[None], torch.from_numpy(mask)[None])
    assert got.shape == (1,)
    np.testing.assert_allclose(got.numpy(), [expected], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np_difficulty(mi, mask), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask_4d", [False, True])
def test_difficulty_batch_of_hand_cases(mask_4d):
    images = [_image(v) for _, v, _ in DIFFICULTY_CASES]
    mi = torch.from_numpy(np.stack([m for m, _ in images]))
    masks = torch.from_numpy(np.stack([k for _, k in images]))
    if mask_4d:
        masks = masks[:, None]
    got = difficulty_scores(mi, masks)
    np.testing.assert_allclose(got.numpy(), [c[2] for c in DIFFICULTY_CASES], rtol=1e-10, atol=1e-12)


def test_difficulty_binarises_masks_at_half():
    # A soft mask value 0.5 is not a positive (mask > 0.5); 0.51 is.
    mi = torch.tensor([[[0.1, 0.9], [0.2, 0.7]]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 0.5], [0.51, 0.0]]], dtype=torch.float64)
    np.testing.assert_allclose(difficulty_scores(mi, mask).numpy(), [0.15], rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_difficulty_matches_numpy_random(seed):
    rng = np.random.default_rng(seed)
    mi = rng.exponential(0.05, size=(4, 12, 12))
    mi[rng.uniform(size=mi.shape) < 0.03] += 1.0  # sparse spikes
    masks = (rng.uniform(size=(4, 12, 12)) < 0.3).astype(np.float64)
    masks[3] = 0.0
    got = difficulty_scores(torch.from_numpy(mi).float(), torch.from_numpy(masks))
    assert got.dtype == torch.float32
    expected = [np_difficulty(mi[i].astype(np.float32), masks[i]) for i in range(4)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL)


def test_difficulty_shape_mismatch():
    with pytest.raises(ValueError):
        difficulty_scores(torch.rand(2, 4, 4), torch.rand(2, 4, 5))
    with pytest.raises(ValueError):
        difficulty_scores(torch.rand(2, 4, 4), torch.rand(3, 4, 4))


# ---------------------------------------------------------------------------------------------
# ε from difficulty (Eq. 12–13)
# ---------------------------------------------------------------------------------------------

SCORES = np.array([0.012, 0.3, 0.05, 0.0, 0.21, 0.08, 0.08, 0.5, 0.033, 0.11, 0.07])


@pytest.mark.parametrize("q", [0, 25, 50, 73.5, 100])
@pytest.mark.parametrize("k", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("eps_range", [(0.0, 0.5), (-0.3, 0.5), (0.1, 0.2)])
def test_epsilon_matches_numpy(q, k, eps_range):
    lo, hi = eps_range
    got = epsilon_from_difficulty(torch.from_numpy(SCORES), q=q, k=k, eps_min=lo, eps_max=hi)
    assert got.shape == SCORES.shape and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np_epsilon(SCORES, q, k, lo, hi), rtol=1e-10)
    assert (got >= lo).all() and (got <= hi).all()


def test_epsilon_hand_values():
    # D = 0..4: D_25 = 1 (linear), σ_D = √2; ε = 0.5·sigmoid(2(D − 1)/√2)
    d = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = [0.5 / (1 + math.exp(-2 * (x - 1) / math.sqrt(2))) for x in range(5)]
    got = epsilon_from_difficulty(d, delta=0.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert got[1].item() == pytest.approx(0.25)  # the image at the q-th percentile sits mid-range


def test_epsilon_defaults_are_thesis_values():
    got = epsilon_from_difficulty(torch.from_numpy(SCORES)).numpy()
    np.testing.assert_allclose(got, np_epsilon(SCORES, 25, 2.0, 0.0, 0.5, 1e-8), rtol=1e-10)


def test_epsilon_float32_in_float32_out():
    got = epsilon_from_difficulty(torch.from_numpy(SCORES).float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_epsilon(SCORES.astype(np.float32)), rtol=RTOL)


def test_epsilon_monotone_in_difficulty():
    order = np.argsort(SCORES, kind="stable")
    eps = epsilon_from_difficulty(torch.from_numpy(SCORES)).numpy()[order]
    assert np.all(np.diff(eps) >= 0)
    assert np.all(np.diff(eps)[np.diff(SCORES[order]) > 0] > 0)


@pytest.mark.parametrize("value", [0.0, 0.37])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("eps_range", [(0.0, 0.5), (-0.3, 0.5)])
def test_epsilon_all_equal_scores_is_mid_range(value, n, eps_range):
    lo, hi = eps_range
    got = epsilon_from_difficulty(torch.full((n,), value, dtype=torch.float64), eps_min=lo, eps_max=hi)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), lo + (hi - lo) / 2, rtol=1e-12)


@pytest.mark.parametrize(
    "scores,kwargs",
    [
        (torch.zeros(0), {}),
        (torch.zeros(2, 3), {}),
        (torch.rand(4), {"q": -1}),
        (torch.rand(4), {"q": 100.5}),
        (torch.tensor([0.1, float("nan")]), {}),
        (torch.tensor([0.1, float("inf")]), {}),
    ],
    ids=["empty", "2d", "q_below_0", "q_above_100", "nan", "inf"],
)
def test_epsilon_invalid_input(scores, kwargs):
    with pytest.raises(ValueError):
        epsilon_from_difficulty(scores, **kwargs)


# ---------------------------------------------------------------------------------------------
# MC-Dropout estimators
# ---------------------------------------------------------------------------------------------

N, SIZE, T = 5, 32, 5


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(N, SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    masks = torch.zeros(N, SIZE, SIZE)
    for i, r in enumerate([4, 8, 3, 10]):  # image 4 has no lesion
        masks[i] = (((yy - 10 - 2 * i) ** 2 + (xx - 16) ** 2) <= r * r).float()
    return images, masks


def _model(dropout: float = 0.5) -> UNet:
    torch.manual_seed(0)
    model = UNet(base_channels=4, dropout=dropout)
    # Populate batch-norm running statistics so that "unchanged" is checked on non-default values.
    model.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, SIZE, SIZE, generator=g))
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return to_input(images.permute(0, 3, 1, 2))


def _row_bytes(model: UNet) -> int:
    """Decoder memory per (sample, image) row as documented in uncertainty._samples_per_chunk."""
    return 8 * model.inc[0].out_channels * SIZE * SIZE * 4


def _stream_samples(model, images, batch_size, seed, t=T):
    """(T, N, H, W) samples drawn independently of the estimators: a fresh DropoutSampler, the
    batches in order, T separate decoder calls per batch (the order the masks are documented in)."""
    sampler = DropoutSampler(model.dropout_rate, seed, "cpu")
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = _as_float(images[start : start + batch_size])
            sampler.batch = x.shape[0]
            feats = model.encode(x)
            out.append(torch.stack([torch.softmax(model.decode(feats, dropout=sampler), 1)[:, 1] for _ in range(t)]))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "batch_size,budget_rows",
    [(N, 10**6), (2, 4), (3, 1), (2, 0), (4, 7)],
    ids=["one_batch", "chunks_of_2", "one_row_chunks", "zero_budget", "uneven"],
)
def test_fast_estimator_equals_naive(model, data, batch_size, budget_rows):
    images, masks = data
    fast = estimate_uncertainty(
        model, images, masks, mc_samples=T, batch_size=batch_size, seed=3,
        memory_budget_bytes=budget_rows * _row_bytes(model), keep_maps=N,
    )
    naive = estimate_uncertainty_naive(model, images, masks, mc_samples=T, batch_size=batch_size, seed=3, keep_maps=N)
    assert fast.difficulty.shape == (N,) and fast.difficulty.dtype == torch.float64
    torch.testing.assert_close(fast.difficulty, naive.difficulty, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast.mean_mi, naive.mean_mi, rtol=1e-4, atol=1e-7)
    assert set(fast.maps) == {"image", "mask", "mean_prob", "mutual_information", "predictive_entropy", "variance"}
    for key in fast.maps:
        torch.testing.assert_close(fast.maps[key], naive.maps[key], rtol=1e-4, atol=1e-6)
    assert fast.difficulty[4] == 0.0  # no lesion
    assert (fast.difficulty[:4] > 0).all()


@pytest.mark.parametrize("budget_rows,batch_size", [(10**6, 2), (4, 2), (1, 5)])
def test_fast_estimator_runs_encoder_once_and_decodes_all_rows(model, data, monkeypatch, budget_rows, batch_size):
    images, masks = data
    calls = {"encode": 0, "prepare": 0, "decode_rows": [], "decode_calls": 0}
    encode, prepare, decode_samples = model.encode, model.prepare_sampling, model.decode_samples

    def counting_encode(x):
        calls["encode"] += 1
        return encode(x)

    def counting_prepare(feats):
        calls["prepare"] += 1
        return prepare(feats)

    def counting_decode(cache, samples, dropout=None):
        calls["decode_calls"] += 1
        calls["decode_rows"].append(samples * cache.bottleneck.shape[0])
        return decode_samples(cache, samples, dropout=dropout)

    def full_decode(*args, **kwargs):
        raise AssertionError("the fast estimator must not run the full decoder")

    monkeypatch.setattr(model, "encode", counting_encode)
    monkeypatch.setattr(model, "prepare_sampling", counting_prepare)
    monkeypatch.setattr(model, "decode_samples", counting_decode)
    monkeypatch.setattr(model, "decode", full_decode)
    estimate_uncertainty(
        model, images, masks, mc_samples=T, batch_size=batch_size, seed=0,
        memory_budget_bytes=budget_rows * _row_bytes(model),
    )
    n_batches = math.ceil(N / batch_size)
    assert calls["encode"] == calls["prepare"] == n_batches
    assert sum(calls["decode_rows"]) == N * T
    assert max(calls["decode_rows"]) <= max(budget_rows, batch_size)  # at least one sample per call
    if budget_rows >= N * T:
        assert calls["decode_calls"] == n_batches  # all T samples of a batch in one decoder call
    else:
        assert calls["decode_calls"] > n_batches


@pytest.mark.parametrize("batch_size", [N, 2])
def test_streamed_maps_equal_mi_of_samples_from_same_stream(model, data, batch_size):
    images, masks = data
    res = estimate_uncertainty(
        model, images, masks, mc_samples=T, batch_size=batch_size, seed=11,
        memory_budget_bytes=3 * _row_bytes(model), keep_maps=N,
    )
    samples = _stream_samples(model, images, batch_size, seed=11).double().numpy()
    mi = np_mutual_information(samples)
    np.testing.assert_allclose(res.maps["mutual_information"].numpy(), mi, atol=2e-6)
    np.testing.assert_allclose(res.maps["mean_prob"].numpy(), samples.mean(0), atol=1e-6)
    np.testing.assert_allclose(res.maps["predictive_entropy"].numpy(), np_entropy(samples.mean(0)), atol=2e-6)
    np.testing.assert_allclose(res.maps["variance"].numpy(), samples.var(0), atol=1e-6)
    np.testing.assert_allclose(res.mean_mi.numpy(), mi.reshape(N, -1).mean(1), atol=1e-6)
    # The 2σ trim is discontinuous: a pixel on its edge may fall either way between the float32
    # map and the float64 reference, so D is checked against Eq. 10-11 on the estimator's own map.
    own = res.maps["mutual_information"].double().numpy()
    expected = [np_difficulty(own[i], masks[i].numpy()) for i in range(N)]
    np.testing.assert_allclose(res.difficulty.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_estimator_difficulty_equals_pipeline_on_mc_samples_of(model, data):
    """With one batch (batch_size ≥ N) the estimator's dropout stream is exactly mc_samples_of's."""
    images, masks = data
    res = estimate_uncertainty(model, images, masks, mc_samples=T, batch_size=N, seed=5)
    samples = mc_samples_of(model, _as_float(images), T, seed=5)
    torch.testing.assert_close(
        res.difficulty, difficulty_scores(mutual_information(samples), masks).double(), rtol=1e-4, atol=1e-7
    )


def test_indices_select_and_order_images(model, data):
    images, masks = data
    idx = np.array([4, 0, 2])
    res = estimate_uncertainty(model, images, masks, indices=idx, mc_samples=T, batch_size=2, seed=2, keep_maps=3)
    naive = estimate_uncertainty_naive(model, images[idx], masks[idx], mc_samples=T, batch_size=2, seed=2)
    torch.testing.assert_close(res.difficulty, naive.difficulty, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(res.maps["mask"], masks[idx])
    assert res.difficulty[0] == 0.0  # image 4 has no lesion


def test_keep_maps_limits_returned_maps(model, data):
    images, masks = data
    res = estimate_uncertainty(model, images, masks, mc_samples=T, batch_size=2, keep_maps=3)
    assert res.maps["image"].shape == (3, 3, SIZE, SIZE) and res.maps["image"].dtype == torch.uint8
    for key in ("mask", "mean_prob", "mutual_information", "predictive_entropy", "variance"):
        assert res.maps[key].shape == (3, SIZE, SIZE)
    assert estimate_uncertainty(model, images, masks, mc_samples=T, keep_maps=0).maps == {}


def test_different_seeds_give_different_maps(model, data):
    images, masks = data
    a = estimate_uncertainty(model, images, masks, mc_samples=T, seed=0, keep_maps=N)
    b = estimate_uncertainty(model, images, masks, mc_samples=T, seed=1, keep_maps=N)
    c = estimate_uncertainty(model, images, masks, mc_samples=T, seed=0, keep_maps=N)
    assert not torch.allclose(a.maps["mutual_information"], b.maps["mutual_information"])
    assert not torch.allclose(a.difficulty[:4], b.difficulty[:4])
    torch.testing.assert_close(a.maps["mutual_information"], c.maps["mutual_information"], rtol=0, atol=0)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("estimator", [estimate_uncertainty, estimate_uncertainty_naive], ids=["fast", "naive"])
def test_estimator_leaves_model_untouched(data, mode, estimator):
    images, masks = data
    model = _model()
    model.train(mode == "train")
    state, modes = _snapshot(model)
    estimator(model, images, masks, mc_samples=T, batch_size=2)
    mc_samples_of(model, _as_float(images[:2]), 3)
    state_after, modes_after = _snapshot(model)
    assert modes_after == modes
    for k in state:
        torch.testing.assert_close(state_after[k], state[k], rtol=0, atol=0, msg=f"{k} changed")


@pytest.mark.parametrize(
    "run",
    [
        lambda m, im, mk: estimate_uncertainty(m, im, mk, mc_samples=T, batch_size=N),
        lambda m, im, mk: estimate_uncertainty_naive(m, im, mk, mc_samples=T, batch_size=N),
        lambda m, im, mk: mc_samples_of(m, _as_float(im), T),
    ],
    ids=["fast", "naive", "mc_samples_of"],
)
def test_estimator_restores_mixed_module_modes(data, run):
    """A model in training mode with frozen (eval) batch-norm layers must come back exactly so:
    model.train(was_training) after the estimate would switch the frozen layers back on."""
    images, masks = data
    model = _model()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    _, modes = _snapshot(model)
    run(model, images, masks)
    changed = sorted(n for n, t in _snapshot(model)[1].items() if t != modes[n])
    assert not changed, f"modules whose train/eval mode changed: {changed[:4]}..."


def test_estimator_uses_running_statistics(data):
    """Under MC estimation batch-norm is in eval mode: with dropout 0 the mean probability is the
    deterministic eval-mode prediction (and every sample equals it, so MI = 0)."""
    images, masks = data
    model = _model(dropout=0.0)
    res = estimate_uncertainty(model, images, masks, mc_samples=3, batch_size=2, keep_maps=N)
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model(_as_float(images)), 1)[:, 1]
    torch.testing.assert_close(res.maps["mean_prob"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.maps["mutual_information"].numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(res.difficulty.numpy(), 0.0, atol=1e-6)


def test_mc_samples_of_gives_distinct_samples(model, data):
    images, _ = data
    samples = mc_samples_of(model, _as_float(images[:2]), 4, seed=0)
    assert samples.shape == (4, 2, SIZE, SIZE)
    assert ((samples >= 0) & (samples <= 1)).all()
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(samples[i], samples[j]), (i, j)
    torch.testing.assert_close(mc_samples_of(model, _as_float(images[:2]), 4, seed=0), samples, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_sampler_is_inverted_bernoulli_dropout(p):
    """Eq. 7: z ~ Bernoulli(1 − p); kept units are scaled by 1/(1 − p) like nn.Dropout."""
    sampler = DropoutSampler(p, seed=0, device="cpu")
    sampler.batch = 4
    out = sampler(torch.ones(4, 8, 32, 32), "decoder")
    values = out.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-6)
    assert abs((out == 0).double().mean().item() - p) < 0.02  # 32768 draws: 4σ ≈ 0.011
    assert abs(out.mean().item() - 1.0) < 0.03


def test_dropout_sampler_rate_zero_is_identity():
    sampler = DropoutSampler(0.0, seed=0, device="cpu")
    sampler.batch = 2
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(sampler(x, "bottleneck"), x)


def test_dropout_sampler_sites_have_independent_streams():
    a = DropoutSampler(0.5, seed=3, device="cpu")
    a.batch = 1
    first_bottleneck = a(torch.ones(1, 64), "bottleneck")
    a(torch.ones(1, 64), "decoder")  # drawing at another site must not shift this site's stream
    second_bottleneck = a(torch.ones(1, 64), "bottleneck")
    b = DropoutSampler(0.5, seed=3, device="cpu")
    b.batch = 1
    torch.testing.assert_close(b(torch.ones(1, 64), "bottleneck"), first_bottleneck, rtol=0, atol=0)
    torch.testing.assert_close(b(torch.ones(1, 64), "bottleneck"), second_bottleneck, rtol=0, atol=0)


def test_dropout_sampler_mask_stream_independent_of_grouping():
    """Drawing T masks in one call (T·b rows) or T calls of b rows gives the same masks."""
    x = torch.ones(3 * 2, 4, 5, 5)
    a = DropoutSampler(0.5, seed=7, device="cpu")
    a.batch = 2
    together = a(x, "bottleneck")
    b = DropoutSampler(0.5, seed=7, device="cpu")
    b.batch = 2
    separate = torch.cat([b(x[:2], "bottleneck") for _ in range(3)])
    torch.testing.assert_close(together, separate, rtol=0, atol=0)
    assert set(together.unique().tolist()) == {0.0, 2.0}  # inverted dropout: kept units scaled 1/(1−p)
    assert not torch.equal(together[:2], together[2:4])


@pytest.mark.parametrize("kwargs", [{"mc_samples": 1}, {"mc_samples": 0}, {"batch_size": 0}])
@pytest.mark.parametrize("estimator", [estimate_uncertainty, estimate_uncertainty_naive], ids=["fast", "naive"])
def test_estimator_invalid_arguments(model, data, kwargs, estimator):
    images, masks = data
    with pytest.raises(ValueError):
        estimator(model, images, masks, **kwargs)
