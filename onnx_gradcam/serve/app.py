"""The Starlette application: Open Inference Protocol routes, the explain routes, limits and errors.

Errors are `{"error": "..."}`: 400 bad input, 404 unknown model, 413 too large, 503 not ready,
504 timed out, 500 inference failed. No request can stop the server.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .._version import __version__
from ..errors import BadInputError, OnnxGradCamError
from ..explain.images import load_image
from ..explain.overlay import COLORMAPS, overlay
from ..explain.pipeline import encode
from .batcher import Batcher
from .models import ServedModel
from .tensors import decode_request, encode_response

EXTENSIONS = ["binary_tensor_data", "model_repository(read-only)", "statistics", "explain"]


@dataclass(frozen=True)
class ServeConfig:
    """Server limits. max_body_bytes: a request body; max_pixels: an image (checked from its header,
    before it is decoded); max_batch: samples per request and per session run; timeout_s: a request,
    queueing included."""

    max_batch: int = 8
    max_delay_ms: float = 5.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    timeout_s: float = 30.0


class ServeError(Exception):
    """An error answered with its HTTP status and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _State:
    def __init__(self, models: dict[str, ServedModel], config: ServeConfig) -> None:
        self.models = models
        self.config = config
        self.ready = False
        self.batchers = {name: Batcher(_runner(m), config.max_batch, config.max_delay_ms) for name, m in models.items()}

    def model(self, name: str, version: str | None = None) -> ServedModel:
        if name not in self.models:
            raise ServeError(404, f"unknown model {name!r}: this server has {', '.join(self.models) or 'no models'}")
        if version not in (None, "1"):
            raise ServeError(404, f"model {name!r} has no version {version!r}: this server has version 1 only")
        if not self.ready:
            raise ServeError(503, f"model {name!r} is not ready: the server is starting or stopping")
        return self.models[name]

    async def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs for one request, through the model's batcher, within the request timeout."""
        try:
            return await asyncio.wait_for(self.batchers[name].submit(feeds), self.config.timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(
                504, f"the request to {name!r} took longer than the server's timeout of {self.config.timeout_s:g} s"
            ) from None
        except OnnxGradCamError as exc:
            raise ServeError(500, f"inference failed: {exc}") from None


def _runner(model: ServedModel):  # type: ignore[no-untyped-def]
    from ..explain.session import run_session

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(model.output_names, run_session(model.explainer.session, feeds)))

    return run


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (before reading it all when
    Content-Length says so)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"the request body of {int(declared)} bytes is over the server's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"the request body is over the server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An 8-bit RGB image from file bytes; one of more than `max_pixels` pixels is refused from its
    header, before its pixels are decoded (a decompression bomb never expands)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as exc:  # Pillow's own guard, also from the header
        raise ServeError(413, f"the image has too many pixels ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ServeError(
            400, f"the upload is not a readable image ({exc}): to fix this, send JPEG, PNG, BMP, WebP or TIFF"
        ) from None
    if width * height > max_pixels:
        raise ServeError(
            413, f"the image is {width}x{height} = {width * height} pixels, over the server's limit of {max_pixels}"
        )
    return load_image(io.BytesIO(data))  # type: ignore[arg-type]


# -- routes --------------------------------------------------------------------------------------


async def root(request: Request) -> Response:
    # the web page for people will live here; for now, where to go
    st: _State = request.app.state.serve
    return JSONResponse({"name": "onnx-gradcam", "version": __version__, "models": list(st.models), "api": "/v2"})


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    st: _State = request.app.state.serve
    return JSONResponse({"ready": st.ready}, status_code=200 if st.ready else 503)


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "onnx-gradcam", "version": __version__, "extensions": EXTENSIONS})


async def model_metadata(request: Request) -> Response:
    st: _State = request.app.state.serve
    return JSONResponse(st.model(request.path_params["name"], request.path_params.get("version")).metadata())


async def model_ready(request: Request) -> Response:
    st: _State = request.app.state.serve
    name = request.path_params["name"]
    st.model(name, request.path_params.get("version"))  # 404 or 503
    return JSONResponse({"name": name, "ready": True})


async def model_stats(request: Request) -> Response:
    """The statistics extension, as Triton answers it (tritonclient's get_inference_statistics):
    inference_count counts samples, execution_count session runs (their ratio: the mean batch)."""
    st: _State = request.app.state.serve
    name = request.path_params["name"]
    st.model(name)  # 404 or 503
    b = st.batchers[name]
    stats = {"name": name, "version": "1", "inference_count": b.samples_run, "execution_count": b.batches_run}
    return JSONResponse({"model_stats": [stats]})


async def infer(request: Request) -> Response:
    st: _State = request.app.state.serve
    name = request.path_params["name"]
    model = st.model(name, request.path_params.get("version"))
    body = await _body(request, st.config.max_body_bytes)
    req = decode_request(body, request.headers.get("inference-header-content-length"))
    feeds = model.checked_feeds(req.tensors, st.config.max_batch)
    unknown = [o for o in req.outputs or [] if o not in model.output_names]
    if unknown:
        raise BadInputError(
            f"model {name!r} has no output {unknown[0]!r}: to fix this, ask for {', '.join(model.output_names)}"
        )
    results = await st.run(name, feeds)
    content, header_length = encode_response(name, req, results)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


