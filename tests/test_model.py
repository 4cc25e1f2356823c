"""Tests of polydice.model: thesis Table 1 shapes, dropout placement and modes, FLOP count.

The full-size model (c = 64, 224×224) runs one forward pass in eval mode under no_grad (about a
second on one CPU thread); everything else uses 4–16-channel models on inputs of at most 80×80.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch.utils.flop_counter import FlopCounterMode

from polydice.model import DROPOUT_SITES, UNet, forward_flops, mc_dropout_mode, refresh_flops, to_input


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

ENCODER = ("inc", "down1", "down2", "down3", "down4")
DECODER = ("up1", "up2", "up3", "up4", "outc")

# Thesis Table 1: layer -> (H, W, C) at 224×224 input, c = 64.
TABLE_1 = {
    "inc": (224, 224, 64),
    "down1": (112, 112, 128),
    "down2": (56, 56, 256),
    "down3": (28, 28, 512),
    "down4": (14, 14, 512),
    "up1": (28, 28, 256),
    "up2": (56, 56, 128),
    "up3": (112, 112, 64),
    "up4": (224, 224, 64),
    "outc": (224, 224, 2),
}


def _conv_flops_by_hooks(model: UNet, x: torch.Tensor) -> tuple[dict[str, tuple], dict[str, float]]:
    """One eval forward: output shape of every Table 1 layer, and 2·MACs of the actual Conv2d
    modules (weights only, per image) summed per encoder / decoder."""
    shapes: dict[str, tuple] = {}
    flops = {"encoder": 0.0, "decoder": 0.0}
    handles = []
    for name in ENCODER + DECODER:
        layer = getattr(model, name)
        handles.append(layer.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape))))
        part = "encoder" if name in ENCODER else "decoder"
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]  # outc is itself a Conv2d
        for conv in convs:

            def count(m, inputs, out, part=part):
                macs_per_output = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                flops[part] += 2.0 * macs_per_output * out[0].numel()

            handles.append(conv.register_forward_hook(count))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes, flops


@pytest.fixture(scope="module")
def thesis_forward():
    torch.manual_seed(0)
    model = UNet(base_channels=64)
    return _conv_flops_by_hooks(model, torch.rand(1, 3, 224, 224))


@pytest.mark.parametrize("layer", list(TABLE_1))
def test_layer_shapes_match_thesis_table_1(thesis_forward, layer):
    shapes, _ = thesis_forward
    h, w, c = TABLE_1[layer]
    assert shapes[layer] == (1, c, h, w)


def test_forward_flops_thesis_size(thesis_forward):
    _, counted = thesis_forward
    flops = forward_flops(64, 224)
    assert round(flops["encoder"] / 1e9) == 22
    assert round(flops["decoder"] / 1e9) == 39
    assert flops["total"] == pytest.approx(flops["encoder"] + flops["decoder"], rel=1e-12)
    assert flops["encoder"] == pytest.approx(counted["encoder"], rel=1e-12)
    assert flops["decoder"] == pytest.approx(counted["decoder"], rel=1e-12)


@pytest.mark.parametrize("base,size,in_ch", [(8, 64, 3), (4, 32, 1), (16, 48, 3), (4, 50, 3)])
def test_forward_flops_equals_hook_count_small(base, size, in_ch):
    _, counted = _conv_flops_by_hooks(UNet(in_channels=in_ch, base_channels=base), torch.rand(1, in_ch, size, size))
    flops = forward_flops(base, size, in_ch)
    assert flops["encoder"] == pytest.approx(counted["encoder"], rel=1e-12)
    assert flops["decoder"] == pytest.approx(counted["decoder"], rel=1e-12)


def _flops(fn) -> float:
    """FLOPs of ``fn()`` as torch's own counter sees them (convolutions and matmuls)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("base,size", [(8, 64), (4, 50)])
def test_flop_split_of_sampling_equals_torch_flop_counter(base, size):
    """encode, prepare_sampling and one decode_samples pass cost what forward_flops says."""
    model = UNet(base_channels=base).eval()
    f = forward_flops(base, size)
    with torch.no_grad():
        x = torch.rand(1, 3, size, size)
        assert _flops(lambda: model.encode(x)) == pytest.approx(f["encoder"], rel=1e-12)
        feats = model.encode(x)
        assert _flops(lambda: model.prepare_sampling(feats)) == pytest.approx(f["decoder_skip"], rel=1e-12)
        cache = model.prepare_sampling(feats)
        assert _flops(lambda: model.decode_samples(cache, 3)) == pytest.approx(3 * (f["decoder"] - f["decoder_skip"]),
                                                                             rel=1e-12)
    assert refresh_flops(base, size, 10) == pytest.approx(f["encoder"] + f["decoder_skip"]
                                                          + 10 * (f["decoder"] - f["decoder_skip"]), rel=1e-12)


