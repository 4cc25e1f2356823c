"""Tests of polydice.schedule: refresh epochs (Algorithm 1, line 4) and the ε controller."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

from polydice.schedule import EpsilonController, refresh_epochs
from polydice.uncertainty import epsilon_from_difficulty


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

@pytest.mark.parametrize(
    "epochs,e0,tau,expected",
    [
        (200, 10, 10, list(range(10, 201, 10))),
        (12, 3, 4, [3, 7, 11]),
        (12, 0, 4, [1, 5, 9]),  # E0 = 0 behaves as E0 = 1
        (12, 1, 4, [1, 5, 9]),
        (5, 1, 1, [1, 2, 3, 4, 5]),
        (10, 10, 3, [10]),
        (9, 10, 1, []),  # E0 > E
        (0, 1, 1, []),
        (20, 7, 100, [7]),
    ],
)

def test_refresh_epochs_hand_cases(epochs, e0, tau, expected):
    assert refresh_epochs(epochs, e0, tau) == expected


def test_refresh_epochs_thesis_defaults():
    got = refresh_epochs(200, 10, 10)
    assert got[0] == 10 and got[-1] == 200 and len(got) == 20


@pytest.mark.parametrize("epochs,e0,tau", [(10, 1, 0), (10, 1, -1), (10, -1, 2), (-1, 1, 1)])
def test_refresh_epochs_invalid(epochs, e0, tau):
    with pytest.raises(ValueError):
        refresh_epochs(epochs, e0, tau)


# ---------------------------------------------------------------------------------------------
# EpsilonController
# ---------------------------------------------------------------------------------------------

INDICES = [7, 2, 11, 5, 30]
DIFFICULTY = np.array([0.1, 0.4, 0.2, 0.9, 0.0])


def np_epsilon(d, q=25, k=2.0, lo=0.0, hi=0.5, delta=1e-8):
    d = np.asarray(d, dtype=np.float64)
    return lo + (hi - lo) / (1 + np.exp(-k * (d - np.percentile(d, q)) / (np.std(d) + delta)))


@pytest.mark.parametrize("e0,tau", [(10, 10), (3, 4), (0, 4), (1, 1), (25, 7)])
def test_should_refresh_matches_refresh_epochs(e0, tau):
    ctrl = EpsilonController(INDICES, e0=e0, tau=tau)
    epochs = 60
    assert [e for e in range(1, epochs + 1) if ctrl.should_refresh(e)] == refresh_epochs(epochs, e0, tau)


def test_epsilon_is_zero_before_first_refresh():
    ctrl = EpsilonController(INDICES)
    assert ctrl.last_refresh == 0
    eps = ctrl.epsilon_for(torch.tensor(INDICES))
    assert eps.shape == (5,)
    assert torch.equal(eps, torch.zeros(5))


@pytest.mark.parametrize(
    "kwargs", [{}, {"q": 50, "k": 5.0}, {"q": 10, "k": 1.0, "eps_min": -0.3, "eps_max": 0.5}]
)
def test_update_maps_difficulty_like_epsilon_from_difficulty(kwargs):
    ctrl = EpsilonController(INDICES, **kwargs)
    new = ctrl.update(10, torch.from_numpy(DIFFICULTY))
    settings = (kwargs.get("q", 25), kwargs.get("k", 2.0), kwargs.get("eps_min", 0.0), kwargs.get("eps_max", 0.5))
    expected = epsilon_from_difficulty(torch.from_numpy(DIFFICULTY), *settings)
    torch.testing.assert_close(new, expected.float())
    np.testing.assert_allclose(new.numpy(), np_epsilon(DIFFICULTY, *settings), rtol=1e-6)
    assert ctrl.last_refresh == 10
    torch.testing.assert_close(ctrl.epsilon_for(torch.tensor(INDICES)), expected.float())


def test_epsilon_for_looks_up_by_dataset_index_in_any_order():
    ctrl = EpsilonController(INDICES)
    ctrl.update(10, DIFFICULTY)
    table = dict(zip(INDICES, np_epsilon(DIFFICULTY)))
    query = [11, 7, 30, 11, 5, 2]
    np.testing.assert_allclose(ctrl.epsilon_for(torch.tensor(query)).numpy(), [table[i] for i in query], rtol=1e-6)
    np.testing.assert_allclose(ctrl.epsilon_for(np.array(query)).numpy(), [table[i] for i in query], rtol=1e-6)
    assert ctrl.epsilon_for(torch.tensor([], dtype=torch.long)).shape == (0,)


def test_read_only_indices_are_copied_without_a_warning():
    """A Tune trial's folds arrive read-only from Ray's object store; torch warns on a tensor
    sharing a read-only array, once per process, in every trial's log."""
    indices = np.array(INDICES)
    indices.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctrl = EpsilonController(indices)
    ctrl.indices[0] = -1  # the controller's own copy
    assert indices[0] == INDICES[0]


