"""Export Keras applications with random weights to ONNX through tf2onnx, for the Keras tests.

    python tools/export_keras.py [--out DIR] [--size PX] [NAME ...]

keras.applications models (weights=None, the default 1000-class softmax head) and a small
functional CNN, built under keras.utils.set_random_seed(0), BatchNorm statistics calibrated
(`calibrate`), saved as `<out>/<name>.<size>.keras` and exported with
`tf2onnx.convert.from_keras(model, opset=17)` to `<out>/<name>.<size>.onnx`. The ONNX input keeps
tf2onnx's own name, that of the Keras input tensor (`keras_tensor` in a fresh Keras session: read
it from the file), channels-last `[batch, size, size, 3]` with a dynamic batch; the output is named
after the last Keras layer (`predictions`). Tensors are named after the TF ops, one scope per
Keras layer with a `_1` suffix: `<model>_1/<layer>_1/<op>:0` (Keras layer `out_relu` of
MobileNetV2 gives `mobilenetv2_1.00_96_1/out_relu_1/Relu6:0`); a Conv with its BatchNorm folded in
keeps the BatchNorm's scope or none (`Conv__583:0`).

Both files are cached: the .keras file is what a test rebuilds its reference from, so the BatchNorm
statistics are measured once (their sums round differently with the thread count).

tf2onnx 1.17 leaves some feature maps channels-last: its transpose optimizer fails on an Add
whose second input is a scalar (hard-swish's x + 3 in MobileNetV3: "Failed to apply
optimize_transpose ... max() arg is an empty sequence") and then keeps a Transpose pair around
every Conv (MobileNetV3Small: [N, H, W, C] feature maps). Where it succeeds the graph is
channels-first after the input's Transpose, up to a Transpose back to channels-last before a
Flatten (the small CNN). Peak memory of an export at 96 px: ResNet50 8.9 GB, the others < 2.6 GB.
TensorFlow, Keras and tf2onnx are test dependencies; the package never imports them.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ARCHITECTURES = ["MobileNetV2", "MobileNetV3Small", "ResNet50", "EfficientNetB0", "DenseNet121", "small_cnn"]
# Measured with tf2onnx 1.17 / TensorFlow 2.21 / Keras 3.15: Keras runs a grouped (depthwise 7x7)
# Conv2D as an XLA function, which tf2onnx leaves as StatefulPartitionedCall, and GELU's Erfc has
# no converter; tf2onnx writes the file anyway and onnxruntime refuses it. `export` raises instead.
UNEXPORTABLE = {"ConvNeXtTiny": "18 StatefulPartitionedCall (depthwise Conv2D via XLA), 18 Erfc (GELU)"}
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "keras"
DEFAULT_SIZE = 96  # every keras.applications model here takes >= 32 px; 96 gives a 3x3 last grid
OPSET = 17
MAX_IR = 10  # onnxruntime 1.31 reads IR <= 13; tf2onnx writes 8 at opset 17
# Pixel range [0, PIXELS) of the models that rescale their input themselves (a Rescaling layer
# first): given [0, 1) images, MobileNetV3's x / 127.5 - 1 is nearly constant, its first
# BatchNorm subtracts a mean that cancels all but the last digits, and float32 then differs from
# float64 by 1.7e-4 at the last feature map. The others take [0, 1).
PIXELS = {"MobileNetV3Small": 255.0, "EfficientNetB0": 255.0}


def pixels(name: str) -> float:
    """The top of the input range that calibration (and a test) draws images from uniformly."""
    return PIXELS.get(name, 1.0)


def small_cnn(size: int):  # -> keras.Model
    """Conv/BN/ReLU/MaxPool twice, Conv/BN/ReLU, MaxPool, Flatten, Dense(10, softmax)."""
    import keras

    x = inp = keras.Input((size, size, 3))
    for i, width in enumerate((16, 32, 64)):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    out = keras.layers.Dense(10, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name="small_cnn")


def architecture(name: str, size: int):  # -> keras.Model
    import keras

    if name == "small_cnn":
        return small_cnn(size)
    return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))


def calibrate(model, size: int, scale: float = 1.0, batches: int = 4, batch: int = 8, seed: int = 0) -> None:
    """BatchNorm moving statistics := the average of `batches` train-mode passes' batch statistics.

    With the default statistics (mean 0, variance 1) a random deep net's activations shrink or grow
    by a constant factor per block, until ReLU decisions sit within float32 rounding of zero. Inputs
    are uniform [0, scale) NHWC images (the test inputs' distribution). Keras updates
    moving = moving * momentum + batch * (1 - momentum), so momentum (k - 1) / k on the k-th pass
    gives the cumulative average (torch's momentum=None). Dropout is off meanwhile (rate 0), so
    that it does not skew the statistics of the BatchNorms after it.
    """
    import keras
    import numpy as np

    layers = list(model._flatten_layers(include_self=False))
    norms = [m for m in layers if isinstance(m, keras.layers.BatchNormalization)]
    drops = [(m, m.rate) for m in layers if isinstance(m, keras.layers.Dropout)]
    momenta = [m.momentum for m in norms]
    for m, _ in drops:
        m.rate = 0.0
    rng = np.random.RandomState(seed)
    for k in range(1, batches + 1):
        for m in norms:
            m.momentum = (k - 1) / k
        model((scale * rng.rand(batch, size, size, 3)).astype(np.float32), training=True)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    for m, rate in drops:
        m.rate = rate


def paths(name: str, out_dir: Path, size: int) -> tuple[Path, Path]:
    """(<out_dir>/<name>.<size>.keras, <out_dir>/<name>.<size>.onnx)."""
    stem = Path(out_dir) / f"{name}.{size}"
    return stem.with_suffix(f"{stem.suffix}.keras"), stem.with_suffix(f"{stem.suffix}.onnx")


def build(name: str, out_dir: Path = DEFAULT_CACHE, size: int = DEFAULT_SIZE):  # -> keras.Model
    """The calibrated Keras model that `export` writes: loaded from its .keras file when cached."""
    import keras

    keras_path, _ = paths(name, out_dir, size)
    if keras_path.is_file():
        return keras.saving.load_model(keras_path, compile=False)
    keras.backend.clear_session()  # layer names (activation_17, ...) count from zero again
    keras.utils.set_random_seed(0)
    model = architecture(name, size)
    calibrate(model, size, pixels(name))
    keras_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = keras_path.with_suffix(".part.keras")  # Keras insists on the suffix
    model.save(tmp)
    tmp.replace(keras_path)
    return model


def export(name: str, out_dir: Path = DEFAULT_CACHE, size: int = DEFAULT_SIZE) -> Path:
    """Write `<out_dir>/<name>.<size>.onnx` (and the .keras model beside it) unless it exists."""
    import onnx
    import tf2onnx

    _, path = paths(name, out_dir, size)
    if path.is_file():
        return path
    model = build(name, out_dir, size)
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)  # the transpose optimizer's traceback
    proto, _ = tf2onnx.convert.from_keras(model, opset=OPSET)
    left = Counter(n.op_type for n in proto.graph.node if not onnx.defs.has(n.op_type, n.domain))
    if left:
        # tf2onnx writes such a model without an error; onnxruntime then refuses it (INVALID_GRAPH)
        raise RuntimeError(
            f"tf2onnx {tf2onnx.__version__} left TensorFlow ops unconverted in {name}: {dict(left)}; "
            "this architecture cannot be exported this way (see UNEXPORTABLE)"
        )
    proto.ir_version = min(proto.ir_version, MAX_IR)
    tmp = path.with_suffix(".part")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=ARCHITECTURES)
    p.add_argument("--out", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE)
    args = p.parse_args()
    for name in args.names:
        print(export(name, args.out, args.size))


if __name__ == "__main__":
    main()
