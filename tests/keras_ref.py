"""Keras-side references for the tf2onnx exports: Grad-CAM by tf.GradientTape on the pre-softmax
logits, and the ONNX tensor that holds a given Keras layer's output (in whichever layout)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import numpy as np
import onnx

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

Reference = Callable[[np.ndarray, str], dict[str, np.ndarray]]
NHWC_TO_NCHW = (0, 3, 1, 2)
NCHW_TO_NHWC = (0, 2, 3, 1)


# ---- Keras models in a chosen dtype, with the softmax taken off -------------------------------


def logits_model(model: keras.Model, dtype: str) -> keras.Model:
    """A copy of `model` computing in `dtype` whose last layer's activation is linear: its output is
    the paper's pre-softmax score (the softmax sits in the last Dense, or in a final Activation
    layer as in MobileNetV3). Weights are copied (and cast); `model` is left as it is."""
    last = model.layers[-1]

    def rebuild(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if "dtype" in config:  # a layer; a Keras op in the graph (ops.add in MobileNetV3) follows its inputs
            config["dtype"] = dtype
        if layer is last:
            assert config.get("activation") == "softmax", f"{last.name} is not a softmax: {config.get('activation')}"
            config["activation"] = "linear"
        return layer.__class__.from_config(config)

    shape = tuple(model.input.shape[1:])
    clone = keras.models.clone_model(model, clone_function=rebuild, input_tensors=keras.Input(shape, dtype=dtype))
    clone.set_weights(model.get_weights())
    return clone


def logits_models(model: keras.Model) -> Callable[[str], keras.Model]:
    """dtype -> `logits_model(model, dtype)`, each built once (a clone of DenseNet121 takes seconds)."""
    clones: dict[str, keras.Model] = {}

    def get(dtype: str) -> keras.Model:
        if dtype not in clones:
            clones[dtype] = logits_model(model, dtype)
        return clones[dtype]

    return get


def default_layer(model: keras.Model) -> str:
    """The Keras layer Grad-CAM explains by default: the input of the last global pooling before
    the classifier (or, in a net without one, of its last Flatten)."""
    pools = [
        m for m in model.layers if isinstance(m, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D))
    ]
    last = (pools or [m for m in model.layers if isinstance(m, keras.layers.Flatten)])[-1]
    return last.input._keras_history.operation.name


# ---- references for tests/conditioning.py ----------------------------------------------------


def gradcam_raw(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """ReLU(Σ_k α_k A_k) with α_k = mean over H, W of dS/dA_k, channels-last [N, H, W, C] -> [N, H, W]."""
    alpha = g.mean(axis=(1, 2), keepdims=True)
    return np.maximum((alpha * a).sum(axis=-1), 0.0)


def forward_at(nets: Callable[[str], keras.Model], layer: str) -> Reference:
    """(x NHWC, dtype) -> {'out': the model's output (softmax), 'logits', 'a': layer's output (NHWC)};
    nets: `logits_models(model)`."""

    def run(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        net = nets(dtype)
        sub = keras.Model(net.input, [net.get_layer(layer).output, net.output])
        a, logits = sub(tf.constant(x, dtype), training=False)
        logits = logits.numpy().astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return {"out": e / e.sum(axis=1, keepdims=True), "logits": logits, "a": a.numpy().astype(np.float64)}

    return run


def gradcam_at(
    nets: Callable[[str], keras.Model], layer: str, classes: Sequence[int] | np.ndarray, features: np.ndarray
) -> Reference:
    """(x NHWC, dtype) -> {'logits', 'g': dS/dA with S = Σ_i logits[i, classes[i]], 'raw': Grad-CAM
    [N, H, W]}, the head (layer -> logits) differentiated by tf.GradientTape at `features` (the
    prepared model's own feature tensor for that x, channels-last) cast to dtype; nets:
    `logits_models(model)`.

    x itself is not used: the head starts at the features, which separates the engine's exactness
    from the forward pass's float32 rounding (a property of the random model, not of the gradient);
    the forward pass is compared by `forward_at`.
    """
    index = np.stack([np.arange(len(classes)), np.asarray(classes)], axis=1)

    def run(_x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        net = nets(dtype)
        head = keras.Model(net.get_layer(layer).output, net.output)
        a = tf.constant(np.asarray(features, np.float64), dtype)
        with tf.GradientTape() as tape:
            tape.watch(a)
            logits = head(a, training=False)
            score = tf.reduce_sum(tf.gather_nd(logits, index))
        g = tape.gradient(score, a).numpy().astype(np.float64)
        a64 = a.numpy().astype(np.float64)
        return {"logits": logits.numpy().astype(np.float64), "g": g, "raw": gradcam_raw(a64, g)}

    return run


# ---- Keras layers in a tf2onnx export ----------------------------------------------------------


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int | str]]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in values}


def layer_tensors(proto: onnx.ModelProto, layer: str, keras_shape: Sequence[int]) -> dict[str, str]:
    """{ONNX tensor name: 'nhwc' | 'nchw'} for every tensor that holds Keras layer `layer`'s output
    (keras_shape: its [H, W, C]): the last output, in graph order, of the nodes in the layer's
    scope (tf2onnx names them `<model>_1/<layer>_1/<op>`) with that shape in either layout, and
    the tensors that Transposes make of it (tf2onnx's layout changes, `Transpose__48` before a
    Flatten).
    """
    h, w, c = (int(d) for d in keras_shape)
    scope = re.compile(rf"^[^/]+/{re.escape(layer)}(_1)?/")
    shapes = _shapes(proto)

    def layout(name: str) -> str | None:
        dims = shapes.get(name, [])[1:]
        return "nhwc" if dims == [h, w, c] else "nchw" if dims == [c, h, w] else None

    found = [o for n in proto.graph.node if scope.match(n.name) for o in n.output if layout(o)]
    if not found:
        raise KeyError(f"no tensor of Keras layer {layer!r} with shape [N, {h}, {w}, {c}] (or NCHW) in the export")
    out = {found[-1]: layout(found[-1]) or ""}
    grew = True
    while grew:  # follow Transposes forwards and backwards
        grew = False
        for n in proto.graph.node:
            if n.op_type != "Transpose":
                continue
            for a, b in ((n.input[0], n.output[0]), (n.output[0], n.input[0])):
                if a in out and b not in out and layout(b):
                    out[b] = layout(b) or ""
                    grew = True
    return out


def to_keras(array: np.ndarray, layout: str) -> np.ndarray:
    """An ONNX tensor of `layout` in Keras's channels-last layout."""
    return array if layout == "nhwc" else np.transpose(array, NCHW_TO_NHWC)


def from_keras(array: np.ndarray, layout: str) -> np.ndarray:
    """A channels-last Keras array in the ONNX tensor's `layout`."""
    return array if layout == "nhwc" else np.transpose(array, NHWC_TO_NCHW)
