"""The review web app (``bonewatch serve``): worklist, study pages, reviews, stats, JSON API.

It reads and writes the ledger through :mod:`bonewatch.db` and renders images through
:mod:`bonewatch.ingest`; no SQL and no file path taken from a request.
"""

from bonewatch.web.app import create_app
from bonewatch.web.config import WebConfig

__all__ = ["WebConfig", "create_app"]
