"""Tests for export.passes.

Each pass is shown non-vacuous (target pattern present before, gone after) and output-preserving
(ONNX Runtime before vs after, tolerance stated per test).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from export_helpers import (
    ALLOWED_CNN_OPS,
    float_info,
    initializer_consumers,
    make_model,
    op_counts,
    ort_run,
    raw_dynamo_export,
    tv_model,
)
from onnx import TensorProto, helper

from export import (
    check_onnx_parity,
    cleanup,
    dedupe_initializers,
    fold_batchnorm,
    graph_summary,
    optimize,
    reduce_mean_to_global_pool,
    remove_noops,
    reshape_to_flatten,
)
from lowrank_core.errors import ExportError

EXACT = {"atol": 1e-5, "rtol": 1e-5}  # small hand-built graphs: folding changes only float32 rounding


def apply(model: onnx.ModelProto, *passes) -> onnx.ModelProto:
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))  # as optimize() does
    for graph_pass in passes:
        assert graph_pass(graph) is graph  # passes return the graph they were given
    out = gs.export_onnx(cleanup(graph))
    out.ir_version = model.ir_version
    onnx.checker.check_model(out, full_check=True)
    return out


def rng_array(shape, seed, low=None, high=None) -> np.ndarray:
    gen = np.random.default_rng(seed)
    if low is not None:
        return gen.uniform(low, high, shape).astype(np.float32)
    return gen.standard_normal(shape).astype(np.float32)


def bn_inputs(prefix: str, channels: int, seed: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_scale": rng_array(channels, seed, 0.5, 1.5),
        f"{prefix}_bias": rng_array(channels, seed + 1),
        f"{prefix}_mean": rng_array(channels, seed + 2),
        f"{prefix}_var": rng_array(channels, seed + 3, 0.5, 1.5),
    }


def bn_node(prefix: str, x: str, y: str, eps: float = 1e-3) -> onnx.NodeProto:
    names = [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], epsilon=eps)


# ------------------------------------------------------------------------------------------------
# fold_batchnorm
# ------------------------------------------------------------------------------------------------


def test_fold_batchnorm_into_conv_without_bias():
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn_node("bn", "c", "y")],
        [float_info("x", [2, 3, 8, 8])],
        [float_info("y", [2, 4, 8, 8])],
        {"w": rng_array((4, 3, 3, 3), 0), **bn_inputs("bn", 4, 10)},
    )
    x = rng_array((2, 3, 8, 8), 99)
    folded = apply(model, fold_batchnorm)
    assert op_counts(model)["BatchNormalization"] == 1
    assert op_counts(folded) == {"Conv": 1}
    assert len(folded.graph.node[0].input) == 3  # a bias was created
    np.testing.assert_allclose(ort_run(folded, x)[0], ort_run(model, x)[0], **EXACT)


def test_fold_batchnorm_into_grouped_conv_transpose_with_bias():
    model = make_model(
        [
            helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=2, strides=[2, 2]),
            bn_node("bn", "c", "y"),
        ],
        [float_info("x", [1, 4, 5, 5])],
        [float_info("y", [1, 6, 11, 11])],
        {"w": rng_array((4, 3, 3, 3), 1), "b": rng_array(6, 2), **bn_inputs("bn", 6, 20)},
    )
    x = rng_array((1, 4, 5, 5), 98)
    folded = apply(model, fold_batchnorm)
    assert op_counts(folded) == {"ConvTranspose": 1}
    np.testing.assert_allclose(ort_run(folded, x)[0], ort_run(model, x)[0], **EXACT)


def test_fold_batchnorm_leaves_bn_of_shared_weight_and_keeps_sharing():
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c1"], pads=[1, 1, 1, 1]),
            bn_node("bn1", "c1", "a"),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Conv", ["r", "w"], ["c2"], pads=[1, 1, 1, 1]),
            bn_node("bn2", "c2", "y"),
        ],
        [float_info("x", [1, 4, 6, 6])],
        [float_info("y", [1, 4, 6, 6])],
        {"w": rng_array((4, 4, 3, 3), 3), **bn_inputs("bn1", 4, 30), **bn_inputs("bn2", 4, 40)},
    )
    out = apply(model, fold_batchnorm)
    assert op_counts(out)["BatchNormalization"] == 2
    assert initializer_consumers(out)["w"] == ["Conv", "Conv"]
    x = rng_array((1, 4, 6, 6), 97)
    np.testing.assert_array_equal(ort_run(out, x)[0], ort_run(model, x)[0])


def test_fold_batchnorm_skips_conv_output_with_other_consumers_and_unshares_bias():
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w1", "b"], ["c1"]),
            bn_node("bn1", "c1", "n1"),
            helper.make_node("Add", ["n1", "c1"], ["s"]),  # c1 also feeds Add: BN1 must stay
            helper.make_node("Conv", ["s", "w2", "b"], ["c2"]),  # bias "b" shared with the first conv
            bn_node("bn2", "c2", "y"),
        ],
        [float_info("x", [1, 4, 5, 5])],
        [float_info("y", [1, 4, 5, 5])],
        {
            "w1": rng_array((4, 4, 1, 1), 4),
            "w2": rng_array((4, 4, 1, 1), 5),
            "b": rng_array(4, 6),
            **bn_inputs("bn1", 4, 50),
            **bn_inputs("bn2", 4, 60),
        },
    )
    out = apply(model, fold_batchnorm)
    assert op_counts(out) == {"Conv": 2, "BatchNormalization": 1, "Add": 1}
    assert initializer_consumers(out)["b"] == ["Conv"]  # the folded conv got its own bias
    x = rng_array((1, 4, 5, 5), 96)
    np.testing.assert_allclose(ort_run(out, x)[0], ort_run(model, x)[0], **EXACT)


def test_optimize_folds_every_batchnorm_of_unfused_resnet18():
    model = tv_model("resnet18", seed=1)
    raw = raw_dynamo_export(model, torch.zeros(1, 3, 64, 64))  # the exporter's own BN fusion is off
    assert op_counts(raw)["BatchNormalization"] == 20
    out = optimize(raw)
    assert op_counts(out)["BatchNormalization"] == 0
    assert set(op_counts(out)) <= ALLOWED_CNN_OPS
    result = check_onnx_parity(model, out, input_shape=(1, 3, 64, 64))  # default atol/rtol
    assert result.rel_l2 < 1e-5
    assert result.top1_agreement == 1.0


def test_resnet18_optimized_graph_is_only_the_allowed_ops(resnet18_case):
    raw_ops = op_counts(resnet18_case.raw)
    assert {"ReduceMean", "Reshape"} <= set(raw_ops)  # what the exporter emits for avgpool + flatten
    counts = op_counts(resnet18_case.optimized)
    assert counts["BatchNormalization"] == 0
    assert set(counts) <= ALLOWED_CNN_OPS
    assert counts == {
        "Conv": 20,
        "Relu": 17,
        "Add": 8,
        "MaxPool": 1,
        "GlobalAveragePool": 1,
        "Flatten": 1,
        "Gemm": 1,
    }
    result = check_onnx_parity(resnet18_case.model, resnet18_case.optimized, input_shape=(1, 3, 64, 64))
    assert result.rel_l2 < 1e-5


def test_optimize_converts_to_opset_17(resnet18_case):
    out = optimize(resnet18_case.raw, opset=17)
    assert graph_summary(out)["opset"] == 17
    assert set(op_counts(out)) <= ALLOWED_CNN_OPS
    check_onnx_parity(resnet18_case.model, out, input_shape=(1, 3, 64, 64))


def test_optimize_turns_checker_failure_into_export_error():
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])], "bad", [float_info("x", [1])], [float_info("y", [1])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExportError, match=r"fails the ONNX checker.*NoSuchOp"):
        optimize(model)


# ------------------------------------------------------------------------------------------------
# dedupe_initializers
# ------------------------------------------------------------------------------------------------


def test_dedupe_initializers_merges_identical_constants_only():
    ones = np.ones((2, 2), np.float32)
    x = gs.Variable("x", np.float32, (2, 2))
    c1, c2, c3 = gs.Constant("c1", ones.copy()), gs.Constant("c2", ones * 2), gs.Constant("c3", ones.copy())
    c4 = gs.Constant("c4", np.ones(4, np.float32))  # same bytes as c1, other shape
    c5 = gs.Constant("c5", np.ones((2, 2), np.float64))  # same values as c1, other dtype
    tensors = [gs.Variable(f"t{i}", np.float32, (2, 2)) for i in range(3)]
    y = gs.Variable("y", np.float32, (2, 2))
    graph = gs.Graph(
        nodes=[
            gs.Node("Add", inputs=[x, c1], outputs=[tensors[0]]),
            gs.Node("Mul", inputs=[tensors[0], c2], outputs=[tensors[1]]),
            gs.Node("Sub", inputs=[tensors[1], c3], outputs=[tensors[2]]),
            gs.Node("Dummy", inputs=[tensors[2], c4, c5], outputs=[y]),
        ],
        inputs=[x],
        outputs=[y],
    )

    def constants():
        return sorted(n for n, t in graph.tensors().items() if isinstance(t, gs.Constant))

    assert constants() == ["c1", "c2", "c3", "c4", "c5"]
    assert dedupe_initializers(graph) is graph
    assert constants() == ["c1", "c2", "c4", "c5"]
    assert [node.op for node in c1.outputs] == ["Add", "Sub"]


def test_dedupe_initializers_restores_sharing_of_duplicated_factor():
    w = rng_array((4, 4, 1, 1), 7)
    model = make_model(
        [helper.make_node("Conv", ["x", "w_a"], ["a"]), helper.make_node("Conv", ["a", "w_b"], ["y"])],
        [float_info("x", [1, 4, 3, 3])],
        [float_info("y", [1, 4, 3, 3])],
        {"w_a": w, "w_b": w.copy()},  # what an exporter that copies a tied weight produces
    )
    assert len(model.graph.initializer) == 2
    out = apply(model, dedupe_initializers)
    assert len(out.graph.initializer) == 1
    assert graph_summary(out)["shared_initializers"] == {"w_a": 2}
    x = rng_array((1, 4, 3, 3), 95)
    np.testing.assert_array_equal(ort_run(out, x)[0], ort_run(model, x)[0])


# ------------------------------------------------------------------------------------------------
# remove_noops / reduce_mean_to_global_pool / reshape_to_flatten
# ------------------------------------------------------------------------------------------------


def test_remove_noops_bypasses_identities_and_keeps_output_name():
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Dropout", ["a"], ["b"]),
            helper.make_node("AveragePool", ["b"], ["c"], kernel_shape=[1, 1]),
            helper.make_node("Cast", ["c"], ["d"], to=TensorProto.FLOAT),
            helper.make_node("Relu", ["d"], ["e"]),
            helper.make_node("Identity", ["e"], ["y"]),
            helper.make_node("MaxPool", ["e"], ["z"], kernel_shape=[2, 2]),  # a real pool stays
        ],
        [float_info("x", [1, 2, 4, 4])],
        [float_info("y", [1, 2, 4, 4]), float_info("z", [1, 2, 3, 3])],
        {},
    )
    out = apply(model, remove_noops)
    assert op_counts(out) == {"Relu": 1, "Identity": 1, "MaxPool": 1}  # y needs e under its own name
    assert [o.name for o in out.graph.output] == ["y", "z"]
    x = rng_array((1, 2, 4, 4), 94)
    for got, want in zip(ort_run(out, x), ort_run(model, x), strict=True):
        np.testing.assert_array_equal(got, want)

    # When the bypassed output is the only use, the producer writes the graph output directly.
    single = make_model(
        [helper.make_node("Relu", ["x"], ["e"]), helper.make_node("Identity", ["e"], ["y"])],
        [float_info("x", [3])],
        [float_info("y", [3])],
        {},
    )
    out = apply(single, remove_noops)
    assert [(n.op_type, list(n.output)) for n in out.graph.node] == [("Relu", ["y"])]


def test_remove_noops_keeps_input_to_output_identity():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [float_info("x", [3])], [float_info("y", [3])], {})
    assert op_counts(apply(model, remove_noops)) == {"Identity": 1}


@pytest.mark.parametrize(
    ("axes", "keepdims", "expected_ops", "out_shape"),
    [
        ([2, 3], 1, {"GlobalAveragePool": 1}, [2, 3, 1, 1]),
        ([-1, -2], 0, {"GlobalAveragePool": 1, "Flatten": 1}, [2, 3]),
        ([1], 1, {"ReduceMean": 1}, [2, 1, 4, 5]),  # not spatial: left alone
    ],
)
def test_reduce_mean_to_global_pool(axes, keepdims, expected_ops, out_shape):
    model = make_model(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)],
        [float_info("x", [2, 3, 4, 5])],
        [float_info("y", out_shape)],
        {"axes": np.array(axes, np.int64)},
    )
    out = apply(model, reduce_mean_to_global_pool)
    assert op_counts(out) == expected_ops
    x = rng_array((2, 3, 4, 5), 93)
    np.testing.assert_allclose(ort_run(out, x)[0], ort_run(model, x)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("target", "expected_ops"),
    [
        ([-1, 12], {"Flatten": 1}),
        ([0, 12], {"Flatten": 1}),
        ([12, -1], {"Reshape": 1}),  # batch not first: not a flatten
        ([-1, 6], {"Reshape": 1}),  # another split of the same elements
    ],
)
def test_reshape_to_flatten(target, expected_ops):
    out_shape = ["n", 12] if target[1] == 12 else ["a", "b"]
    model = make_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [float_info("x", ["n", 3, 2, 2])],
        [float_info("y", out_shape)],
        {"shape": np.array(target, np.int64)},
    )
    out = apply(model, reshape_to_flatten)
    assert op_counts(out) == expected_ops
    x = rng_array((2, 3, 2, 2), 92)
    if target in ([-1, 12], [0, 12]):
        np.testing.assert_array_equal(ort_run(out, x)[0], x.reshape(2, 12))
