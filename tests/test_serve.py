"""`onnx-gradcam serve` as clients see it: a real uvicorn server on a free loopback port, asked by
tritonclient.http (unmodified), plain HTTP and curl; every answer is compared, bit for bit, with the
offline Explainer (or `onnx-gradcam explain`) on the same input."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from onnx_gradcam import Explainer  # noqa: E402
from onnx_gradcam.cli import main  # noqa: E402
from onnx_gradcam.explain.images import load_image  # noqa: E402
from onnx_gradcam.explain.overlay import overlay  # noqa: E402
from onnx_gradcam.serve import ServeConfig, create_app, load_models  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"
SAMPLES = sorted((ROOT / "models" / "samples").glob("*.png"))
STAR = ROOT / "models" / "samples" / "star.png"


class LiveServer:
    """The app under uvicorn in a background thread, on a port the OS picked."""

    def __init__(self, config: ServeConfig, paths: list[Path] | None = None) -> None:
        self.app = create_app(load_models(paths or [DEMO], device="cpu"), config)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    @property
    def batcher(self):  # type: ignore[no-untyped-def]
        return self.app.state.serve.batchers["demo"]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(f"http://{self.url}{path}", data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()


@contextmanager
def live_server(**config: float) -> Iterator[LiveServer]:
    server = LiveServer(ServeConfig(**config))  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(max_delay_ms=5) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer):  # type: ignore[no-untyped-def]
    c = httpclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def offline() -> Explainer:
    exp = Explainer(DEMO, device="cpu")
    exp.labels = (ROOT / "models" / "labels.txt").read_text().split()
    return exp


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 96, 96)).astype(np.float32)


def _multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "onnxgradcamtestboundary"
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, data in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\n'
        parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _error(server: LiveServer, status: int, method: str, path: str, body: bytes | None = None, **headers: str) -> str:
    got, hdrs, content = server.request(method, path, body, {k.replace("_", "-"): v for k, v in headers.items()})
    assert got == status, content
    assert hdrs.get("content-type", hdrs.get("Content-Type", "")).startswith("application/json")
    message = json.loads(content)["error"]
    assert isinstance(message, str) and message
    return message


def _still_serves(server: LiveServer, offline: Explainer) -> None:
    """A good request right after a bad one is answered, equal to offline (binary, 110 KB)."""
    x = _batch(1, seed=7)
    doc = {
        "inputs": [
            {"name": "input", "shape": [1, 3, 96, 96], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
        ]
    }
    head = json.dumps(doc).encode()
    status, _, content = server.request(
        "POST", "/v2/models/demo/infer", head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    )
    assert status == 200, content
    out = {o["name"]: o for o in json.loads(content)["outputs"]}
    want = offline.explain(x)
    np.testing.assert_array_equal(np.asarray(out["gradcam_map"]["data"], np.float32).reshape(1, 96, 96), want.maps)


def _declared_only(server: LiveServer, path: str, length: int) -> tuple[int, dict]:  # type: ignore[type-arg]
    """POST headers declaring a body of `length` bytes, and no body: the answer must not wait for it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"content-length: (\d+)", data.split(b"\r\n\r\n", 1)[0].lower()).group(1)  # type: ignore[union-attr]
        ):
            chunk = conn.recv(65536)
            assert chunk, data
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


# -- health and metadata ------------------------------------------------------------------------


def test_health_and_server_metadata(client, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("demo")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    for path in ("/v2/health/live", "/v2/health/ready"):
        status, _, content = server.request("GET", path)
        assert status == 200 and isinstance(json.loads(content), dict)
    assert not client.is_model_ready("nope")


def test_model_metadata_matches_the_session(client, offline: Explainer) -> None:  # type: ignore[no-untyped-def]
    meta = client.get_model_metadata("demo")
    assert meta["name"] == "demo"
    types = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
    want_out = [
        {"name": o.name, "datatype": types[o.type], "shape": [d if isinstance(d, int) else -1 for d in o.shape]}
        for o in offline.session.get_outputs()
    ]
    assert meta["outputs"] == want_out
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 96, 96]}
    assert meta["inputs"][1]["name"] == "gradcam_class" and meta["inputs"][1]["datatype"] == "INT64"
    assert meta["inputs"][1]["shape"] == [-1]


# -- infer ------------------------------------------------------------------------------------------


