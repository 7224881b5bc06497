"""The browser tracker: ``GET /sdk/cadence.js`` (no key needed; the page passes its write key).

``/sdk/cadence.js`` is the minified build (``scripts/minify-tracker.sh``) and
``/sdk/cadence.src.js`` the readable source it was built from. Both are read once from
the package, gzipped when the browser accepts it, and served with a long cache
lifetime and an ETag so a browser revalidates cheaply with ``If-None-Match`` (304).
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Request, Response

__all__ = ["CACHE_CONTROL", "SCRIPTS", "Script", "load_script", "router"]

router = APIRouter(prefix="/sdk", tags=["sdk"])

#: A day fresh, then a week where a stale copy may be used while revalidating.
CACHE_CONTROL = "public, max-age=86400, stale-while-revalidate=604800"

#: URL name -> file in ``cadence/api/static``.
SCRIPTS = {"cadence.js": "cadence.min.js", "cadence.src.js": "cadence.js"}


@dataclass(frozen=True)
class Script:
    """A static script's bytes, their gzip encoding and a strong ETag."""

    body: bytes
    gzipped: bytes
    etag: str


@cache
def load_script(name: str) -> Script:
    """Read ``cadence/api/static/<name>``, gzip it and compute its ETag (a hash of the bytes).

    >>> script = load_script("cadence.js")
    >>> script.etag == '"' + hashlib.sha256(script.body).hexdigest()[:32] + '"'
    True
    >>> gzip.decompress(script.gzipped) == script.body
    True
    """
    body = files("cadence.api").joinpath("static", name).read_bytes()
    return Script(
        body=body,
        gzipped=gzip.compress(body, compresslevel=9, mtime=0),
        etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
    )


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    candidates = {part.strip().removeprefix("W/") for part in header.split(",")}
    return "*" in candidates or etag in candidates


def _serve(request: Request, script: Script) -> Response:
    headers = {
        "Cache-Control": CACHE_CONTROL,
        "ETag": script.etag,
        "Vary": "Accept-Encoding",
        "X-Content-Type-Options": "nosniff",
        "Access-Control-Allow-Origin": "*",  # a public script; lets pages use integrity= checks
    }
    if _etag_matches(request.headers.get("if-none-match"), script.etag):
        return Response(status_code=304, headers=headers)
    body = script.body
    if "gzip" in request.headers.get("accept-encoding", "").lower():
        body = script.gzipped
        headers["Content-Encoding"] = "gzip"
    return Response(content=body, media_type="application/javascript; charset=utf-8", headers=headers)


@router.api_route(
    "/cadence.js",
    methods=["GET", "HEAD"],
    response_class=Response,
    responses={304: {"description": "not modified"}},
)
def tracker_script(request: Request) -> Response:
    """The browser tracker, minified (see docs/tracker.md)."""
    return _serve(request, load_script(SCRIPTS["cadence.js"]))


@router.api_route(
    "/cadence.src.js",
    methods=["GET", "HEAD"],
    response_class=Response,
    responses={304: {"description": "not modified"}},
)
def tracker_source(request: Request) -> Response:
    """The browser tracker's readable source, the same behaviour as ``/sdk/cadence.js``."""
    return _serve(request, load_script(SCRIPTS["cadence.src.js"]))
