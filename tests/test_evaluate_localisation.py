"""Localisation metrics and the sanity check: hand-derived cases, test-local transcriptions of the
references (TorchRay's pointing game, CAM's box rule), and the trained demo model with known boxes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_gradcam.errors import BadInputError
from onnx_gradcam.evaluation.base import EvalContext, make_context
from onnx_gradcam.evaluation.localisation import (
    connected_components,
    energy_pointing_game,
    largest_segment_box,
    localisation,
    pointing_game,
)
from onnx_gradcam.evaluation.sanity import (
    cascading_randomisation,
    randomised,
    rankdata,
    source_model,
    spearman,
    weight_blocks,
)
from onnx_gradcam.explain.explainer import Explainer

from .demo_set import DEMO, demo_set


def context(
    h: int, w: int, boxes: list, classes: list[int], truth: list[int] | None = None, n: int | None = None
) -> EvalContext:
    """A context of n (default: one per box list) blank images for metrics that read only maps, boxes and classes."""
    n = len(boxes) if n is None else n
    pixels = np.zeros((n, 3, h, w), np.float32)
    one = np.ones((3, 1, 1), np.float32)
    truth_arr = np.asarray(truth if truth is not None else [-1] * n, np.int64)
    return EvalContext(
        pixels, pixels, np.asarray(classes, np.int64), np.zeros((n, 2), np.float32), 0 * one, one, False, None,  # type: ignore[arg-type]
        [f"im{i}" for i in range(n)], boxes, truth_arr,
    )  # fmt: skip


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and "to fix this" in text
    return text


# -- pointing game ----------------------------------------------------------------------------


def test_pointing_game_by_hand() -> None:
    # the maximum at row 20, column 5; TorchRay's acceptance is strict: distance^2 < 15^2
    peak = np.zeros((40, 40), np.float32)
    peak[20, 5] = 1.0
    # box from x0 = 20: its nearest pixel is column 20 (centre 20.5), 15 px away -> a miss;
    # from x0 = 19: column 19, 14 px away -> a hit; a box around the point -> a hit
    near, edge, around = [[19, 0, 30, 40]], [[20, 0, 30, 40]], [[0, 15, 10, 25]]
    # ties: maxima at (row 2, col 30) and (row 30, col 2); the first in row-major order is (2, 30)
    tie = np.zeros((40, 40), np.float32)
    tie[2, 30] = tie[30, 2] = 1.0
    only_second = [[0, 25, 6, 35]]  # holds (30, 2), 28 px from (2, 30)
    ctx = context(40, 40, [near, around, edge, only_second, []], [0, 0, 0, 1, 1])
    r = pointing_game(ctx, np.stack([peak, peak, peak, tie, tie]))[0]
    assert r.per_image[:4].tolist() == [1.0, 1.0, 0.0, 0.0] and np.isnan(r.per_image[4])
    assert r.value == pytest.approx((2 / 3 + 0.0) / 2)  # mean over classes: class 0 2/3, class 1 0/1
    assert r.settings["hit_rate"] == pytest.approx(0.5)
    assert r.settings["per_class"] == {0: pytest.approx(2 / 3), 1: 0.0}
    # the true class, where known, groups the images
    ctx_truth = context(40, 40, [near, around, edge, only_second], [0, 0, 0, 1], truth=[0, 1, 1, 1])
    r = pointing_game(ctx_truth, np.stack([peak, peak, peak, tie]))[0]
    assert r.value == pytest.approx((1.0 + 1 / 3) / 2)
    # a larger tolerance reaches the edge box (15 < 16)
    r = pointing_game(context(40, 40, [edge], [0]), peak[None], tolerance=16)[0]
    assert r.value == 1.0


def torchray_pointing(maps: np.ndarray, masks: np.ndarray, classes: np.ndarray, k: int, tol: int = 15) -> tuple:
    """Test-local transcription of TorchRay's PointingGame (torchray/benchmark/pointing_game.py) and
    its benchmark's _saliency_to_point, in torch: the point is the flat argmax (u = i % w, v = i // w);
    a hit when mask & ((y - v)^2 + (x - u)^2 < tol^2) has any pixel; accuracy = mean over classes of
    hits / (hits + misses).clamp(min=1)."""
    torch = pytest.importorskip("torch")
    hits, misses = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    per = []
    for m, mask, c in zip(maps, masks, classes):
        s = torch.from_numpy(m)[None, None]
        i = torch.argmax(s.view(1, -1), dim=1, keepdim=True)
        u, v = int(i % s.shape[3]), int(i // s.shape[3])
        gy, gx = torch.meshgrid(
            (torch.arange(mask.shape[0], dtype=torch.float32) - v) ** 2,
            (torch.arange(mask.shape[1], dtype=torch.float32) - u) ** 2,
            indexing="ij",
        )
        hit = bool((torch.from_numpy(mask) & ((gy + gx) < tol**2)).view(-1).any())
        per.append(float(hit))
        (hits if hit else misses)[int(c)] += 1
    return np.array(per), float((hits / (hits + misses).clamp(min=1)).mean())


def test_pointing_game_matches_torchray_rule() -> None:
    rs = np.random.RandomState(3)
    n, h, w, k = 60, 48, 56, 3
    maps = rs.rand(n, h, w).astype(np.float32) ** 4
    maps[::7] = np.round(maps[::7] * 3) / 3  # many ties of the maximum
    boxes, masks = [], np.zeros((n, h, w), bool)
    for i in range(n):
        own = []
        for _ in range(1 + i % 2):  # integer boxes: pixels x0..x1-1 = TorchRay's VOC mask of [x0+1, x1]
            x0, y0 = rs.randint(0, w - 4), rs.randint(0, h - 4)
            x1, y1 = rs.randint(x0 + 1, min(w, x0 + 12) + 1), rs.randint(y0 + 1, min(h, y0 + 12) + 1)
            own.append([x0, y0, x1, y1])
            masks[i, y0:y1, x0:x1] = True
        boxes.append(own)
    classes = np.arange(n) % k
    want_per, want = torchray_pointing(maps, masks, classes, k)
    assert 0.2 < want_per.mean() < 0.8  # both outcomes occur
    r = pointing_game(context(h, w, boxes, list(classes)), maps)[0]
    np.testing.assert_array_equal(r.per_image, want_per)
    assert r.value == pytest.approx(want, abs=1e-12)
    # TorchRay's own form, masks: the same masks give the same answers
    r = pointing_game(context(h, w, [[] for _ in boxes], list(classes)), maps, masks=masks)[0]
    np.testing.assert_array_equal(r.per_image, want_per)


# -- energy-based pointing game ----------------------------------------------------------------


def test_energy_pointing_game_by_hand() -> None:
    m = np.ones((2, 4, 4), np.float32)
    m[0, 0, 0] = 3.0  # total 18; the box [0, 0, 2, 2] holds 3 + 1 + 1 + 1 = 6
    m[1] = 0.0  # no mass: no share
    two = [[0, 0, 2, 2], [1, 1, 3, 2]]  # union: the first box and (1, 2) -> 7 / 18
    r = energy_pointing_game(context(4, 4, [[[0, 0, 2, 2]], [[0, 0, 4, 4]]], [0, 0]), m)[0]
    assert r.per_image[0] == pytest.approx(6 / 18) and np.isnan(r.per_image[1])
    assert r.value == pytest.approx(6 / 18) and r.settings["maps_without_mass"] == 1
    r = energy_pointing_game(context(4, 4, [two], [0]), m[:1])[0]
    assert r.value == pytest.approx(7 / 18)
    # a float box keeps the pixels whose centres it holds: [0.4, 0, 1.6, 1] -> (0, 0) and (0, 1)
    r = energy_pointing_game(context(4, 4, [[[0.4, 0, 1.6, 1]]], [0]), m[:1])[0]
    assert r.value == pytest.approx(4 / 18)
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0, 0] = mask[0, 3, 3] = True  # a mask instead of boxes: (3 + 1) / 18
    assert energy_pointing_game(context(4, 4, [[]], [0]), m[:1], masks=mask)[0].value == pytest.approx(4 / 18)


# -- the Grad-CAM paper's localisation ----------------------------------------------------------


def test_connected_components_by_hand() -> None:
    mask = np.zeros((1, 4, 5), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # touching at a corner only
    mask[0, 3, 2:5] = True
    eight = connected_components(mask, 8)[0]
    four = connected_components(mask, 4)[0]
    assert eight[0, 0] == eight[1, 1] == 0 and set(eight[3, 2:5].tolist()) == {17}
    assert four[0, 0] == 0 and four[1, 1] == 6 and (eight[~mask[0]] == -1).all()


def test_connected_components_match_scipy() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rs = np.random.RandomState(0)
    masks = rs.rand(6, 33, 41) < 0.45
    spiral = np.zeros((33, 41), bool)  # one long path: propagation needs many steps
    spiral[1::4, 1:-1] = True
    spiral[1:-1, 1::4] = False
    for r in range(1, 31, 4):
        spiral[r : r + 5, 39 if (r // 4) % 2 == 0 else 1] = True
    masks[0] = spiral
    for conn in (4, 8):
        structure = np.ones((3, 3)) if conn == 8 else None
        ours = connected_components(masks, conn)
        for i in range(len(masks)):
            ref, count = ndimage.label(masks[i], structure=structure)
            # same partition: a one-to-one map between the two labellings
            pairs = set(zip(ours[i][masks[i]].tolist(), ref[masks[i]].tolist()))
            assert len(pairs) == count == len({a for a, _ in pairs})


def cam_box_reference(m: np.ndarray, threshold: float = 0.15) -> list[float] | None:
    """Test-local transcription of CAM/Grad-CAM's box rule with scipy: pixels > threshold x max,
    the largest 8-connected segment, its bounding box as continuous coordinates."""
    ndimage = pytest.importorskip("scipy.ndimage")
    labels, count = ndimage.label(m > threshold * m.max(), structure=np.ones((3, 3)))
    if count == 0 or m.max() <= 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    r, c = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return [c.min(), r.min(), c.max() + 1, r.max() + 1]


def test_localisation_by_hand() -> None:
    m = np.full((10, 10), 0.15)  # exactly 15% of the maximum (float64): off, strictly above only
    m[1:4, 1:4] = 1.0  # 9 pixels
    m[6:10, 5:10] = 0.5  # 20 pixels: the largest segment -> box [5, 6, 10, 10]
    maps = np.stack([m] * 5)
    boxes = [
        [[5, 6, 10, 10]],  # IoU 1
        [[5, 6, 10, 8]],  # IoU 10 / 20 = 0.5: correct
        [[5, 6, 10, 7.9]],  # IoU 9.5 / 20 < 0.5
        [[0, 0, 4, 4], [5, 6, 10, 10]],  # the best of several true boxes
        [[5, 6, 10, 10]],  # right box, wrong class
    ]
    ctx = context(10, 10, boxes, [1, 1, 1, 1, 0], truth=[1, 1, 1, 1, 1])
    r = localisation(ctx, maps)[0]
    assert r.per_image.tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert r.value == pytest.approx(2 / 5)
    assert r.settings["classification_error"] == pytest.approx(1 / 5)
    assert r.settings["box_error"] == pytest.approx(1 / 5)
    np.testing.assert_allclose(r.curves["iou"], [1.0, 0.5, 0.475, 1.0, 1.0])
    np.testing.assert_array_equal(r.curves["box"][0], [5, 6, 10, 10])
    # 4-connectivity splits a diagonal chain that 8-connectivity keeps whole
    d = np.zeros((1, 6, 6), np.float32)
    d[0, np.arange(6), np.arange(6)] = 1.0
    d[0, 0, 3:5] = 1.0
    np.testing.assert_array_equal(largest_segment_box(d, connectivity=8)[0], [0, 0, 6, 6])
    np.testing.assert_array_equal(largest_segment_box(d, connectivity=4)[0], [3, 0, 5, 1])
    # an all-zero map has no segment: IoU 0, an error
    r = localisation(context(10, 10, [[[0, 0, 5, 5]]], [0], truth=[0]), np.zeros((1, 10, 10), np.float32))[0]
    assert r.value == 1.0 and r.curves["iou"][0] == 0.0


def test_localisation_boxes_match_reference() -> None:
    rs = np.random.RandomState(1)
    yy, xx = np.mgrid[0:30, 0:40]
    maps = np.zeros((12, 30, 40))
    for i in range(12):  # a few blobs each, so the largest segment is a real choice
        for _ in range(3):
            cy, cx, s = rs.uniform(0, 30), rs.uniform(0, 40), rs.uniform(1.5, 5)
            maps[i] += rs.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    ours = largest_segment_box(maps)
    for i in range(12):
        np.testing.assert_array_equal(ours[i], cam_box_reference(maps[i]))


# -- bad input --------------------------------------------------------------------------------


def test_bad_input_one_line() -> None:
    m = np.zeros((1, 8, 8), np.float32)
    for boxes, what in [
        ([[[4, 0, 2, 8]]], "empty or reversed"),
        ([[[0, 0, 2, np.nan]]], "NaN"),
        ([[[20, 20, 30, 30]]], "outside"),
        ([[]], "none were given"),
        ([], "box lists"),
    ]:
        with pytest.raises(BadInputError) as exc:
            pointing_game(context(8, 8, boxes, [0], n=1), m)
        assert what in one_line(exc)
    exp = Explainer(str(DEMO), device="cpu", threads=1)
    images, _, _ = demo_set(2)
    for boxes in ([[1, 2, 3, 4], [[1, 2, 3, 4]]], [[[1, 2, 3]], []], [[["a", 1, 2, 3]], []], [[[1, 2, 3, 4]]]):
        with pytest.raises(BadInputError) as exc:
            make_context(exp, images, boxes=boxes)  # type: ignore[arg-type]
        one_line(exc)
    with pytest.raises(BadInputError) as exc:
        localisation(context(8, 8, [[[0, 0, 4, 4]]], [0]), m)
    assert "true class" in one_line(exc)
    with pytest.raises(BadInputError) as exc:
        energy_pointing_game(context(8, 8, [[[0, 0, 4, 4]]], [0]), np.zeros((1, 4, 4), np.float32))
    assert "maps have shape" in one_line(exc)
    with pytest.raises(BadInputError) as exc:
        pointing_game(context(8, 8, [[[0, 0, 4, 4]]], [0]), m, tolerance=-1)
    one_line(exc)
    with pytest.raises(BadInputError) as exc:
        pointing_game(context(8, 8, [[]], [0]), m, masks=np.ones((1, 4, 4), bool))
    assert "masks have shape" in one_line(exc)


# -- Spearman ---------------------------------------------------------------------------------


def test_spearman_by_hand_and_against_scipy() -> None:
    np.testing.assert_array_equal(rankdata(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])
    # ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5)
    assert spearman(np.array([1, 2, 2, 3.0]), np.array([1, 2, 3, 4.0])) == pytest.approx(4.5 / np.sqrt(22.5))
    assert np.isnan(spearman(np.zeros(5), np.arange(5.0)))
    stats = pytest.importorskip("scipy.stats")
    rs = np.random.RandomState(2)
    for _ in range(5):
        a = np.round(rs.rand(300) * 7) * (rs.rand(300) > 0.4)  # ties and zeros, as in ReLU maps
        b = a + rs.randn(300) * rs.uniform(0.1, 5)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


# -- the trained demo model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> tuple[Explainer, EvalContext, np.ndarray]:
    images, classes, boxes = demo_set(40)
    exp = Explainer(str(DEMO), device="cpu", threads=2)
    ctx = make_context(exp, images, boxes=[[b] for b in boxes], truth=classes)
    return exp, ctx, exp.explain(ctx.x, target=list(ctx.classes)).maps


def test_demo_pointing_and_localisation(demo: tuple[Explainer, EvalContext, np.ndarray]) -> None:
    exp, ctx, maps = demo
    noise = np.random.RandomState(0).rand(*maps.shape).astype(np.float32)
    cam = pointing_game(ctx, maps)[0]
    assert cam.value >= 0.9
    assert pointing_game(ctx, noise)[0].value < cam.value - 0.4
    energy = energy_pointing_game(ctx, maps)[0].value
    assert energy > 2 * energy_pointing_game(ctx, noise)[0].value
    loc = localisation(ctx, maps)[0]
    assert loc.settings["classification_error"] == pytest.approx(float(np.mean(ctx.classes != ctx.truth)))
    assert loc.value <= localisation(ctx, noise)[0].value - 0.2
    assert 0 < loc.settings["classification_error"] <= loc.value < 1


def test_demo_cascading_randomisation(demo: tuple[Explainer, EvalContext, np.ndarray]) -> None:
    exp, ctx, maps = demo
    r = cascading_randomisation(exp, ctx, seed=0)[0]
    assert r.settings["blocks"] == ["/17", "/12", "/8", "/4", "/0"]  # Gemm, then the convs downward
    assert r.curves["spearman"].shape == (len(maps), 5)
    assert r.curves["spearman_none"].min() > 0.999  # prepared again, nothing randomised: the same maps
    assert r.curves["mean"][1] < 0.3  # the last two blocks randomised
    assert np.nanmax(np.abs(r.curves["mean"])) < 0.6


def test_randomised_keeps_graph_and_scale() -> None:
    source = source_model(Explainer(str(DEMO), device="cpu", threads=1))
    original = onnx.load(DEMO)  # the forward part of the prepared model is the original model
    assert [o.name for o in source.graph.output] == [o.name for o in original.graph.output]
    assert [n.SerializeToString() for n in source.graph.node] == [n.SerializeToString() for n in original.graph.node]
    assert sorted(t.name for t in source.graph.initializer) == sorted(t.name for t in original.graph.initializer)
    blocks = weight_blocks(source)
    assert blocks[0].initializers == ("17.weight", "17.bias")
    names = set(blocks[1].initializers)
    out = randomised(source, names, np.random.default_rng(0))
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in source.graph.node]
    before = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    for t in out.graph.initializer:
        w, w0 = numpy_helper.to_array(t), before[t.name]
        if t.name in names:
            assert w.shape == w0.shape and not np.allclose(w, w0)
            assert abs(w.mean() - w0.mean()) < 0.2 * w0.std() and w.std() == pytest.approx(w0.std(), rel=0.2)
        else:
            np.testing.assert_array_equal(w, w0)
    assert not any(p.key.startswith("gradcam.") for p in source.metadata_props)
    onnx.checker.check_model(out)


def test_weights_held_in_constant_nodes_are_found_and_randomised() -> None:
    """Some exporters keep weights in Constant nodes, not initializers: they form blocks as well,
    and randomising one changes that Constant's value only (the graph otherwise untouched)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    g = rng.standard_normal((4, 2)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], name="/conv/w", value=numpy_helper.from_array(w, "w")),
            helper.make_node("Conv", ["x", "w"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Constant", [], ["g"], name="/fc/g", value=numpy_helper.from_array(g, "g")),
            helper.make_node("MatMul", ["f", "g"], ["y"], name="/fc/MatMul"),
        ],
        "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    blocks = weight_blocks(model)
    assert [(b.name, b.initializers) for b in blocks] == [("/fc", ("g",)), ("/conv", ("w",))]
    out = randomised(model, {"w"}, np.random.default_rng(0))
    values = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in out.graph.node if n.op_type == "Constant"}
    np.testing.assert_array_equal(values["g"], g)
    assert values["w"].shape == w.shape and not np.allclose(values["w"], w)
    assert abs(values["w"].std() - w.std()) < 0.2 * w.std()
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
    onnx.checker.check_model(out)
