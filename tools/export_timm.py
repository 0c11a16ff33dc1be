"""Export timm (and torchvision) classifiers with random, conditioned weights to ONNX, for the
architecture sweep (tools/sweep.py) and the transformer tests.

    python tools/export_timm.py [--out DIR] [--dynamo] [--size S] [NAME ...]
    python tools/export_timm.py --torchvision vit_b_16 swin_t

timm models: `timm.create_model(name, pretrained=False)` under torch.manual_seed(0), at a small
input size where the architecture allows (vision transformers take `img_size=`; CNNs any size),
conditioned like the torchvision exports (tools/export_torchvision.py: `conditioned`: BatchNorm
statistics from train-mode passes, LSUV for nets without BatchNorm). TorchScript exporter
(dynamo=False) at opset 17, or `--dynamo` (torch.export, opset 18); input 'input', output
'logits', dynamic batch. Exports are cached as `<out>/<name>.<size>.<CONDITIONING>[.dynamo].onnx`
(timm under .cache/timm, torchvision under .cache/models, beside export_torchvision's files).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_torchvision  # noqa: E402
from export_torchvision import CONDITIONING, MAX_IR, conditioned  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMM_CACHE = ROOT / ".cache" / "timm"
TORCHVISION_CACHE = export_torchvision.DEFAULT_CACHE
SMALL = 96  # where the architecture allows: 6x6 tokens for a patch-16 ViT, 3x3 after a CNN's stride 32

# architectures that only build (or only keep their design) at their own input size: shifted
# windows of 7 (Swin: 56, 28, 14, 7 tokens), attention biases or partitions sized for 224/256
NATIVE = {
    "swin_tiny_patch4_window7_224",
    "swinv2_cr_tiny_ns_224",
    "efficientformer_l1",
    "efficientformerv2_s0",
    "crossvit_tiny_240",
    "maxvit_nano_rw_256",
    "coatnet_nano_rw_224",
    "tiny_vit_5m_224",
    "gcvit_xxtiny",
    "efficientvit_m0",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "edgenext_xx_small",
    "fastvit_t8",
    "sequencer2d_s",
    "eva02_tiny_patch14_224",
    "xcit_nano_12_p16_224",
    "coat_lite_tiny",
    "pvt_v2_b0",
    "twins_pcpvt_small",
    "visformer_tiny",
    "levit_128s",
    "cait_xxs24_224",
    "pit_ti_224",
    # torchvision
    "swin_t",
}
# torchvision classifiers built here (export_torchvision builds the CNNs): their size argument
TORCHVISION_SIZED = {"vit_b_16": "image_size", "vit_b_32": "image_size", "swin_t": None}


def native_size(name: str, source: str = "timm") -> int:
    if source == "torchvision":
        return export_torchvision.input_size(name)
    import timm

    return int(timm.get_pretrained_cfg(name).input_size[-1])


def input_size(name: str, source: str = "timm") -> int:
    """The size the sweep and tests export `name` at: SMALL unless the architecture needs its own."""
    return native_size(name, source) if name in NATIVE else SMALL


def cache_dir(source: str) -> Path:
    return TIMM_CACHE if source == "timm" else TORCHVISION_CACHE


def build(name: str, size: int | None = None, source: str = "timm", cache: Path | None = None):  # -> nn.Module
    """The model with the conditioned random weights every export of `name` at `size` uses (eval mode)."""
    import torch

    size = size or input_size(name, source)
    cache = Path(cache) if cache is not None else cache_dir(source)
    if source == "torchvision" and name not in TORCHVISION_SIZED:
        return export_torchvision.build(name, cache, size)
    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        arg = TORCHVISION_SIZED[name]
        extra = {arg: size} if arg is not None and size != native_size(name, source) else {}
        net = getattr(torchvision.models, name)(weights=None, **extra)
    else:
        import timm

        extra = {}
        if size != native_size(name):
            try:  # transformers fix their token grid at construction; CNNs take any size
                timm.create_model(name, pretrained=False, img_size=size)
                extra = {"img_size": size}
            except TypeError:
                pass
            torch.manual_seed(0)
        net = timm.create_model(name, pretrained=False, **extra)
    return conditioned(f"{name}.{size}", net.eval(), (8, 3, size, size), cache)


def export_path(name: str, size: int, dynamo: bool, source: str = "timm", cache: Path | None = None) -> Path:
    stem = f"{name}.{size}.{CONDITIONING}"
    return (Path(cache) if cache is not None else cache_dir(source)) / (
        f"{stem}.dynamo.onnx" if dynamo else f"{stem}.onnx"
    )


def write_onnx(model, path: Path, size: int, dynamo: bool) -> Path:  # type: ignore[no-untyped-def]
    """torch.onnx.export of `model` on [batch, 3, size, size] to `path` (atomically), IR <= MAX_IR."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
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
                dynamic_shapes=({0: batch},),
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


def export(
    name: str, size: int | None = None, dynamo: bool = False, source: str = "timm", cache: Path | None = None
) -> Path:
    """The cached export of `name` at `size` (default `input_size`), written first if missing."""
    size = size or input_size(name, source)
    if source == "torchvision" and name not in TORCHVISION_SIZED:
        return export_torchvision.export(name, Path(cache) if cache else TORCHVISION_CACHE, dynamo=dynamo, size=size)
    path = export_path(name, size, dynamo, source, cache)
    if path.is_file():
        return path
    return write_onnx(build(name, size, source, cache), path, size, dynamo)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+")
    p.add_argument("--out", type=Path, default=None, help="cache folder (default .cache/timm or .cache/models)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--torchvision", action="store_true", help="the names are torchvision classifiers")
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter (opset 18)")
    args = p.parse_args()
    source = "torchvision" if args.torchvision else "timm"
    for name in args.names:
        print(export(name, args.size, args.dynamo, source, args.out))


if __name__ == "__main__":
    main()