async def _explain_inputs(request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
    """(image bytes, options) from a multipart form (field `image` or `file`) or a raw body;
    options come from the query string and the form's other fields."""
    body = await _body(request, limit)
    options = dict(request.query_params)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except HTTPException as exc:
            raise BadInputError(f"the multipart form cannot be read ({exc.detail})") from None
        image: bytes | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in ("image", "file") and image is None:
                    image = await value.read()
            else:
                options[key] = value
        await form.close()
        if image is None:
            raise BadInputError("the form has no file field 'image' (or 'file'): to fix this, send the image in one")
        return image, options
    if not body:
        raise BadInputError("the request has no image: to fix this, send the image file as the body or a form field")
    return body, options


def _option(options: dict[str, str], key: str, kind: type, default: Any) -> Any:
    if key not in options or options[key] == "":
        return default
    text = options[key]
    try:
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        return kind(text)
    except ValueError:
        raise BadInputError(f"option {key}={text!r} is not a {kind.__name__}") from None


def _overlay_png(image: Image.Image, cam: np.ndarray, colormap: str, alpha: float) -> bytes:
    return encode(overlay(image, cam, colormap, alpha), "png")


async def explain(request: Request) -> Response:
    st: _State = request.app.state.serve
    name = request.path_params["name"]
    model = st.model(name)
    exp = model.explainer
    if model.is_seed:
        raise BadInputError(
            f"model {name!r} was prepared with --target seed: explain it with /v2/models/{name}/infer and gradcam_seed"
        )
    data, options = await _explain_inputs(request, st.config.max_body_bytes)
    unknown = sorted(set(options) - {"class", "top_k", "method", "colormap", "alpha", "raw"})
    if unknown:
        raise BadInputError(
            f"unknown option {unknown[0]!r}: to fix this, use class, top_k, method, colormap, alpha or raw"
        )
    target = options.get("class") or None
    top_k = _option(options, "top_k", int, 5)
    alpha = _option(options, "alpha", float, 0.5)
    colormap = options.get("colormap") or "jet"
    raw = _option(options, "raw", bool, False)
    if top_k < 1:
        raise BadInputError(f"top_k={top_k}: to fix this, give 1 or more")
    if colormap not in COLORMAPS:
        raise BadInputError(f"unknown colormap {colormap!r}: to fix this, use one of {', '.join(COLORMAPS)}")
    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"alpha={alpha} is outside [0, 1]: to fix this, give a value such as 0.5")
    method = exp.checked_method(options.get("method") or None)
    # decoding, resizing and PNG encoding run in worker threads (Pillow releases the GIL there): on
    # the event loop they took ~20 ms a request in which no other request could arrive or be batched
    image = await run_in_threadpool(decode_image, data, st.config.max_pixels)
    x = await run_in_threadpool(exp.to_tensor, [image])
    feeds = {exp.input.name: x}
    classes = exp.class_feed(target, 1)  # refuses a class where the model was prepared with --class-input none
    if exp.class_input != "none":
        feeds["gradcam_class"] = classes
    result = exp.collect(await st.run(name, feeds), method)
    cls = int(result.targets[0])
    png = await run_in_threadpool(_overlay_png, image, result.maps[0], colormap, alpha)
    labels = exp.labels
    answer: dict[str, Any] = {
        "model_name": name,
        "class": cls,
        "label": labels[cls] if labels and 0 <= cls < len(labels) else None,
        "score": float(result.scores[0]),
        "probability": float(result.probabilities[0, cls]) if result.probabilities is not None else None,
        "feature_layer": result.feature_layer,
        "method": result.method,
        "methods": exp.methods,
        "overlay_png": base64.b64encode(png).decode("ascii"),
        "image_size": list(image.size),
    }
    if result.probabilities is not None and result.logits is not None:
        order = np.argsort(-result.logits[0], kind="stable")[:top_k]
        answer["top_k"] = [
            {
                "class": int(c),
                "label": labels[int(c)] if labels else None,
                "probability": float(result.probabilities[0, c]),
                "score": float(result.logits[0, c]),
            }
            for c in order
        ]
    if raw:
        answer["map"] = {"shape": list(result.maps[0].shape), "data": result.maps[0].reshape(-1).tolist()}
        answer["raw_map"] = {"shape": list(result.raw[0].shape), "data": result.raw[0].reshape(-1).tolist()}
    return JSONResponse(answer)


# -- errors ----------------------------------------------------------------------------------------


async def _serve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServeError)
    return _error(exc.status, exc.message)


async def _bad_input(request: Request, exc: Exception) -> Response:
    return _error(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


async def _internal(request: Request, exc: Exception) -> Response:
    return _error(500, f"inference failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def create_app(
    models: dict[str, ServedModel], config: ServeConfig | None = None, extra_routes: Sequence[BaseRoute] = ()
) -> Starlette:
    """The ASGI app serving `models` (from load_models). Its lifespan starts one batcher per model.

    `extra_routes` come first, so they may take over a path: the web page for people mounts at `/`.
    """
    state = _State(models, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for b in state.batchers.values():
            b.start()
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            for b in state.batchers.values():
                await b.stop()

    routes = [
        *extra_routes,
        Route("/", root),
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/stats", model_stats),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/explain", explain, methods=["POST"]),
        Route("/v1/models/{name}:explain", explain, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ServeError: _serve_error,
            BadInputError: _bad_input,
            HTTPException: _http_error,
            Exception: _internal,
        },
    )
    app.state.serve = state
    return app


def run(
    models: dict[str, ServedModel],
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
    log_level: str = "info",
) -> None:
    """Serve loaded models (see load_models), with the web page at `/`, until SIGINT or SIGTERM;
    in-flight requests finish first."""
    import uvicorn

    from .webpage import page_routes

    app = create_app(models, config, extra_routes=page_routes())
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)


__all__ = ["ServeConfig", "ServeError", "create_app", "decode_image", "run"]