def _infer(client, x: np.ndarray, classes: np.ndarray | None, binary: bool, outputs: list[str] | None = None):  # type: ignore[no-untyped-def]
    inputs = [httpclient.InferInput("input", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=binary)
    if classes is not None:
        inputs.append(httpclient.InferInput("gradcam_class", list(classes.shape), "INT64"))
        inputs[1].set_data_from_numpy(classes, binary_data=binary)
    asked = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in outputs] if outputs else None
    if not binary and asked is None:
        names = ["logits", "gradcam_map", "gradcam_raw", "gradcam_target", "gradcam_score"]
        asked = [httpclient.InferRequestedOutput(n, binary_data=False) for n in names]
    return client.infer("demo", inputs, outputs=asked)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("with_class", [False, True], ids=["top1", "class"])
def test_infer_equals_offline_bit_for_bit(client, offline: Explainer, binary: bool, with_class: bool) -> None:  # type: ignore[no-untyped-def]
    x = _batch(3, seed=1)
    classes = np.array([2, 0, 3], np.int64) if with_class else None
    result = _infer(client, x, classes, binary)
    for out in result.get_response()["outputs"]:
        assert ("parameters" in out) == binary and ("data" in out) == (not binary)
    want = offline.explain(x, None if classes is None else list(classes))
    np.testing.assert_array_equal(result.as_numpy("gradcam_map"), want.maps)
    np.testing.assert_array_equal(result.as_numpy("gradcam_raw"), want.raw)
    np.testing.assert_array_equal(result.as_numpy("gradcam_score"), want.scores)
    np.testing.assert_array_equal(result.as_numpy("gradcam_target"), want.targets)
    np.testing.assert_array_equal(result.as_numpy("logits"), want.logits)
    top1 = np.argmax(want.logits, axis=1)
    assert list(want.targets) == (list(classes) if classes is not None else list(top1))


def test_one_class_for_the_batch_and_negative_means_top1(client, offline: Explainer) -> None:  # type: ignore[no-untyped-def]
    x = _batch(2, seed=2)
    one = _infer(client, x, np.array([1], np.int64), True)
    np.testing.assert_array_equal(one.as_numpy("gradcam_map"), offline.explain(x, 1).maps)
    neg = _infer(client, x, np.array([-1, 1], np.int64), True)
    np.testing.assert_array_equal(neg.as_numpy("gradcam_map"), offline.explain(x, [-1, 1]).maps)


def test_outputs_selection_skips_the_map(client, offline: Explainer) -> None:  # type: ignore[no-untyped-def]
    x = _batch(2, seed=3)
    result = _infer(client, x, None, True, outputs=["logits", "gradcam_target"])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["logits", "gradcam_target"]
    assert result.as_numpy("gradcam_map") is None
    want = offline.explain(x)
    np.testing.assert_array_equal(result.as_numpy("logits"), want.logits)
    np.testing.assert_array_equal(result.as_numpy("gradcam_target"), want.targets)