def test_refresh_flops_thesis_size():
    """At c = 64, 224×224, T = 10 the estimator needs 0.45 of the naive T full passes."""
    assert round(forward_flops(64, 224)["decoder_skip"] / 1e9, 1) == 14.8
    assert refresh_flops(64, 224, 10) / (10 * forward_flops(64, 224)["total"]) == pytest.approx(0.4537, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Small model: shapes, gradients, modes
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small():
    torch.manual_seed(0)
    model = UNet(base_channels=8)
    # Non-default running statistics, so that "untouched" is meaningful.
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64))
    return model


def _x(batch=2, h=64, w=64, seed=1):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("h,w", [(64, 64), (48, 80), (50, 66), (17, 23)])
def test_output_shape_and_finite(small, h, w):
    out = small(_x(2, h, w))
    assert out.shape == (2, 2, h, w)
    assert torch.isfinite(out).all()


def test_every_parameter_gets_a_gradient(small):
    small.train()
    out = small(_x(2))
    target = (torch.rand(2, 64, 64) > 0.5).long()
    nn.functional.cross_entropy(out, target).backward()
    for name, p in small.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_eval_is_deterministic(small):
    small.eval()
    with torch.no_grad():
        a, b = small(_x()), small(_x())
    assert torch.equal(a, b)


def test_train_and_eval_outputs_differ(small):
    x = _x()
    small.eval()
    with torch.no_grad():
        ev = small(x)
    small.train()
    torch.manual_seed(0)
    with torch.no_grad():
        tr = small(x)
    assert not torch.allclose(tr, ev, atol=1e-4)


def test_encode_decode_equals_forward(small):
    small.eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(small.decode(small.encode(x)), small(x), rtol=0, atol=0)


def test_encode_returns_skip_features_and_bottleneck(small):
    feats = small.encode(_x(1))
    assert [tuple(f.shape) for f in feats] == [
        (1, 8, 64, 64), (1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8), (1, 64, 4, 4)
    ]


def _running_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _modes(model):
    return {n: m.training for n, m in model.named_modules()}


def test_mc_dropout_mode_switches_only_dropout_on(small):
    small.train()
    before_modes, stats = _modes(small), _running_stats(small)
    x = _x()
    with mc_dropout_mode(small) as m:
        assert m is small
        for name, module in small.named_modules():
            is_dropout = isinstance(module, nn.modules.dropout._DropoutNd)
            assert module.training == is_dropout, name
        with torch.no_grad():
            a, b = small(x), small(x)
    assert not torch.allclose(a, b)
    after = _running_stats(small)
    for k in stats:
        assert torch.equal(after[k], stats[k]), k
    assert _modes(small) == before_modes


@pytest.mark.parametrize("setup", ["train", "eval", "mixed"])
def test_mc_dropout_mode_restores_modes(small, setup):
    small.train(setup != "eval")
    if setup == "mixed":
        small.down2.eval()
        small.drop_decoder.eval()
    before = _modes(small)
    with mc_dropout_mode(small):
        pass
    assert _modes(small) == before


def test_mc_dropout_mode_restores_modes_after_exception(small):
    small.eval()
    before = _modes(small)
    with pytest.raises(RuntimeError):
        with mc_dropout_mode(small):
            raise RuntimeError("boom")
    assert _modes(small) == before


def test_mc_dropout_differs_from_eval_but_keeps_bn_running_stats(small):
    """MC mode uses running statistics: with dropout rate 0 it equals the eval output."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, dropout=0.0)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64))
    x = _x()
    model.eval()
    with torch.no_grad():
        ev = model(x)
    with mc_dropout_mode(model), torch.no_grad():
        mc = model(x)
    torch.testing.assert_close(mc, ev, rtol=0, atol=0)


def test_dropout_sites_and_order(small):
    """decode(..., dropout=fn) calls fn at the bottleneck (after down4) and after up4, in that order."""
    small.eval()
    calls = []

    def record(x, site):
        calls.append((site, tuple(x.shape)))
        return x

    with torch.no_grad():
        out = small.decode(small.encode(_x(2)), dropout=record)
    assert [site for site, _ in calls] == ["bottleneck", "decoder"] == list(DROPOUT_SITES)
    assert calls[0][1] == (2, 64, 4, 4)  # down4 output: 8c channels at H/16
    assert calls[1][1] == (2, 8, 64, 64)  # up4 output: c channels at full resolution
    with torch.no_grad():
        torch.testing.assert_close(out, small.decode(small.encode(_x(2))), rtol=0, atol=0)


def _seeded_dropout(seed: int):
    """A dropout fn drawing masks of each call's full shape from one generator, in call order."""
    g = torch.Generator().manual_seed(seed)
    return lambda x, site: x * (torch.rand(x.shape, generator=g) < 0.5) * 2.0


