"""Export parity over torchvision models (random weights, randomised BatchNorm, reduced input size).

For each model: every BatchNorm is folded, every Conv/Linear survives as exactly one Conv/Gemm,
Conv/Gemm weights are conserved (BN only rescales them and sets the biases), and ONNX Runtime matches PyTorch within the default tolerances
(``export.DEFAULT_ATOL``/``DEFAULT_RTOL``) with a relative L2 error below 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import conv_gemm_params, n_batchnorms, op_counts, tv_model
from torch import nn

from export import check_onnx_parity, onnx_from_torch, optimize

#: model name -> input side (reduced from 224 to keep the suite fast on 2 CPU cores).
MODELS = {"resnet18": 64, "resnet50": 64, "vgg11_bn": 64, "mobilenet_v2": 64}


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_export_parity(name, request):
    side = MODELS[name]
    shape = (1, 3, side, side)
    if name == "resnet18":  # reuse the session export
        case = request.getfixturevalue("resnet18_case")
        model, optimized = case.model, case.optimized
    else:
        model = tv_model(name)
        optimized = optimize(onnx_from_torch(model, torch.zeros(shape)))

    counts = op_counts(optimized)
    assert n_batchnorms(model) > 0
    assert counts["BatchNormalization"] == 0
    assert counts["Conv"] == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert counts["Gemm"] == sum(isinstance(m, nn.Linear) for m in model.modules())
    # BN params vanish into the convs; a conv without bias gains one (every such conv here feeds a BN)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    gained = sum(m.out_channels for m in layers if isinstance(m, nn.Conv2d) and m.bias is None)
    assert conv_gemm_params(optimized) == sum(p.numel() for m in layers for p in m.parameters()) + gained

    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    with torch.inference_mode():
        magnitude = float(model(torch.from_numpy(x)).abs().max())
    assert magnitude > 0.1  # randomised BN keeps the outputs non-degenerate, so parity means something
    result = check_onnx_parity(model, optimized, input_shape=shape, batches=2)
    assert result.passed
    assert result.rel_l2 < 1e-5
    assert result.top1_agreement == 1.0
