"""Tests for export.onnx: the exporter, its loader twin, save/load and graph_summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import (
    ALLOWED_CNN_OPS,
    SharedFactorNet,
    SmallCNN,
    factorized_chain,
    float_info,
    initializer_consumers,
    make_model,
    n_batchnorms,
    op_counts,
    ort_run,
    randomize_bn_,
    seeded,
)
from onnx import helper
from torch import nn

from export import (
    OnnxFromTorch,
    check_onnx_parity,
    graph_summary,
    load_onnx,
    onnx_from_torch,
    optimize,
    save_onnx,
)
from lowrank_core.errors import UserInputError

TIGHT = {"atol": 1e-5, "rtol": 1e-4}  # small models: float32 rounding is ~1e-7 here


# ------------------------------------------------------------------------------------------------
# onnx_from_torch
# ------------------------------------------------------------------------------------------------


def test_weights_are_initializers_and_opset(resnet18_case):
    model, raw = resnet18_case.model, resnet18_case.raw
    assert [i.name for i in raw.graph.input] == ["input"]
    assert [o.name for o in raw.graph.output] == ["output"]
    assert graph_summary(raw)["opset"] >= 17
    assert all(init.data_location == onnx.TensorProto.DEFAULT for init in raw.graph.initializer)
    # Optimized graph: every parameter is an initializer; each BN's 2C affine params become C biases.
    n_params = sum(p.numel() for p in model.parameters())
    n_bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert graph_summary(resnet18_case.optimized)["n_params"] == n_params - n_bn_channels


def test_export_restores_each_module_training_flag():
    model = seeded(SmallCNN)
    model.train()
    model.block.eval()  # mixed modes must survive
    before = [m.training for m in model.modules()]
    onnx_from_torch(model, torch.zeros(1, 3, 16, 16))
    assert [m.training for m in model.modules()] == before


def test_export_uses_eval_mode_batchnorm():
    model = seeded(SmallCNN)
    model.train()  # exporting in train mode would bake batch statistics into the graph
    randomize_bn_(model)
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16), dtype=np.float32)
    proto = onnx_from_torch(model, torch.zeros(2, 3, 16, 16))
    with torch.inference_mode():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_run(proto, x)[0], expected, atol=1e-5, rtol=1e-4)


def test_shared_parameter_is_one_initializer_with_several_conv_consumers():
    model = seeded(SharedFactorNet)
    assert model.blocks[0][0].weight is model.blocks[1][0].weight
    proto = optimize(onnx_from_torch(model, torch.zeros(1, 3, 16, 16)))
    consumers = initializer_consumers(proto)
    by_shape = {tuple(i.dims): i.name for i in proto.graph.initializer}
    reduce_name, expand_name = by_shape[(4, 16, 1, 1)], by_shape[(16, 4, 1, 1)]
    # exactly one initializer of each factor's shape, consumed by the two Conv nodes of the blocks
    assert sum(tuple(i.dims) == (4, 16, 1, 1) for i in proto.graph.initializer) == 1
    assert sum(tuple(i.dims) == (16, 4, 1, 1) for i in proto.graph.initializer) == 1
    assert consumers[reduce_name] == ["Conv", "Conv"]
    assert consumers[expand_name] == ["Conv", "Conv"]
    assert graph_summary(proto)["shared_initializers"] == {reduce_name: 2, expand_name: 2}
    check_onnx_parity(model, proto, input_shape=(1, 3, 16, 16), **TIGHT)


def test_shared_factor_keeps_its_batchnorms():
    model = seeded(lambda: SharedFactorNet(bn=True))
    randomize_bn_(model)
    assert n_batchnorms(model) == 5  # stem + 2 blocks x (after reduce, after expand)
    proto = optimize(onnx_from_torch(model, torch.zeros(1, 3, 16, 16)))
    counts = op_counts(proto)
    # the stem BN is folded; the four BNs behind shared factors stay, so the factors stay shared
    assert counts["BatchNormalization"] == 4
    assert sorted(graph_summary(proto)["shared_initializers"].values()) == [2, 2]
    check_onnx_parity(model, proto, input_shape=(1, 3, 16, 16), **TIGHT)


def test_factorized_chain_exports_as_convs_only():
    model = seeded(factorized_chain)
    proto = optimize(onnx_from_torch(model, torch.zeros(1, 16, 12, 12)))
    assert op_counts(proto) == {"Conv": 3}
    kernels = [list(helper.get_node_attr_value(n, "kernel_shape")) for n in proto.graph.node]
    assert kernels == [[1, 1], [3, 3], [1, 1]]
    check_onnx_parity(model, proto, input_shape=(1, 16, 12, 12), **TIGHT)


def test_dynamic_batch_runs_at_batch_1_and_3():
    model = seeded(SmallCNN)
    randomize_bn_(model).eval()
    proto = optimize(onnx_from_torch(model, torch.zeros(1, 3, 16, 16), dynamic_batch=True))
    summary = graph_summary(proto)
    assert isinstance(summary["inputs"]["input"][0], str)
    assert summary["inputs"]["input"][1:] == [3, 16, 16]
    assert set(op_counts(proto)) <= ALLOWED_CNN_OPS  # no Shape/Reshape plumbing for the symbolic batch
    for batch in (1, 3):
        result = check_onnx_parity(model, proto, input_shape=(batch, 3, 16, 16), **TIGHT)
        assert result.shape == (2 * batch, 5)


def test_static_batch_rejects_another_batch():
    model = seeded(SmallCNN).eval()
    proto = onnx_from_torch(model, torch.zeros(1, 3, 16, 16))
    with pytest.raises(UserInputError, match=r"does not match the ONNX input"):
        check_onnx_parity(model, proto, input_shape=(3, 3, 16, 16))


def test_loader_is_lazy_and_matches_function():
    model = seeded(factorized_chain)
    calls = []

    def make_input():
        calls.append(1)
        return torch.zeros(1, 16, 8, 8)

    loader = OnnxFromTorch(lambda: model, make_input, dynamic_batch=True)
    assert calls == []  # nothing happens at construction
    proto = loader()
    assert calls == [1]
    direct = onnx_from_torch(model, torch.zeros(1, 16, 8, 8), dynamic_batch=True)
    assert graph_summary(proto) | {"proto_bytes": 0} == graph_summary(direct) | {"proto_bytes": 0}


@pytest.mark.parametrize(
    ("model", "example", "match"),
    [
        (lambda x: x, torch.zeros(1, 3), "needs a torch.nn.Module"),
        (nn.Linear(3, 2), torch.zeros(1, 3, dtype=torch.long), "floating-point"),
        (nn.Linear(3, 2).double(), torch.zeros(1, 3), r"float64 on cpu.*model\.float\(\)\.cpu\(\)"),
    ],
    ids=["not-a-module", "integer-input", "float64-model"],
)
def test_bad_inputs_raise_user_error(model, example, match):
    with pytest.raises(UserInputError, match=match):
        onnx_from_torch(model, example)


def test_opset_below_exporter_minimum_is_rejected():
    with pytest.raises(UserInputError, match=r"opset 17 is below 18.*optimize\(model, opset=17\)"):
        onnx_from_torch(nn.Linear(3, 2), torch.zeros(1, 3), opset=17)


# ------------------------------------------------------------------------------------------------
# save_onnx / load_onnx / graph_summary
# ------------------------------------------------------------------------------------------------


def test_save_and_load_roundtrip(tmp_path, resnet18_case):
    path = save_onnx(resnet18_case.optimized, tmp_path / "sub" / "m.onnx")
    assert path == tmp_path / "sub" / "m.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx"]  # no temp file left behind
    loaded = load_onnx(path)
    assert loaded.SerializeToString() == resnet18_case.optimized.SerializeToString()
    summary = graph_summary(loaded, path=path)
    assert summary["file_bytes"] == path.stat().st_size == resnet18_case.optimized.ByteSize()
    assert summary["node_counts"] == {
        "Conv": 20,
        "Relu": 17,
        "Add": 8,
        "MaxPool": 1,
        "GlobalAveragePool": 1,
        "Flatten": 1,
        "Gemm": 1,
    }


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"this is not an onnx model\n" * 4, "not a (readable|valid) ONNX model|is not an ONNX model"),
        (helper.make_tensor("t", onnx.TensorProto.FLOAT, [2], [1, 2]).SerializeToString(), "ONNX model"),
    ],
    ids=["missing", "empty", "garbage", "other-protobuf"],
)
def test_load_onnx_bad_files_raise_one_line_user_error(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserInputError, match=match) as info:
        load_onnx(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message


def test_graph_summary_counts_bytes_params_and_sharing():
    w = np.ones((4, 3, 1, 1), np.float32)
    shape = np.array([1, 4 * 8 * 8], np.int64)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["a"]),
            helper.make_node("Conv", ["x", "w"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["c"]),
            helper.make_node("Reshape", ["c", "shape"], ["y"]),
        ],
        [float_info("x", ["n", 3, 8, 8])],
        [float_info("y", [1, 256])],
        {"w": w, "shape": shape},
    )
    summary = graph_summary(model)
    assert summary["node_counts"] == {"Conv": 2, "Add": 1, "Reshape": 1}
    assert summary["n_nodes"] == 4
    assert summary["n_initializers"] == 2
    assert summary["initializer_bytes"] == 12 * 4 + 2 * 8
    assert summary["n_params"] == 12  # float initializers only
    assert summary["shared_initializers"] == {"w": 2}
    assert summary["inputs"] == {"x": ["n", 3, 8, 8]}
    assert summary["opset"] == 18
    assert summary["file_bytes"] is None


def test_import_export_is_light_and_side_effect_free():
    # numpy/onnx install their own warning filters at import; measure what `export` itself adds.
    code = (
        "import sys, logging, warnings, numpy, onnx, onnx_graphsurgeon\n"
        "before = (list(warnings.filters), logging.root.level, len(logging.root.handlers))\n"
        "import export\n"
        "heavy = sorted(m for m in ('torch', 'onnxruntime', 'torchvision', 'onnxscript') if m in sys.modules)\n"
        "print(heavy, (list(warnings.filters), logging.root.level, len(logging.root.handlers)) == before)"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[] True"
