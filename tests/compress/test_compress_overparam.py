"""Over-parameterization collapses exactly; orthogonality regularizers have their closed-form values."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank_core.errors import UserInputError


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "bias"),
    [(1, 1, 1, False), (2, 1, 1, True), (1, 0, 1, False), (2, 2, 2, True)],
)
def test_expanded_conv_collapses_exactly_float64(stride, padding, dilation, bias):
    from compress.overparam import ExpandedConv2d

    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    chain = ExpandedConv2d(conv, expansion=4).double()
    for m in (chain.expand, chain.core, chain.project):
        nn.init.normal_(m.weight, std=0.3)
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64)
    collapsed = chain.collapse()
    assert isinstance(collapsed, nn.Conv2d)
    assert collapsed.weight.shape == conv.weight.shape
    assert (collapsed.stride, collapsed.padding, collapsed.dilation) == (conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(collapsed(x), chain(x), rtol=1e-10, atol=1e-10)
    assert chain.expand.weight.shape == (24, 6, 1, 1)
    assert chain.core.weight.shape == (40, 24, 3, 3)


def test_expanded_conv_keeps_the_original_bias():
    from compress.overparam import ExpandedConv2d

    conv = nn.Conv2d(3, 4, 3, padding=1)
    chain = ExpandedConv2d(conv)
    torch.testing.assert_close(chain.project.bias, conv.bias)
    torch.testing.assert_close(chain.collapse().bias, conv.bias)


def test_expanded_linear_collapses_exactly():
    from compress.overparam import ExpandedLinear

    lin = nn.Linear(7, 5).double()
    chain = ExpandedLinear(lin, expansion=3).double()
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(chain.collapse()(x), chain(x), rtol=1e-12, atol=1e-12)


def test_model_level_expand_collapse_is_the_identity_function():
    from compress.overparam import collapse_, expand_
    from compress.zoo import create_model

    torch.manual_seed(0)
    model = create_model("cifar_resnet20_w0.5", in_channels=1).double().eval()
    expanded = copy.deepcopy(model)
    paths = expand_(expanded, expansion=4)
    assert "conv1" not in paths  # the stem stays
    assert len(paths) == 18  # every 3×3 conv of the 9 blocks; the 1×1 shortcuts stay
    assert sum(p.numel() for p in expanded.parameters()) > 8 * sum(p.numel() for p in model.parameters())
    for m in expanded.modules():  # a trained chain is not a copy of the original kernel
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.05)
    expanded.eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        before = expanded(x)
        collapsed = copy.deepcopy(expanded)
        assert sorted(collapse_(collapsed)) == sorted(paths)
        after = collapsed(x)
    assert not any(type(m).__name__.startswith("Expanded") for m in collapsed.modules())
    assert collapsed.state_dict().keys() == model.state_dict().keys()  # the original architecture again
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_model_level_collapse_float32_within_1e5():
    from compress.overparam import collapse_, expand_
    from compress.zoo import create_model

    torch.manual_seed(0)
    model = create_model("cifar_resnet20_w0.5", in_channels=1)
    expand_(model)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
        collapse_(model)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_grouped_convs_are_skipped_and_refused():
    from compress.overparam import ExpandedConv2d, expand_

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3))
    assert expand_(model) == ["2"]
    with pytest.raises(UserInputError, match="grouped"):
        ExpandedConv2d(nn.Conv2d(8, 8, 3, groups=2))


def test_soft_orthogonality_closed_form():
    from compress.overparam import soft_orthogonality

    q, _ = torch.linalg.qr(torch.randn(9, 4, dtype=torch.float64))  # orthonormal columns
    assert float(soft_orthogonality(q)) == pytest.approx(0.0, abs=1e-20)
    assert float(soft_orthogonality(q.T)) == pytest.approx(0.0, abs=1e-20)
    scaled = 2.0 * q  # MᵀM = 4I → ‖3I‖² = 9·4
    assert float(soft_orthogonality(scaled)) == pytest.approx(36.0, rel=1e-12)
    m = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)  # MMᵀ − I = [[1,1],[1,0]] → 3
    assert float(soft_orthogonality(m)) == pytest.approx(3.0)


def test_srip_estimates_the_largest_deviation():
    from compress.overparam import srip

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    m = q @ torch.diag(torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float64))  # MᵀM − I has σ_max 8
    v = None
    for _ in range(30):
        value, v = srip(m, v)
    assert float(value) == pytest.approx(64.0, rel=1e-6)
    zero, _ = srip(q)
    assert float(zero) == pytest.approx(0.0, abs=1e-20)


def test_regularizer_schedule_and_gradients():
    from compress.overparam import ExpandedConv2d, OrthogonalityRegularizer

    reg = OrthogonalityRegularizer(weight=1e-2)
    assert [reg.weight_at(p) for p in (0.0, 0.49, 0.5, 0.8, 0.95)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-4, 0.0])
    model = nn.Sequential(ExpandedConv2d(nn.Conv2d(4, 6, 3)))
    value = reg(model, 0.0)
    value.backward()
    assert float(value.detach()) > 0
    assert model[0].core.weight.grad is not None
    assert float(model[0].core.weight.grad.abs().sum()) > 0
    plain = nn.Sequential(nn.Conv2d(3, 3, 3))
    # scope="expanded": nothing expanded, nothing to add; scope="auto" falls back to the plain weights
    assert float(OrthogonalityRegularizer(weight=1e-2, scope="expanded")(plain, 0.0).detach()) == 0.0
    w = plain[0].weight.detach().reshape(3, -1)
    expected = 1e-2 * float(((w @ w.T - torch.eye(3)) ** 2).sum())
    assert float(reg(plain, 0.0).detach()) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(UserInputError, match="unknown orthogonality"):
        OrthogonalityRegularizer(kind="l1")


def test_trainer_logs_the_orthogonality_term_of_an_expanded_model():
    import os
    from pathlib import Path

    from compress.overparam import OrthogonalityRegularizer, expand_
    from compress.train import TrainConfig, Trainer
    from compress.zoo import create_model

    root = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (make data installs dataset-fashion-mnist)")
    from compress.data import calibration_subset, load_data

    data = load_data("fashion-mnist")
    train = data.train.subset(calibration_subset(data.train, 256, seed=1).indices)
    model = create_model("cifar_resnet20_w0.25", in_channels=1)
    expand_(model)
    reg = OrthogonalityRegularizer(weight=1e-3)
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_steps=3)
    result = Trainer(model, config, train, regularizers=[reg], device="cpu", progress=False).fit()
    logged = result.history[0]["terms"]["ortho"]
    assert logged > 0
    assert logged == pytest.approx(1e-3 * float(reg.penalty(model).detach()), rel=0.5)  # same order as the penalty now
