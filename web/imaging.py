"""Images for the browser: each original file decoded as the model saw it, and the worker's
heatmap files, scaled to screen size as PNG.

Both are found by ledger id only. The original goes through :func:`bonewatch.ingest.read_image`
(so windowing and MONOCHROME1 come out as they did for the model), checked against its
registered digest; a heatmap is served only from inside the configured heatmap folder.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from bonewatch.db.worklist import ImageSource
from bonewatch.ingest import read_image
from bonewatch.web.config import WebConfig

SIZES = (256, 512, 1024, 2048)
DEFAULT_SIZE = 1024
# The largest heatmap file read, and its largest side: the worker writes them at decode size.
MAX_HEATMAP_BYTES = 64 * 1024 * 1024
MAX_HEATMAP_PIXELS = 4096 * 4096
# The patient hash of a decode here is never kept; no site salt is needed.
_SALT = "bonewatch-review"


class NotAvailable(LookupError):
    """The file cannot be shown; the message says why, without its path."""


def original_path(stored: str, path_root: Path | None) -> Path:
    """Where a ledger path's file is: whole, or under ``path_root`` when stored relative."""
    path = Path(stored)
    if path.is_absolute() or path_root is None:
        return path
    return path_root / path


def _png(pixels: np.ndarray | Image.Image, size: int) -> bytes:
    picture = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    if max(picture.size) > size:
        scale = size / max(picture.size)
        target = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(target, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()


def render_original(source: ImageSource, config: WebConfig, size: int) -> bytes:
    """The image's file decoded and windowed as for the model, as a grey PNG within ``size``.

    Raises:
        NotAvailable: the file is gone, changed since it was registered, or cannot be decoded.
    """
    path = original_path(source.path, config.path_root)
    try:
        image = read_image(
            path,
            salt=_SALT,
            max_pixels=config.max_pixels,
            max_bytes=config.max_file_bytes,
            sha256=source.sha256,
            max_side=max(2 * size, 1024),
            # JPEG 2000 and JPEG decode no finer than twice the picture's size.
            min_side=size,
        )
    except OSError as exc:
        reason = exc.strerror or "I/O error"
        raise NotAvailable(f"the original file cannot be read ({reason})") from None
    except Exception as exc:  # IngestError and its family: say which, not where
        raise NotAvailable(f"the original file cannot be shown: {type(exc).__name__}") from None
    grey = np.clip(np.rint(image.pixels * 255.0), 0, 255).astype(np.uint8)
    return _png(grey, size)


def render_heatmap(stored: str, config: WebConfig, size: int) -> bytes:
    """A heatmap overlay file of the worker's, as a PNG within ``size``.

    Raises:
        NotAvailable: the path leaves the heatmap folder, or the file is gone or not a PNG.
    """
    folder = config.heatmap_dir.resolve()
    try:
        path = Path(stored).resolve(strict=True)
    except OSError:
        raise NotAvailable("the heatmap file is not there") from None
    if not path.is_relative_to(folder) or not path.is_file():
        raise NotAvailable("the heatmap file is outside the heatmap folder")
    if path.stat().st_size > MAX_HEATMAP_BYTES:
        raise NotAvailable("the heatmap file is too large")
    try:
        with Image.open(path) as picture:
            if picture.format != "PNG" or picture.width * picture.height > MAX_HEATMAP_PIXELS:
                raise NotAvailable("the heatmap file is not a PNG of the expected size")
            rgb = picture.convert("RGB")
    except (OSError, Image.DecompressionBombError):
        raise NotAvailable("the heatmap file cannot be decoded") from None
    return _png(rgb, size)


class RenderCache:
    """The last few rendered PNGs by key, so flipping between studies does not decode again."""

    def __init__(self, entries: int = 64) -> None:
        self._entries = entries
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[object, ...], data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self._entries:
                self._items.popitem(last=False)
