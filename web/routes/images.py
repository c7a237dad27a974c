"""Image bytes, by ledger id only: an image's original file rendered as the model saw it, and
a prediction's heatmap. No part of a request ever becomes a file path."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import Response

from bonewatch.db.worklist import heatmap_source, image_source
from bonewatch.web.auth import Context, api_user
from bonewatch.web.imaging import (
    DEFAULT_SIZE,
    SIZES,
    NotAvailable,
    render_heatmap,
    render_original,
)

# Pages use their session; scripts may use Basic credentials as on the API.
router = APIRouter(dependencies=[Depends(api_user)])
Size = Annotated[int, Query(description=f"longest side, one of {SIZES}")]
PNG_HEADERS = {"Cache-Control": "private, no-store", "Content-Disposition": "inline"}


def _size(size: int) -> int:
    if size not in SIZES:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"size must be one of {', '.join(map(str, SIZES))}",
        )
    return size


@router.get("/images/{image_id:int}.png")
def image_png(ctx: Context, image_id: int, size: Size = DEFAULT_SIZE) -> Response:
    size = _size(size)
    source = image_source(ctx.engine, image_id)
    if source is None or source.status == "duplicate":
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such image")
    key = ("image", image_id, source.sha256, size)
    data = ctx.renders.get(key)
    if data is None:
        try:
            data = render_original(source, ctx.config, size)
        except NotAvailable as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        ctx.renders.put(key, data)
    return Response(data, media_type="image/png", headers=PNG_HEADERS)


@router.get("/heatmaps/{prediction_id:int}.png")
def heatmap_png(ctx: Context, prediction_id: int, size: Size = DEFAULT_SIZE) -> Response:
    size = _size(size)
    found = heatmap_source(ctx.engine, prediction_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no heatmap for that prediction")
    key = ("heatmap", prediction_id, size)
    data = ctx.renders.get(key)
    if data is None:
        try:
            data = render_heatmap(found[1], ctx.config, size)
        except NotAvailable as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        ctx.renders.put(key, data)
    return Response(data, media_type="image/png", headers=PNG_HEADERS)
