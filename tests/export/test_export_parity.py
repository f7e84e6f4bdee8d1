"""Tests for export.parity.

Polygraphy elementwise semantics on constructed arrays (exact numbers), structured results, and the
ONNX Runtime vs PyTorch check.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from export_helpers import SmallCNN, randomize_bn_, seeded
from onnx import numpy_helper

from export import DEFAULT_ATOL, DEFAULT_RTOL, check_onnx_parity, compare_outputs, onnx_from_torch, optimize
from export.parity import DEFAULT_SCALE_TOL
from lowrank_core.errors import ParityError, UserInputError

# absdiff = [0, .25, 0, .0625, .5], reldiff = [0, .125, 0, inf, .0625]; all exactly representable.
REF = np.array([1.0, 2.0, -4.0, 0.0, 8.0])
ACT = np.array([1.0, 2.25, -4.0, 0.0625, 8.5])


def test_compare_outputs_statistics_are_exact():
    result = compare_outputs(REF, ACT, atol=0.25, rtol=0.0625)
    assert result.passed  # every element is within atol or within rtol (boundaries inclusive)
    assert bool(result) is True
    assert result.max_abs == 0.5
    assert result.mean_abs == 0.1625
    assert result.median_abs == 0.0625
    assert result.max_rel == math.inf  # 0.0625 off a zero reference
    assert result.mean_rel == pytest.approx((0.125 + 0.0625) / 4, rel=1e-15)  # non-zero references
    assert result.rel_l2 == pytest.approx(math.sqrt(0.0625 + 0.0625**2 + 0.25) / math.sqrt(85), rel=1e-15)
    expected_cos = float(REF @ ACT / (np.linalg.norm(REF) * np.linalg.norm(ACT)))
    assert result.cosine == pytest.approx(expected_cos, rel=1e-15)
    assert result.top1_agreement is None  # 1-D
    assert (result.n_elements, result.shape, result.n_failed) == (5, (5,), 0)


def test_compare_outputs_fails_only_when_both_tolerances_are_exceeded():
    result = compare_outputs(REF, ACT, atol=0.25, rtol=0.0624)
    assert not result.passed
    assert bool(result) is False
    assert result.n_failed == 1  # only 8.0 -> 8.5: absdiff .5 > .25 and reldiff .0625 > .0624
    assert result.required_rtol == 0.0625  # at atol=.25 only the .5 difference needs rtol
    assert result.required_atol == 0.5  # at rtol=.0624: max absdiff over .25/.0625/.5 elements
    assert compare_outputs(REF, ACT, atol=0.5, rtol=0.0).passed
    assert compare_outputs(REF, ACT, atol=0.0, rtol=1e9).passed is False  # 0 vs .0625: infinite reldiff
    text = str(result)
    assert "\n" not in text
    assert "FAILED (1/5 elements)" in text
    assert "max_abs=0.5" in text
    assert "rtol>=0.0625" in text


def test_compare_outputs_top1_and_to_dict():
    ref = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]], np.float32)
    act = np.array([[0.1, 0.8, 0.85], [0.5, 0.2, 0.3]], np.float32)
    result = compare_outputs(ref, act, atol=1e-3, rtol=1e-3)
    assert result.top1_agreement == 0.5
    assert result.n_failed == 2  # 0.9 -> 0.8 and 0.0 -> 0.85
    data = result.to_dict()
    assert data["max_rel"] is None  # inf is not JSON; reported as null
    assert data["shape"] == [2, 3]
    assert data["passed"] is False
    assert json.loads(json.dumps(data)) == data
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.passed = True  # type: ignore[misc]


def test_compare_outputs_treats_nan_as_failure_unless_both_nan():
    assert not compare_outputs([1.0, 2.0], [1.0, np.nan], atol=1.0, rtol=1.0).passed
    assert compare_outputs([1.0, np.nan], [1.0, np.nan], atol=0.0, rtol=0.0).passed
    assert compare_outputs([np.inf], [np.inf], atol=0.0, rtol=0.0).passed


def test_compare_outputs_shape_mismatch_names_both_shapes():
    with pytest.raises(ParityError, match=r"reference \[2, 3\] vs actual \[3, 2\]"):
        compare_outputs(np.zeros((2, 3)), np.zeros((3, 2)), atol=1, rtol=1)


@pytest.mark.parametrize("tol", [-1.0, math.nan, math.inf])
def test_compare_outputs_rejects_bad_tolerance(tol):
    with pytest.raises(UserInputError, match="atol must be a finite number"):
        compare_outputs([1.0], [1.0], atol=tol, rtol=0.0)


# ------------------------------------------------------------------------------------------------
# check_onnx_parity
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_case():
    model = randomize_bn_(seeded(SmallCNN)).eval()
    return model, optimize(onnx_from_torch(model, torch.zeros(2, 3, 16, 16)))


def test_check_onnx_parity_passes_and_is_deterministic(small_case, tmp_path):
    model, proto = small_case
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    model.train()
    result = check_onnx_parity(model, proto, input_shape=(2, 3, 16, 16), batches=3, seed=5)
    assert model.training  # mode restored
    assert torch.equal(torch.random.get_rng_state(), torch_state)  # global RNGs untouched
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert result.passed
    assert result.shape == (6, 5)  # 3 batches of 2, concatenated
    assert (result.atol, result.rtol) == (DEFAULT_ATOL, DEFAULT_RTOL)
    assert result.max_abs < 1e-5
    assert result.cosine > 1 - 1e-9
    assert result.top1_agreement == 1.0

    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    from_path = check_onnx_parity(model, path, input_shape=(2, 3, 16, 16), batches=3, seed=5)
    assert from_path.to_dict() == result.to_dict()  # same seed -> same inputs -> same numbers


def test_check_onnx_parity_raises_with_numbers_past_tolerance(small_case):
    model, proto = small_case
    broken = type(proto)()
    broken.CopyFrom(proto)
    conv_weight = next(i for i in broken.graph.initializer if len(i.dims) == 4)
    conv_weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(conv_weight) * 1.01, conv_weight.name))

    with pytest.raises(ParityError, match=r"differs from PyTorch: FAILED .*max_abs=.*would pass with atol>="):
        check_onnx_parity(model, broken, input_shape=(2, 3, 16, 16))
    result = check_onnx_parity(model, broken, input_shape=(2, 3, 16, 16), raise_on_failure=False)
    assert not result
    assert result.max_abs > DEFAULT_ATOL
    assert 1e-4 < result.rel_l2 < 5e-2  # a 1 % weight change shows up at the percent level


def test_check_onnx_parity_rejects_bad_arguments(small_case, tmp_path):
    model, proto = small_case
    with pytest.raises(UserInputError, match="does not exist"):
        check_onnx_parity(model, tmp_path / "missing.onnx", input_shape=(2, 3, 16, 16))
    with pytest.raises(UserInputError, match="batches must be >= 1"):
        check_onnx_parity(model, proto, input_shape=(2, 3, 16, 16), batches=0)
    with pytest.raises(UserInputError, match=r"does not match the ONNX input 'input' \[2, 3, 16, 16\]"):
        check_onnx_parity(model, proto, input_shape=(2, 3, 17, 16))


# ------------------------------------------------------------------------------------------------
# The output-scaled criterion (issue 22: deeplabv3_resnet101's dense export was refused)
# ------------------------------------------------------------------------------------------------


def _large_output_with_rounding() -> tuple[np.ndarray, np.ndarray, float]:
    """A reference of RMS ~700 crossing zero, and a copy off by float32-sized rounding (<= 4e-6 of the RMS)."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(100_000) * 700.0
    ref[:50] = np.linspace(-0.5, 0.5, 50)  # values near zero crossings, as a segmentation map has
    noise = rng.uniform(-1.0, 1.0, ref.size)
    scale = float(np.sqrt(np.mean(ref**2)))
    return ref, ref + 4e-6 * scale * noise, scale


