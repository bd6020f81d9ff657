"""The browser playground: three static files from `tcserve/web/`, served at `/` and `/playground`.

The page holds no server data of its own: everything it shows comes from the
public API with the key the user types, so keys, limits and the ledger apply to
it like to any client. The files are therefore public (see `PATHS`, which
`Authenticate` lets through without a key), and the content security policy
keeps the page from loading or sending anything beyond this server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground": ("index.html", "text/html; charset=utf-8"),
    "/playground/app.css": ("app.css", "text/css; charset=utf-8"),
    "/playground/app.js": ("app.js", "text/javascript; charset=utf-8"),
}
PATHS = frozenset(_FILES)

_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


def router() -> APIRouter:
    """Read the files once, when the app is built (they are small and never change while it runs)."""
    web = resources.files("tcserve") / "web"
    routes = APIRouter(include_in_schema=False)
    for path, (name, media_type) in _FILES.items():
        routes.add_api_route(path, _static((web / name).read_bytes(), media_type), methods=["GET"])
    return routes


def _static(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def endpoint() -> Response:
        return Response(content, media_type=media_type, headers=_HEADERS)

    return endpoint
