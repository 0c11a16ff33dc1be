"""report.html in a real headless Chromium (the system package, driven by Playwright): it renders
with no console error and nothing fetched, its plots are loaded and drawn, the gallery sorts and
marks misclassified images; and the 1-D signal plots, by matplotlib or by Pillow without it."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnx_gradcam
from onnx_gradcam.explain.overlay import colorize
from onnx_gradcam.explain.signals import plot_signal, plot_signal_pillow

from .demo_set import DEMO, demo_set
from .test_webpage import chromium

LABELS = (DEMO.parent / "labels.txt").read_text().split()
METHODS = ["gradcam", "gradcam++"]
WRONG = 1  # this image's true class is given as another one: the report must mark it misclassified


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, object]:  # type: ignore[type-arg]
    folder = tmp_path_factory.mktemp("report")
    images, classes, boxes = demo_set(6, seed=11)
    paths, entries = [], {}
    for i, (img, cls, box) in enumerate(zip(images, classes, boxes)):
        paths.append(folder / f"shape{i}.png")
        img.save(paths[-1])
        truth = (cls + 1) % len(LABELS) if i == WRONG else cls
        entries[paths[-1].name] = {"class": LABELS[truth], "box": [int(v) for v in box]}
    (folder / "boxes.json").write_text(json.dumps(entries))
    metrics = ["deletion", "insertion", "average-drop", "pointing-game", "sanity"]
    result = onnx_gradcam.evaluate(
        DEMO,
        paths,
        boxes=folder / "boxes.json",
        methods=METHODS,
        metrics=metrics,
        out_dir=folder / "out",
        device="cpu",
        verify=False,  # prepare's self-check of each model the sanity check rebuilds: tested elsewhere, 3x the time
    )
    return folder / "out" / "report.html", json.loads((folder / "out" / "metrics.json").read_text()), result


@pytest.fixture(scope="module")
def page(report: tuple) -> Iterator[tuple[object, list[str], list[str]]]:  # type: ignore[type-arg]
    from playwright.sync_api import sync_playwright

    url = report[0].resolve().as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        fetched: list[str] = []

        def only_the_file(route) -> None:  # type: ignore[no-untyped-def]
            if route.request.url == url or route.request.url.startswith("data:"):
                route.continue_()
            else:
                fetched.append(route.request.url)
                route.abort()

        context.route("**/*", only_the_file)
        pg = context.new_page()
        errors: list[str] = []
        pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(url)
        pg.wait_for_load_state("load")
        yield pg, errors, fetched
        browser.close()


def test_the_report_renders_self_contained_without_errors(page: tuple, report: tuple) -> None:  # type: ignore[type-arg]
    pg, errors, fetched = page
    text = report[0].read_text()
    assert "http://" not in text and "https://" not in text  # no link to anywhere
    assert pg.title() == "onnx-gradcam evaluation"
    images = pg.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
    assert len(images) == 6 * len(METHODS) + 2  # the overlays, the curves and the sanity plot
    assert all(done and w > 0 and h > 0 for done, w, h in images), images
    for plot in ("#plot-curves", "#plot-sanity"):
        assert pg.is_visible(plot)
    assert not errors and not fetched, (errors, fetched)


def test_the_gallery_sorts_by_confidence_and_by_metric(page: tuple, report: tuple) -> None:  # type: ignore[type-arg]
    pg, errors, _ = page
    _, doc, _ = report
    names = doc["images"]
    order = lambda: pg.eval_on_selector_all("#gallery .card", "els => els.map(e => e.dataset.name)")  # noqa: E731
    confidence = [p["probability"] for p in doc["predictions"]]
    assert order() == [names[i] for i in np.argsort(confidence, kind="stable")[::-1]]  # the default: most confident
    for r, run in enumerate(doc["runs"]):
        per = run["metrics"]["deletion"]["per_image"]
        pg.select_option("#sort-key", f"m{r}-deletion")
        pg.select_option("#sort-order", "asc")
        assert order() == [names[i] for i in np.argsort(per, kind="stable")], run["method"]
        pg.select_option("#sort-order", "desc")
        assert order() == [names[i] for i in np.argsort(per, kind="stable")[::-1]], run["method"]
    pg.select_option("#sort-key", "name")
    pg.select_option("#sort-order", "asc")
    assert order() == sorted(names)
    wrong = pg.eval_on_selector_all("#gallery .card.wrong", "els => els.map(e => e.dataset.name)")
    assert wrong == [p["name"] for p in doc["predictions"] if p["correct"] is False]
    assert names[WRONG] in wrong and pg.locator(".card.wrong .badge").first.inner_text() == "misclassified"
    assert not errors


def _shot(pg, selector: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(Image.open(io.BytesIO(pg.locator(selector).screenshot())).convert("RGB")).astype(np.int32)


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> int:
    return int((np.abs(pixels - np.array(colour)).sum(axis=-1) < tol).sum())


def test_the_screenshot_shows_the_plots_and_the_overlays(page: tuple, report: tuple) -> None:  # type: ignore[type-arg]
    pg, _, _ = page
    curves = _shot(pg, "#plot-curves")
    assert curves.shape[0] > 200 and curves.shape[1] > 500 and curves.std() > 20  # not blank
    assert _near(curves, (0x1F, 0x77, 0xB4)) > 200 and _near(curves, (0xFF, 0x7F, 0x0E)) > 200  # one line per method
    sanity = _shot(pg, "#plot-sanity")
    assert sanity.std() > 20 and _near(sanity, (0x1F, 0x77, 0xB4)) + _near(sanity, (0xFF, 0x7F, 0x0E)) > 150
    # the most confident card's first overlay: its hottest pixels lie in its own map's hottest place
    _, doc, result = report
    first = int(np.argmax([p["probability"] for p in doc["predictions"]]))
    pg.select_option("#sort-key", "confidence")
    pg.select_option("#sort-order", "desc")
    shot = _shot(pg, "#gallery .card:first-child figure:first-child img")
    cam = result.runs[0].maps[first]
    small = np.asarray(Image.fromarray(cam).resize((shot.shape[1], shot.shape[0]), Image.Resampling.BILINEAR))
    top = colorize(np.ones((1, 1)))[0, 0].astype(np.int32)  # jet's top colour is red, blended over the picture
    assert top[0] - top[2] > 100
    redness = shot[..., 0] - shot[..., 2]
    hot = small > 0.8
    assert hot.any() and (~hot).any()
    assert redness[hot].mean() > redness[~hot].mean() + 40


def _hot_x(img: np.ndarray, rows: slice) -> tuple[float, float, float]:
    """In the rows of the map strip: (left and right ends of its coloured span, x of its hottest place,
    read back through the colormap)."""
    strip = img[rows].astype(np.int32)
    coloured = np.where((np.abs(strip - 255).sum(axis=-1) > 60).mean(axis=0) > 0.9)[0]
    runs = np.split(coloured, np.where(np.diff(coloured) > 1)[0] + 1)
    span = max(runs, key=len)  # the strip (not the colour bar beside it)
    table = colorize(np.linspace(0, 1, 256)[None])[0].astype(np.int32)  # jet
    colours = strip[:, span].mean(axis=0)
    values = np.abs(colours[:, None, :] - table[None]).sum(axis=-1).argmin(axis=1) / 255.0
    hottest = span[values >= values.max() - 0.02]
    return float(span[0]), float(span[-1]), float(hottest.mean())


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_signal_plots_put_the_map_where_it_is_hot(with_matplotlib: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    t = np.arange(200)
    signal = np.stack([np.sin(t / 9.0), np.cos(t / 13.0)]).astype(np.float32)
    cam = np.exp(-(((np.arange(50) - 37.0) / 2.0) ** 2))  # hottest at 37/49 of the way
    if not with_matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    img = np.asarray(plot_signal(signal, cam))
    assert img.shape[1] == 800  # as the explain command writes it
    if with_matplotlib:
        assert img.shape[0] == 300
        strip_rows = slice(225, 245)  # the map's axes, below the signal's
    else:
        assert img.shape[0] == 270
        np.testing.assert_array_equal(img, np.asarray(plot_signal_pillow(signal, cam)))
        strip_rows = slice(225, 255)
    left, right, hot = _hot_x(img, strip_rows)
    assert abs((hot - left) / (right - left) - 37 / 49) < 0.03, (left, right, hot)