def test_scaled_criterion_accepts_float32_rounding_of_a_large_output():
    ref, act, scale = _large_output_with_rounding()
    absdiff = np.abs(act - ref)
    expected_elementwise = int(np.sum((absdiff > 1e-3) & (absdiff > 1e-3 * np.abs(ref))))
    assert expected_elementwise > 0  # Polygraphy's rule refuses this correct output ...
    result = compare_outputs(ref, act, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL, scale_tol=DEFAULT_SCALE_TOL)
    assert result.passed  # ... the scaled one does not: every difference is <= 4e-6 x RMS
    assert not result.passed_elementwise
    assert result.n_failed_elementwise == expected_elementwise
    assert result.n_failed == 0
    assert result.scale == pytest.approx(scale, rel=1e-12)
    assert result.max_abs_scaled == pytest.approx(absdiff.max() / scale, rel=1e-12)
    assert result.max_abs_scaled <= 4e-6
    assert result.rel_l2 < 3e-6
    assert result.required_scale_tol == pytest.approx(np.max(absdiff[absdiff > 1e-3 * np.abs(ref)]) / scale)
    assert f"atol/rtol alone would fail {expected_elementwise} elements" in str(result)
    data = result.to_dict()
    assert data["n_failed_elementwise"] == expected_elementwise
    assert data["passed_elementwise"] is False
    assert data["scale_tol"] == DEFAULT_SCALE_TOL
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize(
    ("perturb", "n_failed"),
    [
        (lambda a, s: np.concatenate([a[:10], a[10:11] + 0.01 * s, a[11:]]), 1),  # one element off by 1 % of scale
        (lambda a, s: a * 1.001, None),  # a 0.1 % gain error, e.g. a mis-folded BatchNorm
    ],
)
def test_scaled_criterion_still_fails_a_wrong_output(perturb, n_failed):
    ref, act, scale = _large_output_with_rounding()
    wrong = perturb(act, scale)
    result = compare_outputs(ref, wrong, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL, scale_tol=DEFAULT_SCALE_TOL)
    assert not result.passed
    assert result.max_abs_scaled > 10 * DEFAULT_SCALE_TOL
    if n_failed is not None:
        assert result.n_failed == n_failed
    assert result.n_failed <= result.n_elements
    assert f"scale_tol>={result.required_scale_tol:.3g}" in str(result)


