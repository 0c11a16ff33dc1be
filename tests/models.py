"""Small models built in the tests: a torch CNN exported to ONNX, and hand-made ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_cnn(seed: int = 0):  # -> torch.nn.Module
    """Conv-BN-ReLU-MaxPool-Conv-ReLU-GAP-Linear-Softmax: every head op of a classifier."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1),
                nn.ReLU(),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            a = self.features(x)
            return torch.softmax(self.fc(torch.flatten(self.pool(a), 1)), dim=1)

    model = Tiny().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model


def export(model, path: Path, size: int = 16, opset: int = 17) -> Path:
    import torch

    torch.onnx.export(
        model,
        torch.randn(1, 3, size, size),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["probs"],
        dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}},
    )
    return path


def handmade(head_op: str | None = None, conv_bias: float = 0.1, channels: int = 4) -> onnx.ModelProto:
    """input -> Conv -> Relu -> [head_op] -> GlobalAveragePool -> Flatten -> Gemm -> logits."""
    rs = np.random.RandomState(0)
    w = numpy_helper.from_array(rs.randn(channels, 3, 3, 3).astype(np.float32), "w")
    b = numpy_helper.from_array(np.full(channels, conv_bias, np.float32), "b")
    fc = numpy_helper.from_array(rs.randn(3, channels).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"], name="relu"),
    ]
    last = "features"
    if head_op is not None:
        nodes.append(helper.make_node(head_op, [last], ["odd"], name="odd_node"))
        last = "odd"
    nodes += [
        helper.make_node("GlobalAveragePool", [last], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "handmade",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [w, b, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
