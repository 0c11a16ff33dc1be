"""The web page at `/` in a real browser: the system's headless Chromium, driven by Playwright, against
`onnx-gradcam serve` started as a user would (a subprocess on a free loopback port). What the page
shows is compared with the offline Explainer, and its screenshots with the demo samples' object boxes."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnx_gradcam import Explainer, prepare
from onnx_gradcam.explain.images import load_image
from onnx_gradcam.explain.overlay import overlay

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"
SAMPLES = ROOT / "models" / "samples"
BOXES = json.loads((ROOT / "models" / "demo_boxes.json").read_text())
LABELS = (ROOT / "models" / "labels.txt").read_text().split()
SECOND = "shapes"  # a second served model: the demo prepared with two methods
METHODS = ["gradcam", "gradcam++"]


def chromium() -> str:
    """The system's Chromium; its absence fails (CI installs it), it never skips."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "headless Chromium is not installed, and the web page's tests need it: to fix this, run "
            "`apt-get update && apt-get install -y chromium` as root (.ci/run does), or set CHROMIUM to its path. "
            "Playwright's own browser download is not used.",
            pytrace=False,
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("webpage")
    prepare(DEMO, out / f"{SECOND}.onnx", methods=METHODS)
    shutil.copy(ROOT / "models" / "labels.txt", out / "labels.txt")
    return out


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[str]:
    port = _free_port()
    argv = [sys.executable, "-m", "onnx_gradcam.cli", "serve", str(DEMO), str(folder / f"{SECOND}.onnx")]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"onnx-gradcam serve exited with {proc.returncode}:\n{proc.stdout.read()}")  # type: ignore[union-attr]
            try:
                if _get(f"{url}/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "onnx-gradcam serve did not become ready within 120 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def offline(folder: Path) -> dict[str, Explainer]:
    models = {"demo": Explainer(DEMO, device="cpu", threads=1), SECOND: Explainer(folder / f"{SECOND}.onnx", "cpu")}
    for exp in models.values():
        exp.labels = LABELS
    return models


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server: str) -> Iterator[object]:  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, device_scale_factor=1)
    elsewhere: list[str] = []

    def only_this_server(route) -> None:  # type: ignore[no-untyped-def]
        if route.request.url.startswith(server + "/") or route.request.url.startswith("blob:"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_server)
    pg = context.new_page()
    pg.goto(server + "/")
    pg.wait_for_function("document.body.dataset.state === 'idle'", timeout=30_000)
    yield pg
    context.close()
    assert not elsewhere, f"the page asked for something beyond the server: {elsewhere}"


def _explain(page, action) -> dict:  # type: ignore[no-untyped-def]
    """Do `action` (which makes the page ask the explain endpoint); the server's answer, once the
    page shows the new overlay."""
    before = page.get_attribute("#overlay", "src")
    with page.expect_response(lambda r: r.url.endswith("/explain"), timeout=60_000) as info:
        action()
    response = info.value
    answer = response.json()
    assert response.status == 200, answer
    page.wait_for_function(
        """(before) => {
            const o = document.getElementById("overlay");
            return document.body.dataset.state === "ready" && o.src !== before && o.complete && o.naturalWidth > 0;
        }""",
        arg=before,
        timeout=30_000,
    )
    return answer


def _choose(page, path: Path) -> dict:  # type: ignore[no-untyped-def]
    return _explain(page, lambda: page.set_input_files("#file", str(path)))


def _drop(page, path: Path) -> dict:  # type: ignore[no-untyped-def]
    data = list(path.read_bytes())
    script = """([name, bytes]) => {
        const file = new File([new Uint8Array(bytes)], name, { type: "image/png" });
        const dt = new DataTransfer();
        dt.items.add(file);
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
    }"""
    return _explain(page, lambda: page.evaluate(script, [path.name, data]))


