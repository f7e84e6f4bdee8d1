"""ONNX export of joint-SVD models: each shared factor is one initializer feeding N Convs; ORT parity."""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import pytest
import torch
from export_helpers import op_counts, randomize_bn_
from onnx import numpy_helper
from torch import nn

from compress.api import apply_plan_, method_config, plan_compression
from compress.methods.jsvd import ParallelSum
from compress.metrics import count_params
from compress.zoo import create_model
from export import check_onnx_parity, onnx_from_torch, optimize

SHAPE = (1, 3, 32, 32)
MODEL = "cifar_resnet34_w0.125"  # ResNet-34 block structure, 8/16/32/64 channels


@pytest.fixture(scope="module", params=["ljsvd", "rjsvd1", "bijsvd"])
def jsvd_case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, object, onnx.ModelProto]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small float64 SVDs: OpenMP spinning on shared cores costs ~40×
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = randomize_bn_(create_model(MODEL, num_classes=10)).eval()
        config = method_config(request.param, ratio=None, rho=0.25)
        plan = plan_compression(model, config, torch.zeros(SHAPE), model_name=MODEL)
        compressed = apply_plan_(copy.deepcopy(model), plan).eval()
    finally:
        torch.set_num_threads(before)
    return request.param, compressed, plan, optimize(onnx_from_torch(compressed, torch.zeros(SHAPE)))


def _shared_params(compressed: nn.Module, plan) -> list[tuple[torch.Tensor, int]]:
    """(shared weight, number of member convs using it) for every shared factor of the plan."""
    users: dict[int, list] = collections.defaultdict(list)
    for e in plan.factorized_layers:
        layer = compressed.get_submodule(e.path)
        if e.action == "rjsvd":
            convs = [layer[1]]
        elif e.action == "ljsvd":
            convs = [layer[0]]
        elif e.action == "bijsvd":
            assert isinstance(layer, ParallelSum)
            convs = [layer.right[1], layer.left[0]]
        else:
            continue
        for conv in convs:
            users[id(conv.weight)].append(conv.weight)
    return [(ws[0], len(ws)) for ws in users.values()]


def _unshare_(model: nn.Module) -> nn.Module:
    """Give every conv its own weight, nudged so that no de-duplication pass can merge the copies again."""
    for k, m in enumerate(m for m in model.modules() if isinstance(m, nn.Conv2d)):
        m.weight = nn.Parameter(m.weight.detach() * (1 + 1e-3 * (k + 1)))
    return model


def test_shared_factor_is_one_initializer_consumed_by_every_member(jsvd_case) -> None:
    method, compressed, plan, proto = jsvd_case
    shared = _shared_params(compressed, plan)
    assert len(shared) == (12 if method == "bijsvd" else 6)  # 2 conv positions × 3 stages (× 2 terms)
    consumers = collections.Counter(
        name for node in proto.graph.node if node.op_type == "Conv" for name in node.input[1:2]
    )
    inits = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for weight, members in shared:
        value = weight.detach().numpy()
        names = [n for n, a in inits.items() if a.shape == value.shape and np.array_equal(a, value)]
        assert len(names) == 1, f"shared factor {tuple(value.shape)} stored {len(names)} times"
        assert consumers[names[0]] == members >= 2
    assert set(op_counts(proto)) <= {
        "Conv",
        "Relu",
        "Add",
        "BatchNormalization",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
    }


def test_file_size_reflects_sharing_and_ort_parity(jsvd_case) -> None:
    method, compressed, plan, proto = jsvd_case
    assert count_params(compressed) == plan.totals["params_after"]
    result = check_onnx_parity(compressed, proto, input_shape=SHAPE, atol=1e-4, rtol=1e-4)
    assert result.passed
    if method != "rjsvd1":
        return  # one unshared re-export (a few seconds) suffices
    unshared = _unshare_(copy.deepcopy(compressed))
    proto_unshared = optimize(onnx_from_torch(unshared, torch.zeros(SHAPE)))
    saved = sum(weight.numel() * (members - 1) for weight, members in _shared_params(compressed, plan))
    # The unshared export also folds BN into the formerly shared V convs (a bias each): allow for that.
    diff = proto_unshared.ByteSize() - proto.ByteSize()
    assert diff == pytest.approx(4 * saved, rel=0.25)
    assert diff > 0.5 * 4 * saved
