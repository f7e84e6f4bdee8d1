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
from export_helpers import SmallCNN, randomize_bn_, seeded
from onnx import numpy_helper

from export import DEFAULT_ATOL, DEFAULT_RTOL, check_onnx_parity, compare_outputs, onnx_from_torch, optimize
from lowrank_deploy.errors import ParityError, UserInputError

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