def test_mixed_binary_and_json_outputs(server: LiveServer, offline: Explainer) -> None:
    x = _batch(1, seed=4)
    raw = x.tobytes()
    doc = {
        "inputs": [
            {"name": "input", "shape": [1, 3, 96, 96], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
        ],
        "outputs": [
            {"name": "gradcam_score", "parameters": {"binary_data": False}},
            {"name": "gradcam_raw", "parameters": {"binary_data": True}},
        ],
    }
    head = json.dumps(doc).encode()
    status, headers, content = server.request(
        "POST", "/v2/models/demo/infer", head + raw, {"Inference-Header-Content-Length": str(len(head))}
    )
    assert status == 200, content
    n = int(headers["inference-header-content-length"])
    reply = json.loads(content[:n])
    want = offline.explain(x)
    score, rawmap = reply["outputs"]
    assert np.float32(score["data"][0]) == want.scores[0]
    assert rawmap["parameters"]["binary_data_size"] == want.raw.nbytes == len(content) - n
    np.testing.assert_array_equal(np.frombuffer(content[n:], "<f4").reshape(want.raw.shape), want.raw)


# -- errors -----------------------------------------------------------------------------------------


def test_errors_are_json_with_their_status(server: LiveServer, client, offline: Explainer) -> None:  # type: ignore[no-untyped-def]
    assert "unknown model 'nope'" in _error(server, 404, "GET", "/v2/models/nope")
    assert "unknown model" in _error(server, 404, "POST", "/v2/models/nope/infer", b"{}")
    assert "unknown model" in _error(server, 404, "POST", "/v1/models/nope:explain", STAR.read_bytes())
    _error(server, 404, "GET", "/v3/nothing")
    assert "no version '2'" in _error(server, 404, "GET", "/v2/models/demo/versions/2")
    assert client.get_model_metadata("demo", model_version="1")["name"] == "demo"
    assert "not JSON" in _error(server, 400, "POST", "/v2/models/demo/infer", b"{not json")
    good = {"name": "input", "shape": [1, 3, 96, 96], "datatype": "FP32", "data": [0.0] * (3 * 96 * 96)}
    bad_cases = {
        "shape": {"inputs": [{**good, "shape": [1, 3, 64, 64], "data": [0.0] * (3 * 64 * 64)}]},
        "is FP32, not FP64": {"inputs": [{**good, "datatype": "FP64"}]},
        "values for shape": {"inputs": [{**good, "data": [0.0] * 5}]},
        "out of range": {"inputs": [good, {"name": "gradcam_class", "shape": [1], "datatype": "INT64", "data": [4]}]},
        "no input 'image'": {"inputs": [{**good, "name": "image"}]},
        "no output 'heat'": {"inputs": [good], "outputs": [{"name": "heat"}]},
    }
    for expected, doc in bad_cases.items():
        assert expected in _error(server, 400, "POST", "/v2/models/demo/infer", json.dumps(doc).encode())
    with pytest.raises(InferenceServerException, match="400"):
        _infer(client, _batch(1), np.array([1, 2], np.int64), True)  # two classes for one sample
    assert "not a readable image" in _error(server, 400, "POST", "/v2/models/demo/explain", b"not an image")
    assert "unknown colormap" in _error(server, 400, "POST", "/v2/models/demo/explain?colormap=nope", STAR.read_bytes())
    assert "not in the labels" in _error(server, 400, "POST", "/v2/models/demo/explain?class=dog", STAR.read_bytes())
    assert "was not prepared" in _error(
        server, 400, "POST", "/v2/models/demo/explain?method=hirescam", STAR.read_bytes()
    )
    assert "unknown option" in _error(server, 400, "POST", "/v2/models/demo/explain?klass=1", STAR.read_bytes())
    assert "out of range" in _error(server, 400, "POST", "/v2/models/demo/explain?class=9", STAR.read_bytes())
    assert "no file field" in _error(
        server,
        400,
        "POST",
        "/v2/models/demo/explain",
        *_multipart({"class": "1"}, {"picture": STAR.read_bytes()})[:1],
        Content_Type=_multipart({}, {})[1],
    )
    _still_serves(server, offline)


# -- explain ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_star(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("cli")
    result = CliRunner().invoke(main, ["explain", str(DEMO), str(STAR), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads((out / "predictions.json").read_text())
    return entry, out


@pytest.mark.parametrize("form", ["v2-multipart", "v1-raw"])
def test_explain_equals_the_offline_command(server: LiveServer, offline: Explainer, cli_star, form: str) -> None:  # type: ignore[no-untyped-def]
    entry, out = cli_star
    if form == "v2-multipart":
        body, ctype = _multipart({"raw": "true"}, {"image": STAR.read_bytes()})
        status, _, content = server.request("POST", "/v2/models/demo/explain", body, {"Content-Type": ctype})
    else:
        status, _, content = server.request(
            "POST", "/v1/models/demo:explain?raw=1", STAR.read_bytes(), {"Content-Type": "image/png"}
        )
    assert status == 200, content
    got = json.loads(content)
    for key in ("class", "label", "score", "probability", "feature_layer", "method"):
        assert got[key] == entry[key], key
    assert got["label"] == "star"
    raw = np.asarray(got["raw_map"]["data"], np.float32).reshape(got["raw_map"]["shape"])
    np.testing.assert_array_equal(raw, np.load(out / entry["raw_map"]))
    np.testing.assert_array_equal(
        np.asarray(got["map"]["data"], np.float32).reshape(96, 96), offline.explain([STAR]).maps[0]
    )
    shown = Image.open(io.BytesIO(base64.b64decode(got["overlay_png"])))
    assert shown.format == "PNG" and shown.size == Image.open(STAR).size
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(Image.open(out / entry["overlay"])))
    assert [t["class"] for t in got["top_k"]][0] == entry["class"] and len(got["top_k"]) == 4


def test_explain_options_class_by_label_and_index(server: LiveServer, offline: Explainer) -> None:
    for cls in ("triangle", "2"):
        body, ctype = _multipart(
            {"class": cls, "top_k": "2", "colormap": "turbo", "alpha": "0.3"}, {"file": STAR.read_bytes()}
        )
        status, _, content = server.request("POST", "/v2/models/demo/explain", body, {"Content-Type": ctype})
        assert status == 200, content
        got = json.loads(content)
        want = offline.explain([STAR], 2)
        assert got["class"] == 2 and got["label"] == "triangle" and len(got["top_k"]) == 2
        assert np.float32(got["score"]) == want.scores[0]
        assert np.float32(got["probability"]) == want.probabilities[0, 2]  # type: ignore[index]
        assert "map" not in got and "raw_map" not in got
        want_png = overlay(load_image(STAR), want.maps[0], "turbo", 0.3)
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(base64.b64decode(got["overlay_png"])))), np.asarray(want_png)
        )


