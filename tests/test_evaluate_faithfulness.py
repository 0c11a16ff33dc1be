"""Faithfulness metrics against their references: pytorch-grad-cam 1.5.7 (ROAD, confidence change) and
a transcription of RISE's CausalMetric on a torch twin of an exported model; deletion/insertion of
Grad-CAM against baseline maps on the trained demo model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from onnx_gradcam.errors import BadInputError
from onnx_gradcam.evaluation.base import EvalContext, make_context
from onnx_gradcam.evaluation.faithfulness import (
    average_drop_increase,
    confidence_change,
    deletion_insertion,
    rise_kernel,
)
from onnx_gradcam.evaluation.road import impute, imputed_stream, road
from onnx_gradcam.explain.explainer import Explainer

from .demo_set import DEMO, demo_set
from .models import export, tiny_cnn

torch = pytest.importorskip("torch")
pgc_road = pytest.importorskip("pytorch_grad_cam.metrics.road")
pgc_cam_mult = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget  # noqa: E402

SIZE = 64
TOL = 1e-4


class Logits(torch.nn.Module):
    """tiny_cnn without its final softmax: pytorch-grad-cam's softmax target applies its own."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(self.net.pool(self.net.features(x)), 1))


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, EvalContext, np.ndarray]:
    """The torch twin, the context of 4 pictures at 64x64 and Grad-CAM maps of the exported model.

    Random weights put ReLU zeros on 14-83% of a map's pixels; MoRF at a percentile below that share
    removes every pixel, where pytorch-grad-cam's solve is singular (NaN). The pictures are the first
    four whose maps are zero on under 35%, so MoRF at 40..90 is defined for both."""
    net = tiny_cnn(0)
    with torch.no_grad():  # sharper logits: random weights alone leave every probability near 1/5
        net.fc.weight.mul_(40.0)
    path = export(net, tmp_path_factory.mktemp("twin") / "tiny.onnx", size=SIZE)
    exp = Explainer(path, device="cpu", batch_size=16)
    images, _, _ = demo_set(24, seed=5)
    probe = make_context(exp, images)
    maps = exp.explain(probe.x, target=probe.classes).maps
    pick = [i for i in range(len(images)) if (maps[i] == 0).mean() < 0.35][:4]
    assert len(pick) == 4
    ctx = make_context(exp, [images[i] for i in pick])
    return Logits(net).eval(), ctx, maps[pick]


def _targets(ctx: EvalContext) -> list[ClassifierOutputSoftmaxTarget]:
    return [ClassifierOutputSoftmaxTarget(int(c)) for c in ctx.classes]


