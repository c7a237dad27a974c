"""The review app's configuration: plain values, resolved once by ``bonewatch serve``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WebConfig:
    """What the app needs to know; the CLI builds it from the settings.

    Args:
        database_url: The ledger.
        session_secret: Key that signs session cookies (at least 32 characters).
        heatmap_dir: The only folder heatmap files are served from.
        path_root: The folder relative ledger paths are relative to (None: paths are whole).
        session_seconds: How long a login lasts.
        max_pixels: Largest rows*columns an image route decodes.
        max_file_bytes: Largest file an image route reads.
        metrics_token: Bearer token that opens ``/metrics`` without a login (None: admins only).
        login_attempts: Wrong passwords per account before logins to it pause; an address gets
            four times as many.
        login_lockout_seconds: How long such a pause lasts, and the window failures count in.
        secure_cookies: Mark cookies Secure even on plain-HTTP requests (a TLS proxy in front
            that does not forward the scheme); requests over https always get Secure cookies.
    """

    database_url: str
    session_secret: str
    heatmap_dir: Path
    path_root: Path | None = None
    session_seconds: float = 8 * 3600
    max_pixels: int = 100_000_000
    max_file_bytes: int = 2_000_000_000
    metrics_token: str | None = None
    login_attempts: int = 5
    login_lockout_seconds: float = 900.0
    secure_cookies: bool = False

    def __post_init__(self) -> None:
        if len(self.session_secret) < 32:
            raise ValueError("the session secret must be at least 32 characters")
