"""An HTTP server for prepared models: the Open Inference Protocol (KServe V2 REST, as Triton speaks
it) with the binary tensor extension, plus an explain endpoint for images (V2 path and KServe V1 verb).

Built on Starlette and uvicorn: Starlette is a small, typed, well-kept ASGI toolkit (the base of
FastAPI) whose routing, requests and multipart parsing are all this server needs, without FastAPI's
pydantic layer; uvicorn is the reference ASGI server, with graceful shutdown on SIGTERM (in-flight
requests finish first). Both come with the optional extra `pip install 'onnx-gradcam[serve]'`; the
package core never imports this subpackage (only the `serve` command does, lazily).
"""

from __future__ import annotations

from .app import ServeConfig, create_app, run
from .models import ServedModel, load_models

__all__ = ["ServeConfig", "create_app", "run", "ServedModel", "load_models"]
