"""The packaged stylesheet, script and icon, looked up by name in a fixed table: nothing requested
is ever joined to a folder."""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import Response

from bonewatch.web.auth import current_user
from bonewatch.web.context import PACKAGE_DIR

router = APIRouter(dependencies=[Depends(current_user)])
TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


@lru_cache(maxsize=1)
def static_files() -> dict[str, tuple[bytes, str]]:
    """Every file shipped in ``web/static``, read once: name -> (bytes, media type)."""
    folder = PACKAGE_DIR / "static"
    return {
        path.name: (path.read_bytes(), TYPES[path.suffix])
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in TYPES
    }


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    found = static_files().get(name)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such file")
    data, media_type = found
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})