def test_road_equals_pytorch_grad_cam_with_the_noise_at_0(twin, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, ctx, maps = twin
    # pytorch-grad-cam draws its noise with torch.randn_like: its RNG cannot be matched, so both run noiseless

    class Noiseless(pgc_road.NoisyLinearImputer):
        def __init__(self) -> None:
            super().__init__(noise=0.0)

    monkeypatch.setattr(pgc_road, "NoisyLinearImputer", Noiseless)
    x, cams, targets = torch.from_numpy(ctx.x), maps, _targets(ctx)
    morf_ps, lerf_ps = [40, 60, 80], [10, 50, 90]
    ref_morf = pgc_road.ROADMostRelevantFirstAverage(morf_ps)(x, cams, targets, model)
    ref_lerf = pgc_road.ROADLeastRelevantFirstAverage(lerf_ps)(x, cams, targets, model)
    ref_comb = pgc_road.ROADCombined(morf_ps)(x, cams, targets, model)
    ours = {r.name: r for r in road(ctx, maps, percentiles=morf_ps, noise=0.0)}
    lerf = {r.name: r for r in road(ctx, maps, percentiles=lerf_ps, noise=0.0)}["road_lerf"]
    np.testing.assert_allclose(ours["road_morf"].per_image, ref_morf, atol=TOL)
    np.testing.assert_allclose(lerf.per_image, ref_lerf, atol=TOL)
    np.testing.assert_allclose(ours["road_combined"].per_image, ref_comb, atol=TOL)
    assert np.ptp(ref_morf) > 10 * TOL and np.abs(ref_comb).max() > 10 * TOL  # the comparison can tell maps apart
    assert ours["road_morf"].settings["mode"] == "normalised" and ours["road_morf"].value == pytest.approx(
        float(np.mean(ref_morf)), abs=TOL
    )


def test_road_original_mode_imputes_pixels_then_normalises(twin) -> None:  # type: ignore[no-untyped-def]
    model, ctx, maps = twin
    imputer = pgc_road.NoisyLinearImputer(noise=0.0)
    mean, std = torch.from_numpy(ctx.mean), torch.from_numpy(ctx.std)
    pixels = torch.from_numpy(ctx.pixels)
    with torch.no_grad():
        clean = torch.softmax(model(torch.from_numpy(ctx.x)), 1)[range(len(maps)), ctx.classes].numpy()
        rows = []
        for p in (50, 80):  # pytorch-grad-cam's LeRF mask, its imputer on [0, 1] pixels, then normalised
            keep = [torch.from_numpy(np.float32(1 - m < np.percentile(1 - m, p))) for m in maps]
            imputed = torch.stack([(imputer(pixels[i], keep[i]) - mean) / std for i in range(len(maps))])
            rows.append(torch.softmax(model(imputed), 1)[range(len(maps)), ctx.classes].numpy() - clean)
    ours = {r.name: r for r in road(ctx, maps, mode="original", percentiles=(50, 80), noise=0.0)}
    np.testing.assert_allclose(ours["road_lerf_original"].per_image, np.mean(rows, axis=0), atol=TOL)
    # the imputation is linear with weights summing to 1, so it commutes with the per-channel affine
    # normalisation: noiseless, the two modes agree; they differ in the noise's scale (0.01 of a pixel
    # value vs 0.01 of a normalised one)
    normalised = {r.name: r for r in road(ctx, maps, percentiles=(50, 80), noise=0.0)}["road_lerf"]
    np.testing.assert_allclose(normalised.per_image, ours["road_lerf_original"].per_image, atol=1e-6)
    assert np.abs(ours["road_lerf_original"].per_image).max() > 10 * TOL


def test_imputation_noise_is_seeded_gaussian_on_removed_pixels_only() -> None:
    rs = np.random.RandomState(3)
    values = rs.rand(3, 40, 40).astype(np.float32)
    keep = rs.rand(40, 40) > 0.6
    before = values.copy()
    exact = impute(values, keep, noise=0.0)
    noisy = impute(values, keep, noise=0.01, rng=np.random.default_rng(7))
    again = impute(values, keep, noise=0.01, rng=np.random.default_rng(7))
    other = impute(values, keep, noise=0.01, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(values, before)  # the input is not modified
    np.testing.assert_array_equal(noisy, again)
    assert not np.array_equal(noisy, other)
    np.testing.assert_array_equal(noisy[:, keep], values[:, keep])
    d = (noisy - exact)[:, ~keep].astype(np.float64)  # ~1900 draws of N(0, 0.01^2)
    assert abs(d.std() / 0.01 - 1) < 0.1 and abs(d.mean()) < 0.01 * 4 / math.sqrt(d.size)
    # each removed pixel is the weighted mean of its 8 neighbours (1/6 edge, 1/12 corner), here inside
    y, x = 20, 20
    while keep[y, x]:
        x += 1
    w = np.array([[1, 2, 1], [2, 0, 2], [1, 2, 1]]) / 12
    np.testing.assert_allclose(exact[:, y, x], (exact[:, y - 1 : y + 2, x - 1 : x + 2] * w).sum((1, 2)), atol=1e-6)


def test_a_mask_that_removes_every_pixel_is_filled_with_the_mean(twin) -> None:  # type: ignore[no-untyped-def]
    _, ctx, maps = twin
    flat = np.zeros_like(maps)  # every value tied: MoRF keeps map < percentile = 0, i.e. nothing
    res = {r.name: r for r in road(ctx, flat, percentiles=(50,), noise=0.0)}
    filled = ctx.scorer.probabilities(np.zeros_like(ctx.x))[range(len(maps)), ctx.classes]
    clean = ctx.scorer.probabilities(ctx.x)[range(len(maps)), ctx.classes]
    np.testing.assert_allclose(res["road_morf"].per_image, filled - clean, atol=1e-6)
    assert res["road_morf"].settings["all_removed_count"] == {"morf": len(maps), "lerf": len(maps)}


def test_confidence_change_equals_pytorch_grad_cam(twin) -> None:  # type: ignore[no-untyped-def]
    model, ctx, maps = twin
    x, targets = torch.from_numpy(ctx.x), _targets(ctx)
    ours = {r.name: r for r in confidence_change(ctx, maps)}
    change = pgc_cam_mult.CamMultImageConfidenceChange()(x, maps, targets, model)
    np.testing.assert_allclose(ours["cam_mult_image_confidence_change"].per_image, change, atol=TOL)
    np.testing.assert_allclose(
        ours["drop_in_confidence"].per_image, pgc_cam_mult.DropInConfidence()(x, maps, targets, model), atol=TOL
    )
    np.testing.assert_array_equal(
        ours["increase_in_confidence_pgc"].per_image, pgc_cam_mult.IncreaseInConfidence()(x, maps, targets, model)
    )
    assert np.abs(change).min() > 10 * TOL  # no sign decided by rounding


def test_average_drop_and_increase_follow_grad_cam_plus_plus(twin) -> None:  # type: ignore[no-untyped-def]
    model, ctx, maps = twin
    with torch.no_grad():
        e = (torch.from_numpy(ctx.pixels) * torch.from_numpy(maps)[:, None] - torch.from_numpy(ctx.mean)) / (
            torch.from_numpy(ctx.std)
        )
        o = torch.softmax(model(e), 1)[range(len(maps)), ctx.classes].double().numpy()
        y = torch.softmax(model(torch.from_numpy(ctx.x)), 1)[range(len(maps)), ctx.classes].double().numpy()
    ad, ic = average_drop_increase(ctx, maps)
    np.testing.assert_allclose(ad.per_image, np.maximum(0, y - o) / y * 100, atol=1e-3)  # % units
    assert ad.value == pytest.approx(float(np.mean(np.maximum(0, y - o) / y * 100)), abs=1e-3)
    assert ic.value == pytest.approx(100 * float(np.mean(o > y)))
    assert ad.settings["space"] == "pixels"


def _rise_causal_metric(model, x, maps, mode: str, step: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """RISE's CausalMetric.evaluate (evaluation.py), transcribed: substrates zeros / blur(gkern(11, 5)),
    pixels in order of the map highest first (stable among ties), softmax of the clean top-1 class."""
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    k = gaussian_filter(delta, 5)
    kern = np.zeros((3, 3, 11, 11))
    for c in range(3):
        kern[c, c] = k
    kern = torch.from_numpy(kern.astype("float32"))
    n, hw = len(x), x.shape[2] * x.shape[3]
    n_steps = (hw + step - 1) // step
    scores = np.empty((n_steps + 1, n))
    img_batch = torch.from_numpy(x.copy())
    with torch.no_grad():
        top = model(img_batch).argmax(1).numpy()
        substrate = torch.nn.functional.conv2d(img_batch, kern, padding=11 // 2)
        start, finish = (img_batch.clone(), torch.zeros_like(img_batch)) if mode == "del" else (substrate, img_batch)
        order = torch.argsort(torch.from_numpy(maps).reshape(n, hw), dim=1, descending=True, stable=True).numpy()
        r = np.arange(n).reshape(n, 1)
        for i in range(n_steps + 1):
            scores[i] = torch.softmax(model(start), 1).numpy()[range(n), top]
            coords = order[:, step * i : step * (i + 1)]
            start.numpy().reshape(n, 3, hw)[r, :, coords] = finish.numpy().reshape(n, 3, hw)[r, :, coords]
    return scores.T


def _rise_auc(arr: np.ndarray) -> float:
    return float((arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1))


def test_deletion_insertion_equal_a_transcription_of_rise(twin) -> None:  # type: ignore[no-untyped-def]
    from scipy.ndimage import gaussian_filter

    model, ctx, maps = twin
    delta = np.zeros(11)
    delta[5] = 1
    np.testing.assert_allclose(rise_kernel(11, 5.0), gaussian_filter(delta, 5), atol=1e-12)
    runs = ctx.scorer.runs
    dele, ins = deletion_insertion(ctx, maps)
    step = dele.settings["step"]
    assert step == math.ceil(SIZE * SIZE / 28) and dele.curves["deletion"].shape == (len(maps), 29)
    # every step of every image in runs of the scorer's batch size: 2 x 4 x 29 inputs in 2 x 8 runs
    assert ctx.scorer.runs - runs == 2 * math.ceil(len(maps) * 29 / ctx.scorer.batch_size)
    for res, mode in ((dele, "del"), (ins, "ins")):
        ref = _rise_causal_metric(model, ctx.x, maps, mode, step)
        np.testing.assert_allclose(res.curves[res.name], ref, atol=TOL)
        np.testing.assert_allclose(res.per_image, [_rise_auc(r) for r in ref], atol=TOL)
        assert np.ptp(ref[:, 1:-1]) > 10 * TOL
    np.testing.assert_allclose(dele.curves["x"][[0, 1, -1]], [0, step / SIZE**2, 1])


def test_grad_cam_beats_random_and_centre_maps_on_the_demo_model() -> None:
    images, classes, _ = demo_set(16, seed=11)
    exp = Explainer(DEMO, device="cpu", batch_size=64)
    ctx = make_context(exp, images, truth=classes)
    maps = exp.explain(ctx.x, target=ctx.classes).maps
    h, w = maps.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    centre = np.exp(-((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * (h / 4) ** 2))
    baselines = {
        "random": np.random.default_rng(0).random(maps.shape).astype(np.float32),
        "centre": np.broadcast_to(centre, maps.shape).astype(np.float32),
    }
    cam_del, cam_ins = (r.value for r in deletion_insertion(ctx, maps))
    for name, base in baselines.items():
        b_del, b_ins = (r.value for r in deletion_insertion(ctx, base))
        assert cam_del < b_del - 0.05, (name, cam_del, b_del)
        assert cam_ins > b_ins + 0.05, (name, cam_ins, b_ins)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda ctx, m: road(ctx, m, percentiles=(0, 50)), "percentiles"),
        (lambda ctx, m: road(ctx, m, percentiles=(50, 100)), "percentiles"),
        (lambda ctx, m: road(ctx, m, mode="pixels"), "mode"),
        (lambda ctx, m: road(ctx, m, noise=-1), "noise"),
        (lambda ctx, m: road(ctx, m[:, :-1]), "shape"),
        (lambda ctx, m: deletion_insertion(ctx, m[:1]), "shape"),
        (lambda ctx, m: deletion_insertion(ctx, m, step=0), "step"),
        (lambda ctx, m: deletion_insertion(ctx, m, score="margin"), "score"),
        (lambda ctx, m: average_drop_increase(ctx, m, space="lab"), "space"),
        (lambda ctx, m: confidence_change(ctx, m * np.nan), "non-finite"),
    ],
)
def test_bad_options_are_one_line_errors(twin, call, match: str) -> None:  # type: ignore[no-untyped-def]
    _, ctx, maps = twin
    before = maps.copy()
    with pytest.raises(BadInputError, match=match) as info:
        call(ctx, maps)
    assert "\n" not in str(info.value) and "to fix this" in str(info.value)
    np.testing.assert_array_equal(maps, before)


def test_metrics_record_their_choices(twin) -> None:  # type: ignore[no-untyped-def]
    _, ctx, maps = twin
    for res in [*deletion_insertion(ctx, maps), *road(ctx, maps, percentiles=(90,))]:
        for key in ("score", "space", "reference"):
            assert key in res.settings, (res.name, key)
        assert json.loads(json.dumps(res.to_json()))["settings"] == json.loads(json.dumps(res.settings))


def test_threaded_imputation_stream_equals_imputing_one_job_after_another() -> None:
    # the solves run in threads, ahead and out of order; the noise must still be drawn in job order
    rs = np.random.RandomState(5)
    jobs = []
    for k in range(7):
        values = rs.rand(3, 30, 30).astype(np.float32)
        keep = rs.rand(30, 30) > (0.9, 0.5, 0.1)[k % 3]
        if k == 3:
            keep[:] = True  # nothing removed
        if k == 5:
            keep[:] = False  # everything removed: the fill plus noise
        jobs.append((values, keep))
    fill = np.array([0.1, 0.2, 0.3])
    rng = np.random.default_rng(11)
    one_by_one = [impute(v, k, 0.01, rng, fill) for v, k in jobs]
    threaded = list(imputed_stream(iter(jobs), 0.01, np.random.default_rng(11), fill, workers=3, ahead=4))
    assert len(threaded) == len(jobs)
    for a, b in zip(one_by_one, threaded):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(threaded[5].mean(axis=(1, 2)), fill, atol=0.003)
