"""ONNX export of collaborative-compression (cc) models: Gather + stock Conv graphs, BN folded, ORT parity."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from export_helpers import op_counts, ort_run, randomize_bn_, seeded
from onnx import numpy_helper
from torch import nn

from compress.methods.cc import DECOMP, ChannelSelect, CollaborativeConfig, cc_compress_
from compress.metrics import count_macs
from compress.zoo import create_model
from export import check_onnx_parity, onnx_from_torch, optimize

SHAPE = (1, 3, 16, 16)
#: What a cc ResNet may contain after export + optimize: the gathers of residual-stream inputs, convs (BN folded).
ALLOWED = frozenset({"Gather", "Conv", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"})


@pytest.fixture(scope="module", params=[True, False], ids=["prune+decompose", "prune-only"])
def cc_case(request) -> tuple[nn.Module, onnx.ModelProto, dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = randomize_bn_(seeded(lambda: create_model("cifar_resnet20_w0.5", num_classes=10)), 0).eval()
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn(16, *SHAPE[1:], generator=gen), torch.randint(0, 10, (16,), generator=gen))]
        config = CollaborativeConfig(flops=0.5, decompose=request.param)
        plan = cc_compress_(model, config, torch.zeros(SHAPE), batches, model_name="r20")
    finally:
        torch.set_num_threads(before)
    return model.eval(), optimize(onnx_from_torch(model, torch.zeros(SHAPE))), plan.to_dict()


def test_cc_graph_is_gather_and_stock_convs_with_bn_folded(cc_case) -> None:
    model, proto, plan = cc_case
    ops = op_counts(proto)
    assert set(ops) <= ALLOWED, ops
    assert "BatchNormalization" not in ops
    gathered = [e for e in plan["layers"] if e["info"].get("input") == "gather"]
    assert gathered  # conv1 of the blocks / the projections read the residual stream
    assert len(gathered) == sum(isinstance(m, ChannelSelect) for m in model.modules())
    # conv1 and the projection of a block read the same tensor: equal index sets are one Gather after CSE
    distinct = {(e["path"].split(".conv1")[0].split(".downsample")[0], tuple(e["info"]["in_keep"])) for e in gathered}
    assert ops["Gather"] == len(distinct)
    assert ops["Conv"] == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    decomposed = sum(e["action"] == DECOMP for e in plan["layers"])
    assert ops["Conv"] == 21 + decomposed  # 21 convs in ResNet-20, one more per decomposed layer
    # the Gather indices are the plan's kept channels, stored as int64 initializers
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    found = sorted(tuple(inits[n.input[1]].tolist()) for n in proto.graph.node if n.op_type == "Gather")
    assert found == sorted(keep for _, keep in distinct)
    assert all(inits[n.input[1]].dtype == np.int64 for n in proto.graph.node if n.op_type == "Gather")


def test_cc_onnx_matches_pytorch_and_the_planned_macs(cc_case) -> None:
    model, proto, plan = cc_case
    result = check_onnx_parity(model, proto, input_shape=SHAPE, atol=1e-4, rtol=1e-4)
    assert result.passed, result
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(SHAPE, generator=gen)
        (y,) = ort_run(proto, x.numpy())
        with torch.no_grad():
            np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-4, atol=1e-4)
    assert count_macs(model, torch.zeros(SHAPE)) == plan["totals"]["macs_after"]
    assert plan["target"]["achieved_flops_reduction"] >= 0.5
    # every Conv weight in the graph has the shape the plan gives its layer (kept channels, ranks)
    shapes = collections.Counter(
        tuple(i.dims) for i in proto.graph.initializer if len(i.dims) == 4 and i.data_type == onnx.TensorProto.FLOAT
    )
    expected: collections.Counter = collections.Counter()
    for e in plan["layers"]:
        if e["type"] != "Conv2d":
            continue
        o, i, kh, kw = e["shape"]
        info = e["info"]
        o = len(info["out_keep"]) if info.get("out_keep") else o
        i = len(info["in_keep"]) if info.get("in_keep") else i
        if e["action"] == DECOMP:
            r = e["ranks"][0]
            expected.update([(r, i, kh, kw), (o, r, 1, 1)])
        else:
            expected.update([(o, i, kh, kw)])
    assert shapes == expected
