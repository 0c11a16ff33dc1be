"""Grad-CAM weights from spatial sums folded at prepare time, for dense heads (VGG's Flatten-Linear).

α_k = mean_ij ∂y/∂A_kij needs only Σ_ij of the gradient; through sum-preserving ops (MaxPool,
AveragePool without counted padding) and a Flatten into a Linear, that sum is dZ @ Mc with
Mc[i, k] = Σ_p W[i, k*P + p] folded at prepare time. These tests compare the maps with torch
autograd, check where the fold must and must not be used, and that the full gradient agrees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_gradcam import prepare

from .conditioning import per_sample_error, well_conditioned, with_nudged
from .conftest import cpu_session
from .models import export
from .torch_ref import autograd_at, with_raw

torch = pytest.importorskip("torch")
nn = torch.nn

SIZE = 12
EXACT = 1e-5  # relative to each sample's largest magnitude


def dense_head(pool: nn.Module | None, hidden: int | None) -> nn.Module:
    """conv-ReLU (the explained layer) -> pool -> Flatten -> Linear(-ReLU-Linear) -> 5 logits."""
    torch.manual_seed(0)
    feature = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    pooled = nn.Sequential(pool) if pool is not None else nn.Identity()
    with torch.no_grad():
        flat = pooled(feature(torch.zeros(1, 3, SIZE, SIZE))).numel()
    head = [nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 5)] if hidden else [nn.Linear(flat, 5)]
    return nn.Sequential(feature, pooled, nn.Flatten(), *head).eval()


def folded(path: Path) -> bool:
    """Whether the prepared model carries a folded channel-sum weight."""
    model = onnx.load(str(path))
    return any("flatten_channel_weight" in init.name for init in model.graph.initializer)


CASES = {
    # name: (pool, hidden units, whether the spatial sum survives the pool)
    "flatten": (None, 16, True),
    "maxpool": (nn.MaxPool2d(2), 16, True),
    "maxpool-overlapping": (nn.MaxPool2d(3, stride=2, padding=1), 16, True),
    "avgpool": (nn.AvgPool2d(2), 16, True),
    "avgpool-padding-excluded": (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), 16, True),
    "avgpool-padding-counted": (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True), 16, False),
    "one-linear": (nn.MaxPool2d(2), None, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_folded_weights_equal_autograd(name: str, tmp_path: Path) -> None:
    pool, hidden, expect_fold = CASES[name]
    model = dense_head(pool, hidden)
    src = export(model, tmp_path / "m.onnx", size=SIZE)
    feature = next(n.output[0] for n in onnx.load(str(src)).graph.node if n.op_type == "Relu")
    x = with_nudged(np.random.RandomState(1).randn(3, 3, SIZE, SIZE))  # and a 1e-6 nudge: the same verdict
    classes = np.array([2, -1, 4] * 2, np.int64)  # -1: the top class
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    chosen = [int(c) if c >= 0 else int(logits[i].argmax()) for i, c in enumerate(classes)]
    score = lambda out: out[torch.arange(len(chosen)), torch.tensor(chosen)].sum()  # noqa: E731
    ref = well_conditioned(with_raw(autograd_at(model, "0", score)), x, EXACT, name)
    g, expected = ref["g"], ref["raw"]
    raws = {}
    for expose in (False, True):
        out = tmp_path / f"m.{expose}.gradcam.onnx"
        prepare(src, out, feature_layer=feature, expose_gradient=expose)
        sess = cpu_session(out.read_bytes())
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, sess.run(None, {"input": x, "gradcam_class": classes})))
        np.testing.assert_array_equal(got["gradcam_target"], chosen)
        raws[expose] = got["gradcam_raw"]
        assert per_sample_error(got["gradcam_raw"], expected) < EXACT, f"{name}, expose_gradient={expose}"
        if expose:
            assert per_sample_error(got["gradcam_gradient"], g) < EXACT
        assert folded(out) == expect_fold, f"{name}: fold used {folded(out)}, expected {expect_fold}"
    # the folded weights and the full gradient's mean give the same map
    assert per_sample_error(raws[False], raws[True]) < EXACT


def test_fold_drops_the_backward_product_with_the_large_weight(tmp_path: Path) -> None:
    model = dense_head(nn.MaxPool2d(2), 16)
    src = export(model, tmp_path / "m.onnx", size=SIZE)
    first = model[3].weight.shape  # the Linear after Flatten: [16, 8 * 6 * 6]
    feature = next(n.output[0] for n in onnx.load(str(src)).graph.node if n.op_type == "Relu")
    out = tmp_path / "m.gradcam.onnx"
    prepare(src, out, feature_layer=feature)
    m = onnx.load(str(out))
    weight = next(i.name for i in m.graph.initializer if list(i.dims) == list(first))
    appended = [n for n in m.graph.node if n.name.startswith("gradcam/")]
    assert not [n.op_type for n in appended if weight in n.input], "the backward pass still reads the whole weight"
    mc = next(i for i in m.graph.initializer if "flatten_channel_weight" in i.name)
    w = model[3].weight.detach().numpy()
    np.testing.assert_allclose(onnx.numpy_helper.to_array(mc), w.reshape(16, 8, 36).sum(2), rtol=1e-5, atol=1e-6)
