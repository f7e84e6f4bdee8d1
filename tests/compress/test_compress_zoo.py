"""CIFAR ResNet zoo: architecture checked against the joint-SVD paper's sizes and FLOPs, and load_model integration.

Reference numbers (method-jsvd.md §6–§7, Chen et al. 2023 Tables II/IV): weights exclude BN (all conv weights +
FC weight + FC bias); FLOPs = 2 × MACs of convs + FC at 32×32 input.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compress.metrics import count_macs
from compress.models import list_models, load_model
from compress.zoo import create_model, is_zoo_spec, list_zoo_models, parse_zoo_name
from lowrank_core.errors import UserInputError

# Hand counts, 10 classes, 3 input channels, BN excluded (k² · in · out per conv; FC 512·10 + 10 or 2048·10 + 10).
# ResNet-18, BasicBlock [2, 2, 2, 2]:
#   stem    3·64·9                                                    =      1,728
#   layer1  4 · 64·64·9                                               =    147,456
#   layer2  64·128·9 + 3 · 128·128·9 + 64·128 (ds)                    =    524,288
#   layer3  128·256·9 + 3 · 256·256·9 + 128·256 (ds)                  =  2,097,152
#   layer4  256·512·9 + 3 · 512·512·9 + 256·512 (ds)                  =  8,388,608
#   fc      512·10 + 10                                               =      5,130
#   total                                                             = 11,164,362  (Table II: 11.16 M)
# ResNet-34, BasicBlock [3, 4, 6, 3]:
#   1,728 + 6·36,864 + (73,728 + 7·147,456 + 8,192) + (294,912 + 11·589,824 + 32,768)
#   + (1,179,648 + 5·2,359,296 + 131,072) + 5,130 = 21,265,098                 (Table II: 21,265,098)
# ResNet-50, Bottleneck [3, 4, 6, 3], bottleneck width o, block = in·o + 9·o² + o·4o (+ ds in·4o):
#   stem    3·64·9                                                    =      1,728
#   layer1  (64·64 + 9·64² + 64·256 + 64·256) + 2 · (256·64 + 9·64² + 64·256)
#           = 73,728 + 2 · 69,632                                     =    212,992
#   layer2  (256·128 + 9·128² + 128·512 + 256·512) + 3 · (512·128 + 9·128² + 128·512)
#           = 376,832 + 3 · 278,528                                   =  1,212,416
#   layer3  (512·256 + 9·256² + 256·1024 + 512·1024) + 5 · (1024·256 + 9·256² + 256·1024)
#           = 1,507,328 + 5 · 1,114,112                               =  7,077,888
#   layer4  (1024·512 + 9·512² + 512·2048 + 1024·2048) + 2 · (2048·512 + 9·512² + 512·2048)
#           = 6,029,312 + 2 · 4,456,448                               = 14,942,208
#   fc      2048·10 + 10                                              =     20,490
#   total                                                             = 23,467,722
# Table II prints 23.50 M for ResNet-50 (and 23.69 M for CIFAR-100, where this net has 23.65 M); the paper's
# FLOPs, original 25.96E8 and Tai-SVD at ρ = 0.04 / 0.08 (7.19E8 / 7.97E8), match this net exactly, so the
# architecture is the paper's and Table II's ResNet-50 size is off by ~0.03 M.
PARAMS_NO_BN = {"cifar_resnet18": 11_164_362, "cifar_resnet34": 21_265_098, "cifar_resnet50": 23_467_722}
FC_IN = {"cifar_resnet18": 512, "cifar_resnet34": 512, "cifar_resnet50": 2048}
PAPER_FLOPS_E8 = {"cifar_resnet18": 11.11, "cifar_resnet34": 23.19, "cifar_resnet50": 25.96}
TORCHVISION = {"cifar_resnet18": "resnet18", "cifar_resnet34": "resnet34", "cifar_resnet50": "resnet50"}


def _params_no_bn(model: nn.Module) -> int:
    """Conv weights + Linear weights and biases: the paper's CF / Table II convention (BN excluded)."""
    return sum(
        p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters(recurse=False)
    )


