"""The dashboard: ``/`` and its static files (``branchd/ui/``), no build step.

They hold no data, so they need no token: the page asks for the token, keeps
it in its session and sends it as a Bearer header to the API, whose rules
(token, Origin, Host) are unchanged. Served by the daemon itself, the page is
same-origin, so its calls pass the Origin check a foreign page fails.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

#: The page's files: name -> content type. Only these are served (no path
#: from the request ever reaches the file system).
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PREFIX = "/ui/"
#: The router's paths of the page (not API routes: not in the OpenAPI document).
PATHS = ("/", PREFIX + "{file}")

#: Scripts and styles from this daemon only, no inline script, no frames (the
#: buttons stop things: a page must not frame them and lure a click).
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'none'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_public(path: str) -> bool:
    """A path of the dashboard's own files: served without a token."""
    return path == "/" or (path.startswith(PREFIX) and path[len(PREFIX) :] in FILES)


def _load() -> dict[str, bytes]:
    # the package's folder, as resources.files("branchd") finds it for a package
    # on disk (branchd is one: celery/broker.py reads its files beside it too);
    # importlib.resources itself is 0.14 MiB of the daemon's memory (issue 10)
    folder = Path(__file__).parent.parent / "ui"
    return {name: (folder / name).read_bytes() for name in FILES}


def add_routes(app: web.Application) -> None:
    """``GET /`` (the page) and ``GET /ui/<file>``, read once here."""
    files = _load()

    def serve(name: str) -> web.Response:
        return web.Response(body=files[name], headers={"Content-Type": FILES[name], **_HEADERS})

    async def index(request: web.Request) -> web.Response:
        return serve("index.html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in files:
            raise web.HTTPNotFound()
        return serve(name)

    app.router.add_get(PATHS[0], index)
    app.router.add_get(PATHS[1], static)