# -- batching ---------------------------------------------------------------------------------------


def test_concurrent_requests_share_runs_and_equal_offline(offline: Explainer) -> None:
    images = [SAMPLES[i % len(SAMPLES)] for i in range(12)]
    classes = [i % 4 for i in range(12)]
    results: dict[int, dict] = {}  # type: ignore[type-arg]
    with live_server(max_delay_ms=200, max_batch=8) as s:
        barrier = threading.Barrier(len(images))

        def ask(i: int) -> None:
            barrier.wait()
            status, _, content = s.request(
                "POST", f"/v1/models/demo:explain?raw=true&class={classes[i]}", images[i].read_bytes()
            )
            assert status == 200, content
            results[i] = json.loads(content)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        runs, jobs = s.batcher.batches_run, s.batcher.jobs_run
    assert sorted(results) == list(range(len(images)))
    assert jobs == len(images) and runs < jobs, (runs, jobs)  # requests shared session runs
    for i, got in results.items():
        want = offline.explain([images[i]], classes[i])
        assert got["class"] == classes[i]
        assert np.float32(got["score"]) == want.scores[0]
        np.testing.assert_array_equal(np.asarray(got["map"]["data"], np.float32).reshape(96, 96), want.maps[0])
        np.testing.assert_array_equal(np.asarray(got["raw_map"]["data"], np.float32).reshape(12, 12), want.raw[0])


def test_concurrent_infer_batches_with_per_sample_classes(offline: Explainer) -> None:
    xs = [_batch(1 + i % 3, seed=10 + i) for i in range(8)]
    cls = [np.array([(i + j) % 4 - (j == 0) for j in range(len(x))], np.int64) for i, x in enumerate(xs)]
    got: dict[int, np.ndarray] = {}
    with live_server(max_delay_ms=200, max_batch=8) as s:
        barrier = threading.Barrier(len(xs))

        def ask(i: int) -> None:
            c = httpclient.InferenceServerClient(s.url)
            barrier.wait()
            got[i] = _infer(c, xs[i], cls[i], True).as_numpy("gradcam_map")
            c.close()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        runs = s.batcher.batches_run
    assert runs < len(xs)
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(got[i], offline.explain(x, [int(c) for c in cls[i]]).maps)


