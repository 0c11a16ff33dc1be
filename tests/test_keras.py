"""Ring 2 for Keras: keras.applications exported by tf2onnx 1.17 (channels-last and channels-first
feature maps) against tf.GradientTape, at the default layer and at an earlier block.

Measured on 2 cores: 2.3 min with the exports cached in .cache/keras; 7.5 min from nothing (the
exports, made by tools/export_keras.py in child processes, take about 5 min, ResNet50 peaks at
8.6 GB). A Keras ResNet50's own forward pass amplifies float32 rounding with depth (float32 vs
float64: 6.5e-7 at conv1_relu, 8e-5 at conv5_block3_out), hence the derived tolerances there.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

from onnx_gradcam import prepare  # noqa: E402

from . import keras_ref  # noqa: E402
from .conditioning import derived_tolerances, per_sample_error, well_conditioned, with_nudged  # noqa: E402
from .conftest import cpu_session  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from export_keras import ARCHITECTURES, DEFAULT_SIZE, build, paths, pixels  # noqa: E402

CACHE = ROOT / ".cache" / "keras"
SIZE = DEFAULT_SIZE  # 96 px: a 3x3 last grid
CLASSES = [3, 7]  # the small CNN has 10 classes
EXACT = 1e-4  # relative to each sample's largest magnitude
# architecture -> an earlier Keras layer (6x6 at 96 px) whose path to the logits holds strided
# depthwise Convs, squeeze-excitation, hard-swish and residual Adds (MobileNetV3Small: NHWC in the
# export) or bottleneck blocks (ResNet50: NCHW)
EARLIER = {"MobileNetV3Small": "expanded_conv_7_add", "ResNet50": "conv4_block6_out"}
CASES = [(name, "default") for name in ARCHITECTURES] + [(name, "earlier") for name in EARLIER]
IDS = [f"{n}-{w}" for n, w in CASES]


def exported(name: str) -> Path:
    """The cached export; made in a child process when missing (tf2onnx on ResNet50 peaks at 8.9 GB,
    which this process would keep)."""
    _, path = paths(name, CACHE, SIZE)
    if not path.is_file():
        tool = ROOT / "tools" / "export_keras.py"
        subprocess.run([sys.executable, str(tool), "--out", str(CACHE), "--size", str(SIZE), name], check=True)
    return path


@dataclass(frozen=True)
class Case:
    name: str
    layer: str  # the Keras layer explained
    tensors: dict[str, str]  # the ONNX tensors that hold its output, and their layouts
    chosen: str  # the feature tensor prepare chose with the defaults (or was given)
    layout: str  # of the tensor the outputs below are for
    classes: np.ndarray
    got: dict[str, np.ndarray]
    forward: dict[str, np.ndarray]  # Keras float64 forward pass
    forward_tols: dict[str, float]
    head: dict[str, np.ndarray]  # Keras float64 gradient at the prepared model's features


_MODELS: dict[str, tuple] = {}  # name -> (keras model, logits_models getter)
_CASES: dict[tuple[str, str], Case] = {}


def keras_model(name: str) -> tuple:
    if name not in _MODELS:
        exported(name)
        model = build(name, CACHE, SIZE)
        _MODELS[name] = (model, keras_ref.logits_models(model))
    return _MODELS[name]


def run_case(name: str, which: str, tmp: Path) -> Case:
    """Prepare the export (defaults, or the earlier layer's tensor), run it, and the references."""
    if (name, which) in _CASES:
        return _CASES[name, which]
    src = exported(name)
    model, nets = keras_model(name)
    layer = keras_ref.default_layer(model) if which == "default" else EARLIER[name]
    proto = onnx.load(str(src))
    tensors = keras_ref.layer_tensors(proto, layer, model.get_layer(layer).output.shape[1:])
    out = tmp / f"{name}.{which}.onnx"
    report = prepare(src, out, feature_layer=None if which == "default" else next(iter(tensors)), expose_gradient=True)
    chosen = report.feature_tensor
    if chosen not in tensors:
        # a wrong default (test_default_layer says so): check the engine at the right layer anyway
        report = prepare(src, out, feature_layer=next(iter(tensors)), expose_gradient=True)
    layout = tensors[report.feature_tensor]

    x = with_nudged(pixels(name) * np.random.RandomState(0).rand(2, SIZE, SIZE, 3))  # and a 1e-6 nudge
    classes = np.array(CLASSES * 2, np.int64)
    sess = cpu_session(out.read_bytes())
    (image,) = [i.name for i in sess.get_inputs() if not i.name.startswith("gradcam")]  # tf2onnx: keras_tensor
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {image: x, "gradcam_class": classes})))

    label = f"{name} {which}"
    forward, tols = derived_tolerances(keras_ref.forward_at(nets, layer), x, EXACT, label)
    features = keras_ref.to_keras(got["gradcam_features"], layout)
    head = well_conditioned(keras_ref.gradcam_at(nets, layer, classes, features), x, EXACT, label)
    case = Case(name, layer, tensors, chosen, layout, classes, got, forward, tols, head)
    _CASES[name, which] = case
    return case


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keras")


@pytest.mark.parametrize(("name", "which"), CASES, ids=IDS)
def test_features_and_gradient_equal_keras(name: str, which: str, tmp: Path) -> None:
    c = run_case(name, which, tmp)
    assert per_sample_error(c.got["predictions"], c.forward["out"]) < c.forward_tols["out"]
    features = keras_ref.to_keras(c.got["gradcam_features"], c.layout)
    assert per_sample_error(features, c.forward["a"]) < c.forward_tols["a"], f"{c.layer}: features differ"
    gradient = keras_ref.to_keras(c.got["gradcam_gradient"], c.layout)
    err = per_sample_error(gradient, c.head["g"])
    print(f"{name} {which} ({c.layer}, {c.layout}): gradient {err:.2e}")
    assert err < EXACT, f"{name} {which}: gradient differs from tf.GradientTape by {err:.2e}"
    score = c.head["logits"][np.arange(len(c.classes)), c.classes]
    assert per_sample_error(c.got["gradcam_score"][:, None], score[:, None]) < EXACT
    np.testing.assert_array_equal(c.got["gradcam_target"], c.classes)


@pytest.mark.parametrize(("name", "which"), CASES, ids=IDS)
def test_raw_map_equals_keras(name: str, which: str, tmp: Path) -> None:
    c = run_case(name, which, tmp)
    raw, expected = c.got["gradcam_raw"], c.head["raw"]
    assert raw.shape == expected.shape, (
        f"{name} {which} ({c.layout}): gradcam_raw {raw.shape}, expected {expected.shape}"
    )
    err = per_sample_error(raw, expected)
    print(f"{name} {which}: raw {err:.2e}")
    assert err < EXACT, f"{name} {which}: gradcam_raw differs from Keras Grad-CAM by {err:.2e}"
    assert c.got["gradcam_map"].shape == (len(c.classes), SIZE, SIZE)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_default_layer_is_last_spatial_map(name: str, tmp: Path) -> None:
    """The default is the feature map that feeds the global pooling (or Flatten), never after it."""
    c = run_case(name, "default", tmp)
    assert c.chosen in c.tensors, f"{name}: default layer {c.chosen!r}, expected one of {sorted(c.tensors)} ({c.layer})"
