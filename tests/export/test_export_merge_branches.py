"""Bi-JSVD's two summed conv pairs exported as one pair of rank r1 + r2 (export.merge_branches)."""

from __future__ import annotations

import collections
import copy

import onnx
import pytest
import torch
from export_helpers import op_counts, randomize_bn_
from onnx import numpy_helper

from compress.api import apply_plan_, method_config, plan_compression
from compress.zoo import create_model
from export import check_onnx_parity, onnx_from_torch, optimize
from export.merge_branches import merge_model

SHAPE = (1, 3, 32, 32)
MODEL = "cifar_resnet34_w0.125"


def _export(method: str) -> tuple[torch.nn.Module, object, onnx.ModelProto]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = randomize_bn_(create_model(MODEL, num_classes=10)).eval()
        plan = plan_compression(
            model, method_config(method, ratio=None, rho=0.25), torch.zeros(SHAPE), model_name=MODEL
        )
        compressed = apply_plan_(copy.deepcopy(model), plan).eval()
    finally:
        torch.set_num_threads(before)
    return compressed, plan, optimize(onnx_from_torch(compressed, torch.zeros(SHAPE)))


@pytest.fixture(scope="module")
def bijsvd_case() -> tuple[torch.nn.Module, object, onnx.ModelProto]:
    return _export("bijsvd")


def _consumers(proto: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(name for node in proto.graph.node for name in node.input)


@pytest.mark.parametrize("shared", [True, False])
def test_merge_keeps_parity_and_drops_nodes(bijsvd_case, shared: bool) -> None:
    compressed, plan, proto = bijsvd_case
    pairs = sum(1 for e in plan.factorized_layers if e.action == "bijsvd")
    assert pairs > 0
    merged, n = merge_model(proto, shared=shared)
    assert n == pairs  # every Bi-JSVD layer, nothing else
    before, after = op_counts(proto), op_counts(merged)
    assert after["Conv"] == before["Conv"] - 2 * pairs  # 4 convs → 2 per layer
    assert after.get("Add", 0) == before["Add"] - pairs  # the branch sum is gone
    assert len(merged.graph.node) < len(proto.graph.node) or shared  # shared: + 2 Concat per layer
    result = check_onnx_parity(compressed, merged, input_shape=SHAPE, atol=1e-4, rtol=1e-4)
    assert result.passed, result
    inits = {i.name: numpy_helper.to_array(i) for i in merged.graph.initializer}
    if shared:
        # each shared factor is still one initializer, read by the Concat of every member layer
        assert after["Concat"] == 2 * pairs
        assert after.get("BatchNormalization", 0) == before.get("BatchNormalization", 0)
        uses = _consumers(merged)
        shared_names = [name for name in inits if uses[name] >= 2]
        assert len(shared_names) == 12  # 2 conv positions × 3 stages × (U_l, V_r), as before the merge
        stored = sum(a.size for a in inits.values())
        assert stored == sum(numpy_helper.to_array(i).size for i in proto.graph.initializer)  # not one value more
    else:
        assert "Concat" not in after
        assert "BatchNormalization" not in after  # folded into the merged second conv
        assert merged.ByteSize() > proto.ByteSize()  # every layer stores its copy of the shared factors


def test_merged_weights_name_their_layer(bijsvd_case) -> None:
    from runtime.profile import layer_of_weight

    _, plan, proto = bijsvd_case
    merged, _ = merge_model(proto, shared=False)
    paths = [e.path for e in plan.layers]
    bijsvd = {e.path for e in plan.factorized_layers if e.action == "bijsvd"}
    layers = collections.Counter(
        layer_of_weight(node.input[1], paths) for node in merged.graph.node if node.op_type == "Conv"
    )
    assert all(layers[path] == 2 for path in bijsvd)


def test_merge_leaves_other_graphs_alone() -> None:
    _, _, proto = _export("rjsvd1")  # one chain per layer: nothing to merge
    merged, n = merge_model(proto)
    assert n == 0
    assert op_counts(merged) == op_counts(proto)