def _repeat(feats, samples):
    return tuple(f.repeat(samples, 1, 1, 1) for f in feats)


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("h,w", [(64, 64), (50, 66), (17, 23)])
def test_decode_samples_equals_decode_of_repeated_features(small, samples, h, w):
    """The skip term computed once and added to every sample gives decode's logits, odd sizes
    (padded upsampling) included, with the same masks at the same sites."""
    small.eval()
    x = _x(2, h, w)
    with torch.no_grad():
        feats = small.encode(x)
        got = small.decode_samples(small.prepare_sampling(feats), samples, dropout=_seeded_dropout(5))
        expected = small.decode(_repeat(feats, samples), dropout=_seeded_dropout(5))
        assert got.shape == (samples * 2, 2, h, w)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # No dropout fn: the model's own (eval-mode) dropout layers, i.e. the deterministic forward.
        torch.testing.assert_close(small.decode_samples(small.prepare_sampling(feats), samples),
                                   small(x).repeat(samples, 1, 1, 1), rtol=1e-5, atol=1e-5)


def test_decode_samples_rows_are_sample_major(small):
    """Rows [s*B:(s+1)*B] are sample s: with dropout off every block equals the single forward."""
    small.eval()
    x = _x(3)
    with torch.no_grad():
        cache = small.prepare_sampling(small.encode(x))
        out = small.decode_samples(cache, 4, dropout=lambda x, site: x).unflatten(0, (4, 3))
        for s in range(4):
            torch.testing.assert_close(out[s], small(x), rtol=1e-5, atol=1e-5)


def test_skip_term_split_with_a_conv_bias():
    """A bias on the first convolution is added once, not once per term."""
    from polydice.model import Up

    torch.manual_seed(0)
    up = Up(16, 4)
    biased = nn.Conv2d(16, 8, 3, padding=1, bias=True)
    with torch.no_grad():
        biased.weight.copy_(up.conv[0].weight)
        biased.bias.normal_()
    up.conv[0] = biased
    up.eval()
    x, skip = torch.rand(6, 8, 5, 7), torch.rand(3, 8, 11, 14)  # 2 samples of 3; odd sizes pad
    with torch.no_grad():
        got = up.forward_with_skip_term(x, up.skip_term(skip))
        torch.testing.assert_close(got, up(x, skip.repeat(2, 1, 1, 1)), rtol=1e-5, atol=1e-5)


def test_dropout_fn_output_is_used(small):
    small.eval()
    with torch.no_grad():
        feats = small.encode(_x(1))
        zero_decoder = small.decode(feats, dropout=lambda x, site: x * 0 if site == "decoder" else x)
    # With the up4 features zeroed, only the bias of the 1×1 outc remains.
    expected = small.outc.bias.view(1, 2, 1, 1).expand(1, 2, 64, 64)
    torch.testing.assert_close(zero_decoder, expected)


def test_nn_dropout_modules_sit_after_down4_and_up4(small):
    seen = {}
    hooks = [
        small.down4.register_forward_hook(lambda m, i, o: seen.__setitem__("down4", o)),
        small.up4.register_forward_hook(lambda m, i, o: seen.__setitem__("up4", o)),
        small.drop_bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("drop_bottleneck", i[0])),
        small.drop_decoder.register_forward_hook(lambda m, i, o: seen.__setitem__("drop_decoder", i[0])),
    ]
    small.eval()
    with torch.no_grad():
        small(_x(1))
    for h in hooks:
        h.remove()
    assert seen["drop_bottleneck"] is seen["down4"]
    assert seen["drop_decoder"] is seen["up4"]
    layers = small.dropout_layers()
    assert len(layers) == 2 and all(d.p == 0.5 for d in layers)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.9])
def test_dropout_rate_is_applied(p):
    model = UNet(base_channels=4, dropout=p)
    assert model.dropout_rate == p
    assert [d.p for d in model.dropout_layers()] == [p, p]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_channels": 0},
        {"base_channels": -8},
        {"in_channels": 0},
        {"num_classes": 0},
        {"dropout": -0.1},
        {"dropout": 1.0},
        {"dropout": 1.5},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        UNet(**kwargs)


def test_to_input_scales_uint8_and_rejects_floats():
    x = torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8)
    torch.testing.assert_close(to_input(x), torch.tensor([[[[0.0, 0.2, 1.0]]]]))
    with pytest.raises(ValueError, match="uint8"):
        to_input(torch.rand(1, 3, 4, 4))