def test_scale_tol_zero_is_polygraphys_rule():
    result = compare_outputs(REF, ACT, atol=0.25, rtol=0.0624, scale_tol=0.0)
    assert (result.passed, result.n_failed, result.n_failed_elementwise) == (False, 1, 1)
    # 8.0 -> 8.5 is .5 off an RMS of sqrt(85/5): passes once scale_tol covers .5 / sqrt(17)
    assert result.required_scale_tol == pytest.approx(0.5 / math.sqrt(17), rel=1e-12)
    assert compare_outputs(REF, ACT, atol=0.25, rtol=0.0624, scale_tol=0.5 / math.sqrt(17)).passed


class _Scaled(torch.nn.Module):
    def __init__(self, gain: float, outputs: int = 1, small_gain: float = 1.0) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 3, padding=1))
        self.gain, self.small_gain = gain, small_gain
        if outputs > 1:
            self.output_names = ("big", "small")

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.body(x)
        if getattr(self, "output_names", None):
            return y * self.gain, y[:, :2] * self.small_gain
        return y * self.gain


def test_large_magnitude_export_passes_and_a_perturbed_one_fails():
    model = seeded(lambda: _Scaled(gain=3000.0)).eval()
    proto = optimize(onnx_from_torch(model, torch.zeros(1, 3, 16, 16)))
    result = check_onnx_parity(model, proto, input_shape=(1, 3, 16, 16))
    assert result.passed
    assert result.scale > 100  # a large-scale output, as deeplabv3 with random weights gives
    assert result.max_abs_scaled < 1e-5
    assert result.outputs["output"]["scale"] == result.scale

    broken = type(proto)()
    broken.CopyFrom(proto)
    weight = next(i for i in broken.graph.initializer if len(i.dims) == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.001, weight.name))
    bad = check_onnx_parity(model, broken, input_shape=(1, 3, 16, 16), raise_on_failure=False)
    assert not bad.passed
    assert bad.max_abs_scaled > 10 * DEFAULT_SCALE_TOL


def test_each_named_output_is_judged_at_its_own_scale():
    """A 1 % error in a small output fails even beside an output 1e4 times larger."""
    model = seeded(lambda: _Scaled(gain=1e4, outputs=2)).eval()
    same = optimize(onnx_from_torch(model, torch.zeros(1, 3, 16, 16)))
    assert check_onnx_parity(model, same, input_shape=(1, 3, 16, 16)).passed
    other = seeded(lambda: _Scaled(gain=1e4, outputs=2, small_gain=1.01)).eval()
    proto = optimize(onnx_from_torch(other, torch.zeros(1, 3, 16, 16)))
    result = check_onnx_parity(model, proto, input_shape=(1, 3, 16, 16), raise_on_failure=False)
    assert not result.passed
    assert result.outputs["big"]["passed"] is True
    assert result.outputs["small"]["passed"] is False
    assert result.outputs["big"]["scale"] > 1000 * result.outputs["small"]["scale"]
    assert result.n_failed == result.outputs["small"]["n_failed"]
    with pytest.raises(ParityError, match=r"\(outputs small\)"):
        check_onnx_parity(model, proto, input_shape=(1, 3, 16, 16))


