"""`GET /`: a page to try the service from a browser (static HTML, no build step, no CDN)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)
PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"
# Nothing but this origin: the page works offline and cannot leak an image to a third party.
HEADERS = {
    "Cache-Control": "public, max-age=300",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src blob:; connect-src 'self'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


@cache
def page_html() -> bytes:
    """Read once per process: the page is served from memory, off the classify path."""
    return PAGE.read_bytes()


@router.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    return HTMLResponse(page_html(), headers=HEADERS)