# -- limits -----------------------------------------------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with one tiny compressed row after it:
    decoding it in full would need width*height*3 bytes (and fails: the data ends)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_limits_answer_4xx_and_the_server_stays_up(offline: Explainer) -> None:
    with live_server(max_body_bytes=300_000, max_pixels=200_000, max_batch=1) as s:
        # request body: a declared Content-Length over the limit is refused before the body comes
        for path in ("/v2/models/demo/infer", "/v2/models/demo/explain", "/v1/models/demo:explain"):
            status, body = _declared_only(s, path, 10**9)
            assert status == 413 and "over the server's limit" in body["error"]

        # ... and a chunked body without one, once it passes the limit
        def chunked() -> Iterator[bytes]:
            for _ in range(6):
                yield b"\0" * 60_000

        req = urllib.request.Request(f"http://{s.url}/v1/models/demo:explain", data=chunked(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=60)
        assert info.value.code == 413 and "over the server's limit" in json.loads(info.value.read())["error"]
        _still_serves(s, offline)
        # image pixels, refused from the header: 1000 x 1000 (our limit) and 20000 x 20000 (Pillow's bomb guard)
        for w, h in ((1000, 1000), (20000, 20000)):
            message = _error(s, 413, "POST", "/v2/models/demo/explain", _png_claiming(w, h))
            assert f"{w}x{h}" in message or "pixels" in message
        body, ctype = _multipart({}, {"image": _png_claiming(1000, 1000)})
        assert "pixels" in _error(s, 413, "POST", "/v2/models/demo/explain", body, Content_Type=ctype)
        _still_serves(s, offline)
        # batch size
        x = _batch(2)
        params = {"binary_data_size": x.nbytes}
        doc = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": params}]}
        head = json.dumps(doc).encode()
        message = _error(
            s, 400, "POST", "/v2/models/demo/infer", head + x.tobytes(), Inference_Header_Content_Length=str(len(head))
        )
        assert "--max-batch 1" in message
        _still_serves(s, offline)


def test_timeout_answers_504_and_the_server_stays_up(offline: Explainer) -> None:
    with live_server(max_delay_ms=1500, timeout_s=0.2) as s:
        assert "timeout" in _error(s, 504, "POST", "/v1/models/demo:explain", STAR.read_bytes())
        status, _, _ = s.request("GET", "/v2/health/live")
        assert status == 200
        time.sleep(1.5)  # the timed-out job has left the queue without being run
        assert s.batcher.jobs_run == 0


# -- curl, the command, shutdown --------------------------------------------------------------------


def _readme_serving_curls() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for b in blocks for line in b.splitlines() if line.startswith("curl ")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_run(server: LiveServer, cli_star) -> None:  # type: ignore[no-untyped-def]
    entry, _ = cli_star
    commands = _readme_serving_curls()
    assert len(commands) >= 2
    answers = []
    for command in commands:
        argv = [a.replace("127.0.0.1:8000", server.url) for a in shlex.split(command)]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        answers.append(json.loads(proc.stdout))
    explained = [a for a in answers if "overlay_png" in a]
    assert explained and all(a["class"] == entry["class"] and a["score"] == entry["score"] for a in explained)


def test_core_does_not_import_the_server() -> None:
    code = (
        "import sys, onnx_gradcam, onnx_gradcam.cli; print([m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'uvicorn', 'multipart', 'python_multipart') or m.startswith('onnx_gradcam.serve')])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_serve_help() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for flag in ("--host", "--port", "--max-batch", "--max-delay-ms", "--timeout-s", "--max-pixels"):
        assert flag in result.output


def test_sigterm_finishes_the_request_in_flight(tmp_path: Path, offline: Explainer) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "onnx_gradcam.cli", "serve", str(DEMO), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen([*argv, "--max-delay-ms", "1500"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        answer: dict[str, object] = {}

        def ask() -> None:
            req = urllib.request.Request(f"{url}/v1/models/demo:explain", data=STAR.read_bytes(), method="POST")
            with urllib.request.urlopen(req, timeout=60) as r:
                answer.update(status=r.status, body=json.loads(r.read()))

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(0.5)  # the request now waits in the batcher's 1.5 s window
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        code = proc.wait(timeout=60)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert answer.get("status") == 200
    assert answer["body"]["class"] == int(offline.explain([STAR]).targets[0])  # type: ignore[index]
    # uvicorn re-raises the signal it caught once it has shut down, so the exit says 'terminated'
    assert code in (0, -signal.SIGTERM)
    assert "Finished server process" in err and "serving demo (" in err and "prepared at start-up" in err


# -- loading, readiness, failures -------------------------------------------------------------------


def test_a_folder_serves_every_model_plain_ones_prepared_at_start(tmp_path: Path, offline: Explainer) -> None:
    from onnx_gradcam import BadInputError, prepare
    from onnx_gradcam.serve.models import load_models as load

    shutil.copy(DEMO, tmp_path / "plain.onnx")
    prepare(DEMO, tmp_path / "ready.gradcam.onnx")
    (tmp_path / "notes.txt").write_text("not a model")
    models = load([tmp_path], device="cpu")
    assert sorted(models) == ["plain", "ready.gradcam"]
    assert models["plain"].explainer.prepared_in_memory and not models["ready.gradcam"].explainer.prepared_in_memory
    x = _batch(2, seed=5)
    for m in models.values():
        np.testing.assert_array_equal(m.explainer.explain(x, [1, 3]).maps, offline.explain(x, [1, 3]).maps)
    with pytest.raises(BadInputError, match="two models are named 'plain'"):
        load([tmp_path / "plain.onnx", tmp_path], device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="holds no .onnx"):
        load([tmp_path / "empty"], device="cpu")


def test_not_ready_answers_503(server: LiveServer) -> None:
    state = server.app.state.serve
    state.ready = False
    try:
        status, _, content = server.request("GET", "/v2/health/ready")
        assert status == 503 and json.loads(content) == {"ready": False}
        assert "not ready" in _error(server, 503, "GET", "/v2/models/demo/ready")
        assert "not ready" in _error(server, 503, "POST", "/v1/models/demo:explain", STAR.read_bytes())
    finally:
        state.ready = True
    status, _, _ = server.request("GET", "/v2/models/demo/ready")
    assert status == 200


def test_failed_inference_answers_500_and_the_server_stays_up(offline: Explainer) -> None:
    from onnx_gradcam.errors import OnnxGradCamError

    with live_server() as s:
        real = s.batcher.run
        for exc in (OnnxGradCamError("the kernel failed"), RuntimeError("out of memory")):

            def broken(feeds, exc=exc):  # type: ignore[no-untyped-def]
                raise exc

            s.batcher.run = broken
            message = _error(s, 500, "POST", "/v1/models/demo:explain", STAR.read_bytes())
            assert "inference failed" in message and str(exc) in message
        s.batcher.run = real
        _still_serves(s, offline)


def test_batcher_isolates_a_failing_request() -> None:
    """Three requests in one window: the batch with a poisoned row fails, so each runs alone; only the
    poisoned one gets the error, the others their own rows."""
    import asyncio

    from onnx_gradcam.serve.batcher import Batcher

    calls: list[int] = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds["x"]
        calls.append(len(x))
        if np.any(x < 0):
            raise ValueError("poisoned")
        return {"y": x * 2.0}

    async def main() -> list[object]:
        b = Batcher(run, max_batch=8, max_delay_ms=100)
        b.start()
        jobs = [b.submit({"x": np.array([[1.0], [2.0]])}), b.submit({"x": np.array([[-1.0]])})]
        jobs.append(b.submit({"x": np.array([[3.0]])}))
        out = await asyncio.gather(*jobs, return_exceptions=True)
        await b.stop()
        return out

    first, second, third = asyncio.run(main())
    assert calls == [4, 2, 1, 1]  # one batched run, then each request alone
    np.testing.assert_array_equal(first["y"], [[2.0], [4.0]])  # type: ignore[index]
    assert isinstance(second, ValueError)
    np.testing.assert_array_equal(third["y"], [[6.0]])  # type: ignore[index]


def test_readme_python_example_runs(server: LiveServer, offline: Explainer) -> None:
    section = (ROOT / "README.md").read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    scope: dict[str, object] = {}
    exec(compile(code.replace("127.0.0.1:8000", server.url), "README.md", "exec"), scope)  # noqa: S102
    want = offline.explain(np.zeros((2, 3, 96, 96), np.float32), [3, -1])
    np.testing.assert_array_equal(scope["maps"], want.maps)  # type: ignore[arg-type]


def test_root_names_the_models_until_the_web_page_takes_it(server: LiveServer) -> None:
    status, _, content = server.request("GET", "/")
    assert status == 200 and json.loads(content)["models"] == ["demo"]


def test_class_input_forms_serve_like_the_default(tmp_path: Path, offline: Explainer) -> None:
    """Models prepared with --class-input required (a plain graph input) and none (top-1 only)
    answer infer and explain as the default form does; a class asked of a `none` model is a 400."""
    from onnx_gradcam import prepare

    paths = []
    for form in ("required", "none"):
        paths.append(tmp_path / f"demo_{form}.onnx")
        prepare(DEMO, paths[-1], class_input=form)
    x = _batch(2, seed=9)
    top1 = offline.explain(x)
    with _serving(paths) as srv:
        c = httpclient.InferenceServerClient(srv.url)
        for form in ("required", "none"):
            inputs = [httpclient.InferInput("input", list(x.shape), "FP32")]
            inputs[0].set_data_from_numpy(x)
            if form == "required":
                inputs.append(httpclient.InferInput("gradcam_class", [2], "INT64"))
                inputs[1].set_data_from_numpy(np.array([-1, 3], np.int64))
            got = c.infer(f"demo_{form}", inputs)
            expected = offline.explain(x, [top1.targets[0], 3]) if form == "required" else top1
            np.testing.assert_array_equal(got.as_numpy("gradcam_map"), expected.maps)
            np.testing.assert_array_equal(got.as_numpy("gradcam_target"), expected.targets)
        c.close()
        for form in ("required", "none"):
            status, _, content = srv.request("POST", f"/v2/models/demo_{form}/explain", STAR.read_bytes())
            assert status == 200, content
            assert json.loads(content)["class"] == int(offline.explain([STAR]).targets[0])
        message = _error(srv, 400, "POST", "/v2/models/demo_none/explain?class=1", STAR.read_bytes())
        assert "--class-input none" in message


@contextmanager
def _serving(paths: list[Path]) -> Iterator[LiveServer]:
    server = LiveServer(ServeConfig(max_delay_ms=5), paths)
    try:
        yield server
    finally:
        server.close()


# KServe's client in a fresh interpreter: its generated grpc_predict_v2 protos and tritonclient.grpc's
# (imported by tests/test_artifacts.py) both define package `inference`, and protobuf refuses the
# second definition in one process
_KSERVE_CLIENT = """
import asyncio, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

base, binary, folder = sys.argv[1], sys.argv[2] == "binary", sys.argv[3]
x = np.load(folder + "/x.npy")


async def talk():
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        assert await client.is_server_live(base) and await client.is_model_ready(base, "demo")
        for name, classes in (("top1", None), ("classes", np.array([3, 0], np.int64))):
            image = InferInput("input", list(x.shape), "FP32")
            image.set_data_from_numpy(x, binary_data=binary)
            inputs = [image]
            if classes is not None:
                cls = InferInput("gradcam_class", [2], "INT64")
                cls.set_data_from_numpy(classes, binary_data=binary)
                inputs.append(cls)
            answer = await client.infer(base, InferRequest("demo", inputs), model_name="demo")
            np.savez(folder + "/" + name + ".npz", **{o.name: o.as_numpy() for o in answer.outputs})
    finally:
        await client.close()


asyncio.run(talk())
"""


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_rest_client_v2(server: LiveServer, offline: Explainer, binary: bool, tmp_path: Path) -> None:
    """KServe's own V2 REST client, unmodified: live, ready, and infer (binary tensors and JSON)
    with and without a class, equal to the offline result bit for bit."""
    x = _batch(2, seed=11)
    np.save(tmp_path / "x.npy", x)
    form = "binary" if binary else "json"
    args = [sys.executable, "-c", _KSERVE_CLIENT, f"http://{server.url}", form, str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for name, target in (("top1", None), ("classes", [3, 0])):
        outputs = np.load(tmp_path / f"{name}.npz")
        expected = offline.explain(x, target)
        np.testing.assert_array_equal(outputs["gradcam_map"], expected.maps)
        np.testing.assert_array_equal(outputs["gradcam_raw"], expected.raw)
        np.testing.assert_array_equal(outputs["gradcam_target"], expected.targets)


def test_run_warms_each_model_up_with_its_largest_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` runs one --max-batch batch per model before it listens (onnxruntime's arena then
    holds the largest batch from the start, so the server's memory does not grow under load)."""
    from onnx_gradcam.serve import app as app_module

    served = load_models([DEMO], device="cpu")
    model = served["demo"]
    calls: list[tuple[str, int, int | None]] = []
    real = type(model).warm_up

    def spy(self, max_batch: int) -> int | None:  # type: ignore[no-untyped-def]
        ran = real(self, max_batch)
        calls.append((self.name, max_batch, ran))
        return ran

    monkeypatch.setattr(type(model), "warm_up", spy)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: calls.append(("uvicorn", 0, None)))
    app_module.run(served, config=ServeConfig(max_batch=5))
    assert calls == [("demo", 5, 5), ("uvicorn", 0, None)]