# ------------------------------------------------------------------------------------------------
# Non-finite outputs are named as such
# ------------------------------------------------------------------------------------------------


def test_nan_outputs_are_counted_once_and_named():
    model = torch.nn.Linear(4, 1000).eval()
    with torch.no_grad():
        model.weight[:, 0] = float("nan")
    proto = onnx_from_torch(model, torch.zeros(1, 4))
    result = check_onnx_parity(model, proto, input_shape=(1, 4), raise_on_failure=False)
    assert not result.passed
    assert (result.n_failed, result.n_elements, result.n_nonfinite) == (2000, 2000, 2000)  # not 4000/2000
    assert result.nonfinite == {"reference": {"nan": 2000, "inf": 0}, "actual": {"nan": 2000, "inf": 0}}
    text = str(result)
    assert text.startswith("FAILED (2000/2000 elements): PyTorch output 'output' has 2000 NaN values (of 2000)")
    assert "the PyTorch model itself computes non-finite values" in text
    assert "running_var < 0" in text
    assert "would pass" not in text  # no tolerance makes NaN pass
    with pytest.raises(ParityError, match=r"PyTorch output 'output' has 2000 NaN values"):
        check_onnx_parity(model, proto, input_shape=(1, 4))


def test_nan_only_in_the_onnx_model_blames_the_export(small_case):
    model, proto = small_case
    broken = type(proto)()
    broken.CopyFrom(proto)
    bias = next(i for i in broken.graph.initializer if len(i.dims) == 1 and i.dims[0] == 5)  # the classifier's
    values = numpy_helper.to_array(bias).copy()
    values[1] = np.inf
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    result = check_onnx_parity(model, broken, input_shape=(2, 3, 16, 16), raise_on_failure=False)
    assert not result.passed
    assert result.nonfinite["reference"] == {"nan": 0, "inf": 0}
    assert result.nonfinite["actual"]["inf"] == 4  # column 1 of 2 batches of 2
    assert result.n_failed == 4
    assert "ONNX Runtime output 'output' has 4 infinite values (of 20)" in str(result)
    assert "the PyTorch values are all finite, so the ONNX Runtime model computes something else" in str(result)


def test_negative_batchnorm_variance_gives_nan_outputs_and_is_named_at_load(tmp_path):
    """The statistic that explains NaN outputs is refused when the weights are loaded, naming the tensor."""
    from compress.models import load_model

    model = randomize_bn_(seeded(SmallCNN)).eval()
    with torch.no_grad():
        model.block[1].running_var[2] = -0.5  # impossible: a variance
    proto = onnx_from_torch(model, torch.zeros(2, 3, 16, 16))
    result = check_onnx_parity(model, proto, input_shape=(2, 3, 16, 16), raise_on_failure=False)
    assert not result.passed  # sqrt(-0.5 + eps) is NaN on both sides, and it spreads to every logit
    assert result.nonfinite["reference"]["nan"] == result.n_elements == result.n_failed == 20

    factory = tmp_path / "bad_bn.py"
    factory.write_text(
        "import torch\nfrom torch import nn\n\n\ndef build():\n"
        "    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
        "    with torch.no_grad():\n        model[1].running_var[1:3] = -0.25\n    return model\n"
    )
    with pytest.raises(
        UserInputError,
        match=r"^the model '.*bad_bn\.py:build' \(weights random\) holds an impossible "
        r"BatchNorm statistic: 1\.running_var has 2 of 4 values below 0 \(min -0\.25\)",
    ):
        load_model(f"{factory}:build", "random")

    weights = tmp_path / "resnet18.pt"
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer2.0.bn1.running_var"][0] = -1.0
    torch.save(state, weights)
    with pytest.raises(
        UserInputError,
        match=r"weights file '.*resnet18\.pt' holds an impossible BatchNorm "
        r"statistic: layer2\.0\.bn1\.running_var has 1 of 128 values below 0 \(min -1\)",
    ):
        load_model("resnet18", str(weights))
    assert load_model("resnet18", "random").model is not None  # torchvision's own statistics pass