def test_hardest_image_gets_largest_eps():
    ctrl = EpsilonController(INDICES)
    ctrl.update(10, DIFFICULTY)
    eps = ctrl.epsilon_for(torch.tensor(INDICES))
    assert INDICES[int(eps.argmax())] == 5 and INDICES[int(eps.argmin())] == 30


@pytest.mark.parametrize("bad", [[3], [0], [100], [-1], [7, 4]])
def test_epsilon_for_unknown_index_raises_key_error(bad):
    ctrl = EpsilonController(INDICES)
    with pytest.raises(KeyError):
        ctrl.epsilon_for(torch.tensor(bad))


def test_update_rejects_wrong_length():
    ctrl = EpsilonController(INDICES)
    with pytest.raises(ValueError):
        ctrl.update(10, torch.zeros(4))


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ([1, 2, 2], {}),
        ([[1, 2], [3, 4]], {}),
        (INDICES, {"tau": 0}),
        (INDICES, {"e0": -1}),
        (INDICES, {"eps_min": 0.6, "eps_max": 0.5}),
    ],
    ids=["duplicates", "2d", "tau0", "e0_negative", "eps_range"],
)
def test_controller_invalid_arguments(args, kwargs):
    with pytest.raises(ValueError):
        EpsilonController(args, **kwargs)


def test_state_dict_round_trip_through_torch_save(tmp_path):
    ctrl = EpsilonController(INDICES, e0=3, tau=4, q=40, k=3.0, eps_min=-0.1, eps_max=0.4)
    ctrl.update(7, DIFFICULTY)
    path = tmp_path / "ctrl.pt"
    torch.save(ctrl.state_dict(), path)
    state = torch.load(path, weights_only=True)

    fresh = EpsilonController(INDICES)  # default settings; the checkpoint restores them
    fresh.load_state_dict(state)
    assert fresh.last_refresh == 7
    torch.testing.assert_close(fresh.epsilon, ctrl.epsilon, rtol=0, atol=0)
    torch.testing.assert_close(fresh.difficulty, ctrl.difficulty, rtol=0, atol=0)
    q = torch.tensor([30, 2, 7])
    torch.testing.assert_close(fresh.epsilon_for(q), ctrl.epsilon_for(q), rtol=0, atol=0)
    for e in range(1, 30):
        assert fresh.should_refresh(e) == ctrl.should_refresh(e)
    # The restored controller maps a later refresh with the checkpointed q, k and range.
    d2 = np.array([0.3, 0.1, 0.5, 0.2, 0.05])
    torch.testing.assert_close(fresh.update(11, d2), ctrl.update(11, d2), rtol=0, atol=0)


def test_state_dict_is_detached_from_the_controller():
    ctrl = EpsilonController(INDICES)
    state = ctrl.state_dict()
    ctrl.update(10, DIFFICULTY)
    assert torch.equal(state["epsilon"], torch.zeros(5))


def test_state_dict_round_trip_in_memory_before_first_refresh():
    buf = io.BytesIO()
    torch.save(EpsilonController(INDICES).state_dict(), buf)
    buf.seek(0)
    fresh = EpsilonController(INDICES)
    fresh.update(10, DIFFICULTY)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.last_refresh == 0
    assert torch.equal(fresh.epsilon_for(torch.tensor(INDICES)), torch.zeros(5))


@pytest.mark.parametrize("other", [[7, 2, 11, 5], [7, 2, 11, 5, 31], [2, 7, 11, 5, 30]])
def test_state_from_different_indices_is_rejected(other):
    ctrl = EpsilonController(INDICES)
    ctrl.update(10, DIFFICULTY)
    with pytest.raises(ValueError):
        EpsilonController(other).load_state_dict(ctrl.state_dict())


def test_thesis_schedule_end_to_end():
    """Algorithm 1 with E = 30, E0 = 10, τ = 10: ε = 0 for epochs 1..9, refreshed at 10, 20, 30."""
    ctrl = EpsilonController(INDICES, e0=10, tau=10)
    seen = []
    for epoch in range(1, 31):
        if ctrl.should_refresh(epoch):
            ctrl.update(epoch, DIFFICULTY * epoch)
            seen.append(epoch)
        eps = ctrl.epsilon_for(torch.tensor(INDICES))
        if epoch < 10:
            assert torch.equal(eps, torch.zeros(5))
        else:
            assert eps.max() > 0
    assert seen == [10, 20, 30] and ctrl.last_refresh == 30
    assert math.isclose(float(ctrl.epsilon.max()), float(np_epsilon(DIFFICULTY * 30).max()), rel_tol=1e-6)