def _shot(page, selector: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The element's pixels, its box rounded to whole CSS pixels (device scale 1)."""
    box = page.locator(selector).bounding_box()
    clip = {k: float(round(box[k])) for k in ("x", "y", "width", "height")}
    return np.asarray(Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB"), np.float64)


def _png(answer: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"]))).convert("RGB"))


def _reference(exp: Explainer, path: Path, target: int | None, method: str | None, alpha: float) -> tuple:
    image = load_image(path)
    result = exp.explain(exp.to_tensor([image]), target, method)
    return result, np.asarray(overlay(image, result.maps[0], "jet", alpha))


def _download(page) -> bytes:  # type: ignore[no-untyped-def]
    with page.expect_download() as info:
        page.click("#download")
    saved = info.value.path()
    return Path(saved).read_bytes()


def _hot_region(page, alpha: float) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(xs, ys) of the overlay's hot pixels in its screenshot: where the heat map's red excess over
    blue is at least half its largest. The overlay is (1 - alpha) image + alpha jet(map); with the
    original's screenshot at the same size the colouring comes back (the image itself is red in
    places), and jet is red above blue exactly where map > 0.5."""
    shown, original = _shot(page, "#overlay"), _shot(page, "#original")
    assert shown.shape == original.shape
    heat = (shown - (1 - alpha) * original) / alpha
    excess = np.clip(heat[..., 0] - heat[..., 2], 0, None)
    assert excess.max() > 200, f"the overlay shows no hot region (red excess at most {excess.max():.0f})"
    ys, xs = np.nonzero(excess >= 0.5 * excess.max())
    return xs.astype(np.float64), ys.astype(np.float64)


def _inside(x: float, y: float, box: list[float]) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def test_the_page_is_package_data_served_at_root_and_self_contained(server: str) -> None:
    from onnx_gradcam.serve.webpage import page_html

    html = page_html()
    assert "<script>" in html and "<style>" in html
    for outside in ("http://", "https://", "//cdn", '<link rel="stylesheet"', "<script src"):
        assert outside not in html, f"the page loads {outside!r} from elsewhere"
    status, kind, body = _get(server + "/", "text/html,application/xhtml+xml,*/*;q=0.8")  # as a browser asks
    assert status == 200 and kind.startswith("text/html") and body.decode() == html
    status, kind, body = _get(server + "/")  # API clients (curl, urllib) still get the summary
    assert status == 200 and kind.startswith("application/json")
    assert json.loads(body)["models"] == ["demo", SECOND]


@pytest.mark.slow
@pytest.mark.parametrize(("sample", "how"), [("star.png", "choose"), ("circle.png", "drop")])
def test_the_page_explains_a_sample(page, offline: dict[str, Explainer], sample: str, how: str) -> None:  # type: ignore[no-untyped-def]
    path = SAMPLES / sample
    answer = _choose(page, path) if how == "choose" else _drop(page, path)
    want, want_png = _reference(offline["demo"], path, None, None, 0.5)
    top1 = int(want.targets[0])

    # the class shown is the model's top-1, the sample's object
    assert page.inner_text("#label") == LABELS[top1] == BOXES[sample]["class"]
    assert answer["class"] == top1 and page.get_attribute("#label", "data-class") == str(top1)
    assert float(page.inner_text("#probability")) == pytest.approx(float(want.probabilities[0, top1]), abs=1e-4)

    # the top-k list: every class with its offline probability, most probable first, summing to <= 1
    rows = page.locator("#topk li")
    shown = [
        (rows.nth(i).inner_text().split()[0], float(rows.nth(i).locator(".p").inner_text()))
        for i in range(rows.count())
    ]
    order = np.argsort(-want.logits[0], kind="stable")  # type: ignore[index]
    assert [name for name, _ in shown] == [LABELS[c] for c in order]
    for (_, p), c in zip(shown, order):
        assert p == pytest.approx(float(want.probabilities[0, c]), abs=1e-4)  # type: ignore[index]
    assert sum(e["probability"] for e in answer["top_k"]) <= 1 + 1e-6
    assert sum(p for _, p in shown) <= 1 + 0.5e-4 * len(shown)  # each rounded to 4 decimals
    assert page.is_checked(f"#topk input[value='{top1}']")

    # the overlay the server sent is the offline one, and it is what the page shows
    np.testing.assert_array_equal(_png(answer), want_png)
    overlay_box = page.locator("#overlay").bounding_box()
    assert page.locator("#overlay").is_visible() and overlay_box is not None
    screenshot = _shot(page, "#overlay")
    height, width = screenshot.shape[:2]
    natural = page.evaluate(
        "[document.getElementById('overlay').naturalWidth, document.getElementById('overlay').naturalHeight]"
    )
    assert natural == answer["image_size"] == list(Image.open(path).size)
    resized = np.asarray(Image.fromarray(want_png).resize((width, height), Image.BILINEAR), np.float64)
    assert np.abs(screenshot - resized).mean() < 4, "the screenshot of the overlay is not the server's overlay"
    assert np.abs(screenshot - _shot(page, "#original")).mean() > 10, "the overlay looks like the original"

    # its hot region lies on the object, the box scaled to the displayed size
    scale = width / natural[0]
    box = [v * scale for v in BOXES[sample]["box"]]
    xs, ys = _hot_region(page, 0.5)
    cx, cy = xs.mean(), ys.mean()
    inside = float(np.mean((xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])))
    print(f"{sample}: hot centroid ({cx:.1f}, {cy:.1f}), {inside:.0%} of {xs.size} hot pixels in the box {box}")
    assert _inside(cx, cy, box), f"the overlay's hot centroid ({cx:.0f}, {cy:.0f}) is outside the {sample} box {box}"
    assert inside >= 0.6, f"only {inside:.0%} of the overlay's hot pixels lie in the {sample} box {box}"

    # the download is the overlay the server returned, byte for byte
    assert _download(page) == base64.b64decode(answer["overlay_png"])


@pytest.mark.slow
def test_class_method_and_opacity_re_render(page, offline: dict[str, Explainer]) -> None:  # type: ignore[no-untyped-def]
    star = SAMPLES / "star.png"
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["demo", SECOND]
    page.select_option("#model", SECOND)
    page.wait_for_function(f"document.getElementById('method').options.length === {len(METHODS)}")
    assert page.eval_on_selector_all("#method option", "os => os.map(o => o.value)") == METHODS

    with page.expect_request(lambda r: r.url.endswith(f"/v2/models/{SECOND}/explain")):
        first = _choose(page, star)
    exp = offline[SECOND]
    before = _shot(page, "#overlay")

    # another class from the top-k list: the page asks for it and shows it
    other = first["top_k"][1]["class"]
    assert other != first["class"]
    answer = _explain(page, lambda: page.check(f"#topk input[value='{other}']"))
    assert answer["class"] == other and page.inner_text("#label") == LABELS[other]
    assert page.is_checked(f"#topk input[value='{other}']")
    np.testing.assert_array_equal(_png(answer), _reference(exp, star, other, "gradcam", 0.5)[1])
    assert np.abs(_shot(page, "#overlay") - before).mean() > 2, "the overlay did not change with the class"
    assert _download(page) == base64.b64decode(answer["overlay_png"])

    # another method, for the same class
    answer = _explain(page, lambda: page.select_option("#method", "gradcam++"))
    assert answer["method"] == "gradcam++" and answer["class"] == other
    assert page.inner_text("#used-method") == "gradcam++"
    np.testing.assert_array_equal(_png(answer), _reference(exp, star, other, "gradcam++", 0.5)[1])

    # another opacity
    answer = _explain(page, lambda: page.fill("#alpha", "0.8"))
    assert page.inner_text("#alpha-value") == "0.80"
    np.testing.assert_array_equal(_png(answer), _reference(exp, star, other, "gradcam++", 0.8)[1])
    assert _download(page) == base64.b64decode(answer["overlay_png"])

    # a new image starts again from its top-1
    answer = _choose(page, SAMPLES / "triangle.png")
    assert answer["class"] == LABELS.index("triangle") and answer["method"] == "gradcam++"


@pytest.mark.slow
def test_server_errors_are_shown_on_the_page(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with page.expect_response(lambda r: r.url.endswith("/explain")) as info:
        page.set_input_files("#file", str(notes))
    assert info.value.status == 400
    message = info.value.json()["error"]
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == f"400: {message}" and "not a readable image" in message
    assert page.get_attribute("body", "data-state") == "error"
    # a good image after it clears the error
    _choose(page, SAMPLES / "star.png")
    assert page.locator("#error").is_hidden()
