"""One settings object, read once at start-up from ``BONEWATCH_*`` variables and CLI options."""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

import models

DEMO_BUNDLE = Path(models.__file__).resolve().parent / "bundles" / "demo-phantom"


class Settings(BaseSettings):
    """bonewatch configuration; every field can be set as ``BONEWATCH_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="BONEWATCH_", extra="ignore")

    data_dir: Path = Field(Path("./bonewatch-data"), description="SQLite file and demo inbox")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")
    bundle: Path = Field(DEMO_BUNDLE, description="model bundle folder")
    batch_size: int = Field(16, ge=1, le=1024, description="images per inference batch")
    decode_workers: int = Field(2, ge=1, le=64, description="threads decoding ahead of inference")
    lease_seconds: float = Field(300.0, gt=0, description="how long a claimed image stays leased")
    max_attempts: int = Field(3, ge=1, description="transient-failure retries before 'failed'")
    max_pixels: int = Field(100_000_000, ge=1, description="largest rows*columns accepted")
    max_file_bytes: int = Field(2_000_000_000, ge=1, description="largest file accepted")
    phi_salt: str | None = Field(None, description="PatientID hash salt")
    settle_seconds: float = Field(1.0, ge=0, description="quiet time = complete")
    poll: bool = Field(False, description="poll the inbox instead of OS events (network shares)")
    poll_interval: float = Field(1.0, gt=0)
    follow_symlinks: bool = Field(False, description="follow symlinks that leave the inbox")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'bonewatch.sqlite').resolve()}"

    def salt(self) -> str:
        """The PatientID salt: configured, or a random one kept in the data directory."""
        if self.phi_salt:
            return self.phi_salt
        path = self.data_dir / "phi-salt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip()
