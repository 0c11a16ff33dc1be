"""The web page for people at `/`: one self-contained HTML file (static/index.html, inline CSS and JS)
that asks the explain endpoint. API clients asking `/` for JSON still get the server's summary."""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from .app import root

PAGE = "index.html"


def page_html() -> str:
    """The page's text, read from the package (it is package data)."""
    return (files(__package__) / "static" / PAGE).read_text(encoding="utf-8")


def _wants_html(request: Request) -> bool:
    # a browser asks for text/html first; curl, urllib and the page's own fetch of the model list do not
    accept = request.headers.get("accept", "")
    return "text/html" in accept and (
        "application/json" not in accept or accept.index("text/html") < accept.index("application/json")
    )


async def page(request: Request) -> Response:
    if not _wants_html(request):
        return await root(request)
    return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})


def page_routes() -> list[BaseRoute]:
    """Routes for create_app(extra_routes=...): the page at `/`."""
    return [Route("/", page)]


__all__ = ["page_html", "page_routes"]
