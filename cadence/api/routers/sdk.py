"""The browser tracker: ``GET /sdk/cadence.js`` (no key needed; the page passes its write key).

The script is read once from the package, served with a long cache lifetime and an
ETag so a browser revalidates cheaply with ``If-None-Match`` and gets a 304.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Request, Response

__all__ = ["CACHE_CONTROL", "Script", "load_script", "router"]

router = APIRouter(prefix="/sdk", tags=["sdk"])

#: A day fresh, then a week where a stale copy may be used while revalidating.
CACHE_CONTROL = "public, max-age=86400, stale-while-revalidate=604800"


@dataclass(frozen=True)
class Script:
    """A static script's bytes and its strong ETag."""

    body: bytes
    etag: str


@cache
def load_script(name: str) -> Script:
    """Read ``cadence/api/static/<name>`` and compute its ETag (a hash of the bytes).

    >>> script = load_script("cadence.js")
    >>> script.etag == '"' + hashlib.sha256(script.body).hexdigest()[:32] + '"'
    True
    """
    body = files("cadence.api").joinpath("static", name).read_bytes()
    return Script(body=body, etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    candidates = {part.strip().removeprefix("W/") for part in header.split(",")}
    return "*" in candidates or etag in candidates


@router.get("/cadence.js", response_class=Response, responses={304: {"description": "not modified"}})
def tracker_script(request: Request) -> Response:
    """The browser tracker script (see docs/tracker.md)."""
    script = load_script("cadence.js")
    headers = {
        "Cache-Control": CACHE_CONTROL,
        "ETag": script.etag,
        "X-Content-Type-Options": "nosniff",
        "Access-Control-Allow-Origin": "*",  # a public script; lets pages use integrity= checks
    }
    if _etag_matches(request.headers.get("if-none-match"), script.etag):
        return Response(status_code=304, headers=headers)
    return Response(content=script.body, media_type="application/javascript; charset=utf-8", headers=headers)
