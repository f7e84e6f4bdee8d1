"""Model builders and ONNX helpers shared by the export tests (fixtures live in conftest.py)."""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import onnx
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

#: Ops a plain CNN may contain after :func:`export.optimize` (what TensorRT fuses well).
ALLOWED_CNN_OPS = frozenset({"Conv", "Relu", "Add", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm"})


# ------------------------------------------------------------------------------------------------
# Model builders (seeded without leaking global RNG state)
# ------------------------------------------------------------------------------------------------


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build ``factory()`` under ``torch.manual_seed(seed)``, restoring the global RNG afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine params, so folding really matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


def randomize_biases_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace the zero-initialised Conv/Linear biases by small random ones (exporters drop zero biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model


def tv_model(name: str, seed: int = 0) -> nn.Module:
    """A torchvision classifier with random weights, biases and BatchNorm statistics, in eval mode."""
    model = seeded(lambda: getattr(torchvision.models, name)(weights=None), seed)
    return randomize_biases_(randomize_bn_(model, seed), seed).eval()


def conv_gemm_params(model: onnx.ModelProto) -> int:
    """Elements of the initializers consumed by Conv/ConvTranspose/Gemm nodes (each counted once)."""
    inits = {init.name: init for init in model.graph.initializer}
    used = {
        name
        for node in model.graph.node
        if node.op_type in ("Conv", "ConvTranspose", "Gemm")
        for name in node.input
        if name in inits
    }
    return sum(int(np.prod(inits[name].dims)) for name in used)


def n_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stem, one residual block, global pooling and a classifier."""

    def __init__(self, channels: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = y + self.block(y)
        return self.fc(torch.flatten(self.pool(y), 1))


def factorized_chain(c_in: int = 16, rank: int = 4, c_out: int = 16) -> nn.Sequential:
    """A Tucker-2 style factorized conv as stock layers: 1×1 → 3×3 → 1×1."""
    return nn.Sequential(
        nn.Conv2d(c_in, rank, 1, bias=False),
        nn.Conv2d(rank, rank, 3, padding=1, bias=False),
        nn.Conv2d(rank, c_out, 1, bias=True),
    )


class SharedFactorNet(nn.Module):
    """Two blocks that share one 1×1 "reduce" and one 1×1 "expand" factor (the same nn.Parameter).

    With ``bn=True`` every use of a shared factor is followed by its own BatchNorm, which must *not*
    be folded (that would duplicate the shared weight).
    """

    def __init__(self, channels: int = 16, rank: int = 4, bn: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        reduce = nn.Parameter(torch.randn(rank, channels, 1, 1) * 0.3)
        expand = nn.Parameter(torch.randn(channels, rank, 1, 1) * 0.3)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            r = nn.Conv2d(channels, rank, 1, bias=False)
            e = nn.Conv2d(rank, channels, 1, bias=False)
            r.weight, e.weight = reduce, expand
            core = nn.Conv2d(rank, rank, 3, padding=1, bias=False)
            layers = [
                r,
                *([nn.BatchNorm2d(rank)] if bn else []),
                core,
                e,
                *([nn.BatchNorm2d(channels)] if bn else []),
            ]
            self.blocks.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for block in self.blocks:
            y = torch.relu(y + block(y))
        return y


# ------------------------------------------------------------------------------------------------
# ONNX helpers
# ------------------------------------------------------------------------------------------------


def op_counts(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)


def initializer_consumers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Initializer name → op types of the nodes that consume it."""
    names = {init.name for init in model.graph.initializer}
    out: dict[str, list[str]] = {name: [] for name in names}
    for node in model.graph.node:
        for name in set(node.input) & names:
            out[name].append(node.op_type)
    return out


def ort_run(model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {meta.name: x for meta, x in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray],
    opset: int = 18,
) -> onnx.ModelProto:
    """A checked ONNX model from nodes, value infos and numpy initializers."""
    graph = helper.make_graph(
        nodes,
        "test",
        inputs,
        outputs,
        [numpy_helper.from_array(np.asarray(v), name=k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def float_info(name: str, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def raw_dynamo_export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """The dynamo exporter's output *without* its onnxscript optimizer: BatchNorm nodes still present."""
    program = torch.onnx.export(
        model.eval(),
        (x,),
        dynamo=True,
        opset_version=18,
        optimize=False,
        verbose=False,
        input_names=["input"],
        output_names=["output"],
    )
    return program.model_proto
