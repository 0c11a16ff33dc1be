"""Export torchvision architectures with random weights to ONNX, for tests and benchmarks.

    python tools/export_torchvision.py [--out DIR] [--dynamo] [NAME ...]

TorchScript exporter (dynamo=False), opset 17, input 'input' and output 'logits' with a dynamic
batch axis, weights=None under torch.manual_seed(0): the same weights every time, so a test can
rebuild the torch model and compare. `--dynamo` uses torch.export instead (opset 18 in torch 2.14).
torch and torchvision are dev/test dependencies; the package never imports them.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

ARCHITECTURES = [
    "resnet18",
    "resnet50",
    "vgg16",
    "googlenet",
    "inception_v3",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "mnasnet1_0",
]
MAX_IR = 10  # onnxruntime 1.31 reads IR <= 13; keep exports conservative


def input_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def build(name: str):  # -> torch.nn.Module
    """The torchvision model with the deterministic random weights every export uses."""
    import torch
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def export(name: str, out_dir: Path, dynamo: bool = False) -> Path:
    """Write `<out_dir>/<name>.onnx` (or `<name>.dynamo.onnx`) unless it exists; returns its path."""
    import onnx
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (f"{name}.dynamo.onnx" if dynamo else f"{name}.onnx")
    if path.is_file():
        return path
    model = build(name)
    size = input_size(name)
    x = torch.randn(1, 3, size, size)
    tmp = path.with_suffix(".part")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes={"x": {0: batch}},
                external_data=False,
            )
        else:
            torch.onnx.export(
                model,
                x,
                str(tmp),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    proto = onnx.load(str(tmp))
    if proto.ir_version > MAX_IR:
        proto.ir_version = MAX_IR
        onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=ARCHITECTURES)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / ".cache" / "models")
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter (opset 18)")
    args = p.parse_args()
    for name in args.names:
        print(export(name, args.out, args.dynamo))


if __name__ == "__main__":
    main()
