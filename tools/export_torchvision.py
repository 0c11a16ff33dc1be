"""Export torchvision architectures with random weights to ONNX, for tests and benchmarks.

    python tools/export_torchvision.py [--out DIR] [--dynamo] [NAME ...]

TorchScript exporter (dynamo=False), opset 17, input 'input' and output 'logits' with a dynamic
batch axis, weights=None under torch.manual_seed(0), then conditioned (`condition`): BatchNorm
statistics measured on random images, or for nets without BatchNorm, weights rescaled so each
layer's output has unit spread. The conditioned state is cached beside the export, so a test
rebuilds exactly the exported weights. `--dynamo` uses torch.export instead (opset 18 in
torch 2.14). torch and torchvision are dev/test dependencies; the package never imports them.
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


DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"
CONDITIONING = "c1"  # part of the cached file names: bump it when `condition` changes


def condition(model, shape: tuple[int, ...], batches: int = 4, seed: int = 0):  # -> torch.nn.Module
    """Make random weights well-conditioned: activations and logits of order 1, not 1e-14 or 1e12.

    With default BatchNorm statistics (mean 0, variance 1) a random deep net's activations shrink
    or grow by a constant factor per block; many ReLU inputs then sit within float32 rounding of
    zero, and a correct gradient differs between CPUs. So: BatchNorm statistics become the
    cumulative average (momentum=None) of `batches` train-mode passes on uniform [0, 1) images
    (the test inputs' distribution). A net without BatchNorm (vgg, squeezenet, alexnet) gets each
    Conv/Linear scaled, in forward order, so its output has unit standard deviation (LSUV). The
    model comes back in eval mode.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    batch = [torch.rand(shape, generator=gen) for _ in range(batches)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        if norms:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            for x in batch:
                model(x)
            for m in norms:
                m.momentum = 0.1
        else:
            model.eval()
            handles = []
            for m in model.modules():  # a layer initialised to zero (torchvision ViT's head) has no spread
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not bool(m.weight.any()):
                    m.reset_parameters()

            def unit_spread(module, _inputs, out):  # type: ignore[no-untyped-def]
                # out = W x + b: dividing W and b by s divides out by s; later layers see the result
                s = float(out.std())
                module.weight.div_(s)
                if module.bias is not None:
                    module.bias.div_(s)
                return out / s

            for m in model.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    handles.append(m.register_forward_hook(unit_spread))
            model(torch.cat(batch))
            for h in handles:
                h.remove()
    return model.eval()


def conditioned(key: str, model, shape: tuple[int, ...], cache: Path = DEFAULT_CACHE):  # -> torch.nn.Module
    """`model` conditioned on inputs of `shape`, its state cached as `<cache>/<key>.<CONDITIONING>.pt`.

    BatchNorm statistics are sums whose rounding depends on the thread count, and a test must
    rebuild the very weights that were exported: the first call measures and saves, later ones load.
    """
    import torch

    state = Path(cache) / f"{key}.{CONDITIONING}.pt"
    if state.is_file():
        model.load_state_dict(torch.load(state, weights_only=True))
        return model.eval()
    condition(model, shape)
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".part")
    torch.save(model.state_dict(), tmp)
    tmp.replace(state)
    return model


def build(name: str, cache: Path = DEFAULT_CACHE, size: int | None = None):  # -> torch.nn.Module
    """The torchvision model with the conditioned random weights every export at `size` uses.

    inception_v3 is built without its auxiliary classifier (used in training only), whose
    train-mode pass during conditioning needs inputs of at least 299 pixels.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    size = size or input_size(name)
    extra = {"aux_logits": False, "init_weights": True} if name == "inception_v3" else {}
    net = getattr(torchvision.models, name)(weights=None, **extra)
    return conditioned(f"{name}.{size}", net, (8, 3, size, size), cache)


def export(name: str, out_dir: Path, dynamo: bool = False, size: int | None = None) -> Path:
    """Write `<out_dir>/<name>.<size>.<CONDITIONING>[.dynamo].onnx` unless it exists; its path.

    The input is [batch, 3, size, size] (default: the architecture's own size, `input_size`).
    """
    import onnx
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = size or input_size(name)
    stem = f"{name}.{size}.{CONDITIONING}"
    path = out_dir / (f"{stem}.dynamo.onnx" if dynamo else f"{stem}.onnx")
    if path.is_file():
        return path
    model = build(name, out_dir, size)
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
    p.add_argument("--out", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter (opset 18)")
    args = p.parse_args()
    for name in args.names:
        print(export(name, args.out, args.dynamo))


if __name__ == "__main__":
    main()
