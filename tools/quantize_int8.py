"""int8 versions of a float model, made by onnxruntime's own quantizer (QDQ, QOperator, dynamic).

    python tools/quantize_int8.py MODEL.onnx [--forms qdq qop dynamic] [--reduce-range]

Static quantization is calibrated (MinMax) on the images given, by default random uniform
[0, 1) ones; the files are cached beside the float model under `<stem>.<form>.onnx`. Used by the
tests and tools/bench.py; onnxruntime.quantization is a test/dev dependency, not the package's.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

FORMS = ("qdq", "qdq_per_tensor", "qop", "dynamic")


def random_images(n: int, shape: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    rs = np.random.RandomState(seed)
    return [rs.uniform(0, 1, (1, *shape[1:])).astype(np.float32) for _ in range(n)]


def _shared_weights_resolved(src: Path, dst: Path) -> Path:
    """The TorchScript exporter writes Identity nodes for weights equal to earlier ones (zero SE
    biases of random nets); the static quantizer cannot quantize a bias behind an Identity, so
    each such Identity becomes an initializer of its own."""
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0])
            model.graph.initializer.append(copy)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    onnx.save(model, str(dst))
    return dst


def quantize(
    float_model: Path, form: str, images: Sequence[np.ndarray] | None = None, reduce_range: bool = False
) -> Path:
    """The int8 `form` of a float model (cached): 'qdq' (per-channel weights), 'qdq_per_tensor',
    'qop' (QOperator) or 'dynamic'. Calibration images [1, C, H, W] float32, default 8 random ones.

    `reduce_range` keeps weights in 7 bits, as onnxruntime advises for CPUs without VNNI: with
    full-range weights its AVX2 u8 x s8 kernels saturate pair sums in 16 bits, so the file runs
    differently from its own float semantics (resnet18 QDQ: logits 0.16 apart, of 1.44, between
    an optimised and an unoptimised session; measured)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    float_model = Path(float_model)
    out = float_model.with_name(f"{float_model.stem}{'.rr' if reduce_range else ''}.{form}.onnx")
    if out.is_file():
        return out
    tmp = out.with_suffix(f".{os.getpid()}.part")
    src = _shared_weights_resolved(float_model, out.with_suffix(f".{os.getpid()}.src"))
    try:
        if form == "dynamic":
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, reduce_range=reduce_range)
        else:
            model = onnx.load(str(src), load_external_data=False)
            name = model.graph.input[0].name
            if images is None:
                dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
                images = random_images(8, dims)
            feeds = [{name: x} for x in images]

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.left = iter(feeds)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self.left, None)

            quantize_static(
                str(src),
                str(tmp),
                Reader(),
                quant_format=QuantFormat.QOperator if form == "qop" else QuantFormat.QDQ,
                per_channel=form == "qdq",
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=reduce_range,
            )
        tmp.replace(out)
    finally:
        for leftover in (tmp, src):
            if leftover.exists():
                leftover.unlink()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    p.add_argument("--reduce-range", action="store_true", help="7-bit weights (CPUs without VNNI)")
    args = p.parse_args()
    for form in args.forms:
        print(quantize(args.model, form, reduce_range=args.reduce_range))


if __name__ == "__main__":
    main()