def _meta(name: str, **kwargs: object) -> nn.Module:
    """Build on the meta device: shapes and counts without allocating or initialising weights."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


# ------------------------------------------------------------------------------------------------ sizes, FLOPs
@pytest.mark.parametrize("name", sorted(PARAMS_NO_BN))
def test_param_count_excluding_bn(name: str) -> None:
    assert _params_no_bn(_meta(name)) == PARAMS_NO_BN[name]
    # CIFAR-100: only the FC grows, by 90 output rows of FC_IN weights + 90 biases.
    c100 = _params_no_bn(_meta(name, num_classes=100))
    assert c100 == PARAMS_NO_BN[name] + 90 * FC_IN[name] + 90
    assert c100 == {"cifar_resnet18": 11_210_532, "cifar_resnet34": 21_311_268, "cifar_resnet50": 23_652_132}[name]


def test_paper_table_ii_sizes_resnet18_34() -> None:
    """Table II sizes (M, 2 decimals) for C10 / C100; ResNet-50 is the documented exception (see module comment)."""
    for name, (c10, c100) in {"cifar_resnet18": (11.16, 11.21), "cifar_resnet34": (21.27, 21.31)}.items():
        assert round(_params_no_bn(_meta(name)) / 1e6, 2) == c10
        assert round(_params_no_bn(_meta(name, num_classes=100)) / 1e6, 2) == c100


def test_torchvision_imagenet_resnet34_count_uses_the_papers_convention() -> None:
    with torch.device("meta"):
        model = torchvision.models.resnet34(weights=None)
    assert _params_no_bn(model) == 21_780_648  # method-jsvd.md §6


@pytest.mark.parametrize("name", sorted(PAPER_FLOPS_E8))
def test_flops_match_paper(name: str) -> None:
    """FLOPs = 2 × MACs of conv + FC at 32×32; FlopCounterMode counts only aten.convolution and aten.addmm here."""
    model = _meta(name)
    x = torch.empty(1, 3, 32, 32, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x)
    ops = {str(op).split(".")[1] for op in counter.get_flop_counts()["Global"]}
    assert ops == {"convolution", "addmm"}  # BN, ReLU, add, pool: not counted; addmm ignores the FC bias add
    flops = counter.get_total_flops()
    assert flops == 2 * count_macs(model, x)
    assert round(flops / 1e8, 2) == PAPER_FLOPS_E8[name]


# ------------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_state_dict_keys_match_torchvision(name: str) -> None:
    ours = _meta(name).state_dict()
    with torch.device("meta"):
        theirs = torchvision.models.get_model(TORCHVISION[name], weights=None).state_dict()
    assert set(ours) == set(theirs)
    differ = {k for k in ours if ours[k].shape != theirs[k].shape}
    assert differ == {"conv1.weight", "fc.weight", "fc.bias"}
    assert tuple(ours["conv1.weight"].shape) == (64, 3, 3, 3)


def test_stem_stride_and_shortcut_placement() -> None:
    r18, r50 = _meta("cifar_resnet18"), _meta("cifar_resnet50")
    assert isinstance(r18.maxpool, nn.Identity)
    assert (r18.conv1.kernel_size, r18.conv1.stride, r18.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert [n for n, _ in r18.named_modules() if n.endswith("downsample")] == [
        "layer2.0.downsample",
        "layer3.0.downsample",
        "layer4.0.downsample",
    ]
    assert [n for n, _ in r50.named_modules() if n.endswith("downsample")] == [
        f"layer{i}.0.downsample" for i in (1, 2, 3, 4)
    ]
    # v1.5: stride on the 3×3 conv2, not the 1×1 conv1.
    assert r50.layer2[0].conv1.stride == (1, 1)
    assert r50.layer2[0].conv2.stride == (2, 2)
    assert type(r18.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert type(r50.layer1[0]) is torchvision.models.resnet.Bottleneck


def test_grayscale_28px_input() -> None:
    model = create_model("cifar_resnet18", in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_width_multiplier_and_name_suffix() -> None:
    model = _meta("cifar_resnet18", width=0.25)
    assert model.conv1.out_channels == 16
    assert [getattr(model, f"layer{i}")[0].conv2.out_channels for i in (1, 2, 3, 4)] == [16, 32, 64, 128]
    assert model.fc.in_features == 128
    by_name = _meta("cifar_resnet18_w0.25")
    assert {k: v.shape for k, v in by_name.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert parse_zoo_name("cifar_resnet18_w0.25") == ("cifar_resnet18", {"width": 0.25})
    assert parse_zoo_name("cifar_resnet50") == ("cifar_resnet50", {})
    b50 = _meta("cifar_resnet50_w0.5")
    assert [getattr(b50, f"layer{i}")[0].conv3.out_channels for i in (1, 2, 3, 4)] == [128, 256, 512, 1024]


@pytest.mark.parametrize("bad", ["_w0", "_wabc", "_w-1", "_wnan", "_winf", "_w"])
def test_bad_width_suffix(bad: str) -> None:
    assert is_zoo_spec("cifar_resnet18" + bad)
    with pytest.raises(UserInputError, match="bad width"):
        parse_zoo_name("cifar_resnet18" + bad)
    with pytest.raises(UserInputError, match="bad width"):
        load_model("cifar_resnet18" + bad, "random")


def test_conflicting_width_and_unknown_init() -> None:
    with pytest.raises(UserInputError, match="give the width once"):
        create_model("cifar_resnet18_w0.5", width=0.25)
    with pytest.raises(UserInputError, match="unknown init"):
        create_model("cifar_resnet20", init="xavier")
    with pytest.raises(UserInputError, match="did you mean cifar_resnet18"):
        create_model("cifar_resnet19")


def test_he_resnets() -> None:
    """He et al. report 0.27/0.46/0.66/0.85 M; option-B (1×1 conv + BN) shortcuts add 2,560 weights + 192 BN params.

    ResNet-20 by hand: stem 3·16·9 = 432; layer1 6·16·16·9 = 13,824; layer2 16·32·9 + 5·32·32·9 + 16·32 = 51,200;
    layer3 32·64·9 + 5·64·64·9 + 32·64 = 204,800; fc 64·10 + 10 = 650 → 270,906 without BN; BN adds
    2 · (16 + 6·16 + 7·32 + 7·64) = 1,568 → 272,474 in all. Option A (zero-padded identity) has 269,722.
    """
    counts = {d: sum(p.numel() for p in _meta(f"cifar_resnet{d}").parameters()) for d in (20, 32, 44, 56)}
    assert counts == {20: 272_474, 32: 466_906, 44: 661_338, 56: 855_770}
    assert _params_no_bn(_meta("cifar_resnet20")) == 270_906
    for depth, paper_m in {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85}.items():
        assert math.isclose(counts[depth], paper_m * 1e6, rel_tol=0.02)
    r20 = _meta("cifar_resnet20")
    assert [len(getattr(r20, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert not hasattr(r20, "layer4")
    assert [n for n, _ in r20.named_modules() if n.endswith("downsample")] == [
        "layer2.0.downsample",
        "layer3.0.downsample",
    ]
    assert round(2 * count_macs(r20, torch.empty(1, 3, 32, 32, device="meta")) / 1e6, 1) == 81.6


def test_init_options() -> None:
    torch.manual_seed(0)
    paper = create_model("cifar_resnet20", init="trunc_normal")
    for m in paper.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert m.weight.abs().max() <= 0.02  # truncated at ±2 std
            assert 0.006 < m.weight.std() < 0.01
    assert torch.count_nonzero(paper.fc.bias) == 0
    zero = create_model("cifar_resnet20", zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for i in (1, 2, 3) for b in getattr(zero, f"layer{i}"))
    kaiming = create_model("cifar_resnet20")
    # kaiming normal, fan_out: std sqrt(2 / (out · k²)) = sqrt(2 / (16·9)) for the stem.
    assert math.isclose(kaiming.conv1.weight.std().item(), math.sqrt(2 / 144), rel_tol=0.15)


# ------------------------------------------------------------------------------------------------ load_model
def test_registry_listed_first() -> None:
    zoo = list_zoo_models()
    assert zoo == sorted(zoo)
    assert {f"cifar_resnet{d}" for d in (18, 20, 32, 34, 44, 50, 56)} | {"cifar_vgg11"} <= set(zoo)
    names = list_models()
    assert names[: len(zoo)] == zoo
    assert "resnet34" in names


def test_load_zoo_auto_is_random_with_warning() -> None:
    loaded = load_model("cifar_resnet18", "auto", in_channels=1, input_size=28)
    assert loaded.weights == "random"
    assert loaded.warning is not None
    assert "no pretrained weights exist for cifar_resnet18" in loaded.warning
    assert "python -m compress train" in loaded.warning
    assert "WEIGHTS=path" in loaded.warning
    assert loaded.input_shape == (1, 28, 28)
    assert loaded.num_classes == 10
    assert loaded.model.conv1.in_channels == 1
    default = load_model("cifar_resnet20_w0.5", "random", num_classes=100)
    assert default.input_shape == (3, 32, 32)
    assert default.warning is None
    assert default.num_classes == 100
    assert default.name == "cifar_resnet20_w0.5"


def test_load_zoo_imagenet_is_an_error() -> None:
    with pytest.raises(UserInputError, match="no pretrained weights exist for the zoo model cifar_resnet34"):
        load_model("cifar_resnet34", "imagenet")


def test_load_zoo_weights_round_trip(tmp_path: Path) -> None:
    source = load_model("cifar_resnet20", "random", seed=1, in_channels=1).model
    with torch.no_grad():  # non-trivial BN statistics so eval outputs depend on them
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = load_model("cifar_resnet20", str(tmp_path / "w.pt"), seed=2, in_channels=1, input_size=28)
    assert loaded.weights == str(tmp_path / "w.pt")
    assert loaded.warning is None
    x = torch.randn(2, *loaded.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), source(x), rtol=0, atol=0)
    with pytest.raises(UserInputError, match="does not match the model"):
        load_model("cifar_resnet20", str(tmp_path / "w.pt"))  # 3-channel stem vs the file's 1-channel one


def test_load_zoo_is_seeded() -> None:
    a = load_model("cifar_resnet20", "random", seed=5).model.state_dict()
    b = load_model("cifar_resnet20", "random", seed=5).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_name_suggests_zoo_model() -> None:
    with pytest.raises(UserInputError, match=r"unknown model 'cifar_resnet19' \(did you mean cifar_resnet18"):
        load_model("cifar_resnet19", "random")


def test_torchvision_in_channels() -> None:
    with pytest.raises(UserInputError, match="3 channels"):
        load_model("resnet18", "auto", in_channels=1)
    loaded = load_model("resnet18", "random", in_channels=1, num_classes=10, input_size=32)
    assert loaded.input_shape == (1, 32, 32)
    stem = loaded.model.conv1
    assert (stem.in_channels, stem.kernel_size, stem.stride, stem.padding) == (1, (7, 7), (2, 2), (3, 3))
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    assert load_model("resnet18", "random", in_channels=3, input_size=32).input_shape == (3, 32, 32)


def test_cifar_vgg11_has_an_fc_heavy_head_and_takes_28_and_32_pixel_inputs() -> None:
    model = create_model("cifar_vgg11_w0.25", num_classes=10, in_channels=1).eval()
    convs = 9 * (1 * 16 + 16 * 32 + 32 * 64 + 64 * 64 + 64 * 128 + 3 * 128 * 128)
    bn = 2 * (16 + 32 + 64 + 64 + 4 * 128)
    fc = (128 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == convs + bn + fc == 911_354
    assert sum(p.numel() for p in model.classifier.parameters()) == fc
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
        assert create_model("cifar_vgg11", num_classes=100)(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
