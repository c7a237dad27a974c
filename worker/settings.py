"""One settings object, read and validated once at start-up from ``BONEWATCH_*`` variables and
command-line options, then passed down as a frozen value.

Every process that serves gets the object its parent resolved: a Celery pool child is handed the
launcher's settings, never a fresh read of the environment.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Field, PrivateAttr
from pydantic_settings import BaseSettings, SettingsConfigDict

from bonewatch import models

if TYPE_CHECKING:
    from bonewatch.ingest.archives import PathFilter

DEMO_BUNDLE = Path(models.__file__).resolve().parent / "bundles" / "demo-phantom"
SECRETS_DIR = "/run/secrets"


def _bulk_window(value: str | None) -> str | None:
    """A bulk window is HH:MM-HH:MM (local time) or unset; the error says why it is not."""
    from bonewatch.worker.window import parse_window

    window = parse_window(value)
    return str(window) if window else None


class Settings(BaseSettings):
    """bonewatch configuration; every field can be set as ``BONEWATCH_<FIELD>``."""

    # Secrets may come as files named like the variables (Docker secrets: /run/secrets/
    # bonewatch_database_url, ...), so passwords stay out of the environment.
    model_config = SettingsConfigDict(
        env_prefix="BONEWATCH_",
        extra="ignore",
        frozen=True,
        secrets_dir=SECRETS_DIR if Path(SECRETS_DIR).is_dir() else None,
    )

    data_dir: Path = Field(Path("./bonewatch-data"), description="SQLite file and demo inbox")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")
    bundle: Path = Field(DEMO_BUNDLE, description="model bundle folder")
    batch_size: int = Field(16, ge=1, le=1024, description="images per inference batch")
    decode_workers: int = Field(2, ge=1, le=64, description="threads decoding ahead of inference")
    decode_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="processes decoding claimed files in embedded runs (0: the decode threads); "
        "for decoders that hold Python's lock for a whole image (JPEG 2000)",
    )
    lease_seconds: float = Field(300.0, gt=0, description="how long a claimed image stays leased")
    max_attempts: int = Field(3, ge=1, description="transient-failure retries before 'failed'")
    retry_backoff_seconds: float = Field(2.0, ge=0, description="first retry delay; doubles")
    max_pixels: int = Field(100_000_000, ge=1, description="largest rows*columns accepted")
    max_file_bytes: int = Field(2_000_000_000, ge=1, description="largest file accepted")
    phi_salt: str | None = Field(None, description="PatientID hash salt")
    phi_key_file: Path | None = Field(
        None, description="file holding the PatientID hash key (kept outside the data directory)"
    )
    settle_seconds: float = Field(1.0, ge=0, description="quiet time = complete")
    poll: bool = Field(False, description="poll the inbox instead of OS events (network shares)")
    poll_interval: float = Field(1.0, gt=0)
    follow_symlinks: bool = Field(False, description="follow symlinks that leave the inbox")
    include: str = Field(
        "",
        description="globs of the files and archive members to take, comma-separated (`*.dcm`, "
        "`PAT*/*`); empty = all; archives are opened whatever it says",
    )
    exclude: str = Field(
        "", description="globs of files and archive members to leave out, comma-separated"
    )
    # Moving finished files out of the inbox (opt-in; originals are otherwise left in place).
    quarantine: bool = Field(False, description="move finished inbox files to done/ or failed/")
    inbox: Path | None = Field(None, description="the watched folder; `watch INBOX` sets it")
    store_relative_paths: bool = Field(
        False,
        description="store file paths relative to path_root (the inbox when watching), so "
        "folder names above it stay out of the ledger",
    )
    path_root: Path | None = Field(
        None, description="the folder stored paths are relative to; the same on every host"
    )
    umask: str = Field(
        "077",
        pattern=r"^0?[0-7]{3}$",
        description="file-creation mask of serving processes (octal); 077: only the owner "
        "reads the ledger, heatmaps and received files; 027 shares them with the group",
    )
    bundle_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="the pinned digest of the bundle (`bonewatch bundle show` prints it); "
        "a bundle with another digest is refused at load",
    )
    engine: Literal["auto", "keras", "onnx", "openvino"] = Field(
        "auto",
        description="inference engine; auto = onnx or openvino, whichever BONEWATCH_PRECISION="
        "auto measures faster (onnx for a set precision), keras for a bundle without ONNX "
        "models; openvino runs the same ONNX files after a parity check against ONNX Runtime",
    )
    precision: Literal["auto", "fp32", "int8", "bf16"] = Field(
        "auto",
        description="numeric precision; auto = the fastest engine and precision here (among "
        "those BONEWATCH_ENGINE allows) that passes its parity check, by a short measurement "
        "at load; bf16 on openvino only, where the CPU has it",
    )
    cache_dir: Path | None = Field(
        None,
        description="where auto's measurement is kept for the next start on this host; "
        "default $XDG_CACHE_HOME/bonewatch or ~/.cache/bonewatch",
    )
    reduced_decode: bool = Field(
        True,
        description="decode JPEG 2000 and JPEG at the smallest resolution covering twice the "
        "model input, or 1,024 px for heatmap pictures (in full where the reduction fails)",
    )
    intra_op_threads: int = Field(
        0, ge=0, le=256, description="inference threads inside one op; 0 = one per core"
    )
    inter_op_threads: int = Field(1, ge=1, le=64, description="inference ops run side by side")
    inference_streams: int = Field(
        0,
        ge=0,
        le=64,
        description="batches in inference at once (embedded worker); 0 = one per core (at most "
        "4) on ONNX Runtime, 1 on Keras",
    )
    forward_batch: int = Field(
        0,
        ge=0,
        le=4096,
        description="most images per forward pass; 0 = the engine's choice (CPU: 1 DenseNet121 "
        "image at 224 px on ONNX Runtime, 4 on Keras, more for smaller inputs; GPU: the batch)",
    )
    malloc_arenas: int = Field(
        2, ge=0, le=1024, description="glibc malloc arenas of a serving process; 0 = glibc's own"
    )
    blas_threads: int = Field(
        1,
        ge=0,
        le=1024,
        description="threads NumPy's BLAS may use in a serving process (each decode thread "
        "resizes on its own); 0 = the library's default, one per core",
    )
    warm_up: bool = Field(
        True, description="run every model once at start-up, before the first batch"
    )
    heatmaps: bool = Field(False, description="store a Grad-CAM PNG for every positive image")
    heatmap_dir: Path | None = Field(None, description="heatmap folder; default data_dir/heatmaps")
    # Distributed mode (Celery). With a broker, watch/process only register and enqueue.
    broker_url: str | None = Field(None, description="redis:// or amqp:// URL; unset = embedded")
    reconcile_interval: float = Field(
        60.0, ge=0, description="seconds between automatic reconcile runs in workers; 0 = off"
    )
    reconcile_grace_seconds: float = Field(
        30.0, ge=0, description="a queued row this long without a message is re-published"
    )
    bulk_window: Annotated[str | None, AfterValidator(_bulk_window)] = Field(
        None,
        description="HH:MM-HH:MM in local time (20:00-06:00): workers take `bulk` only then, "
        "`live` always; unset = any hour",
    )
    transient_retries: int = Field(
        10, ge=0, description="task retries when the database or broker is unavailable"
    )
    retry_backoff_max: float = Field(60.0, gt=0, description="longest wait between retries")
    remote_control: bool = Field(
        False, description="accept Celery remote-control commands (shutdown, pool changes)"
    )
    # DICOM network: `bonewatch listen` (Storage SCP) and `bonewatch echo`.
    dicom_host: str = Field("0.0.0.0", min_length=1, description="address `listen` binds")
    dicom_port: int = Field(11112, ge=0, le=65535, description="port `listen` binds; 0 = any")
    dicom_ae_title: str = Field(
        "BONEWATCH",
        max_length=16,
        pattern=r"^[\x20-\x5b\x5d-\x7e]*[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]*$",
        description="the listener's AE title; the called AE title must match it",
    )
    dicom_peers: str = Field(
        "",
        pattern=r"^\s*(\*|[\x20-\x2b\x2d-\x3f\x41-\x5b\x5d-\x7e]{1,16}(@[\w.:\-]+)?"
        r"(\s*,\s*[\x20-\x2b\x2d-\x3f\x41-\x5b\x5d-\x7e]{1,16}(@[\w.:\-]+)?)*)?\s*$",
        description="callers allowed to send: AET or AET@host, comma-separated, or * for any; "
        "empty = callers on loopback only",
    )
    dicom_max_associations: int = Field(10, ge=1, le=1000, description="associations at once")
    # Results back to PACS (docs/deliver.md).
    dicom_destinations: str = Field(
        "", description="AET@host:port[,...] that receive the SRs and Secondary Captures"
    )
    dicomweb_url: str | None = Field(None, description="STOW-RS base URL that receives them too")
    send_retries: int = Field(5, ge=1, le=100, description="attempts per object and destination")
    send_timeout: float = Field(
        60.0, ge=0, le=86400, description="seconds `process` waits for its deliveries"
    )
    send_all_images: bool = Field(
        False, description="a Secondary Capture for every image, not only the positives"
    )
    dicom_network_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds an association may stay silent"
    )
    dicom_acse_timeout: float = Field(
        30.0, gt=0, le=3600, description="seconds to wait for association set-up messages"
    )
    dicom_dimse_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds to wait for a DIMSE message"
    )
    min_free_mb: int = Field(
        2048,
        ge=0,
        description="free MB the data directory's file system keeps; below it C-STORE answers "
        "Out of Resources",
    )
    study_stable_seconds: float = Field(
        30.0,
        ge=0,
        le=86400,
        description="a study is complete once nothing new arrived for it this long",
    )
    # The review web app: `bonewatch serve`.
    web_host: str = Field("127.0.0.1", min_length=1, description="address `serve` binds")
    web_port: int = Field(8000, ge=0, le=65535, description="port `serve` binds; 0 = any")
    session_secret: str | None = Field(
        None,
        min_length=32,
        description="key that signs the web app's session cookies (the same in every replica); "
        "default: a random key kept in data_dir/session-key",
    )
    session_hours: float = Field(8.0, gt=0, le=720, description="how long a web login lasts")
    metrics_token: str | None = Field(
        None, min_length=16, description="bearer token that opens /metrics; unset = admins only"
    )
    web_trusted_proxies: str = Field(
        "",
        pattern=r"^[\w.:/*,\s-]*$",
        description="addresses of the TLS reverse proxy whose X-Forwarded-For/-Proto `serve` "
        "believes, comma-separated; empty = none",
    )
    web_secure_cookies: bool = Field(
        False, description="mark cookies Secure even on plain HTTP (a TLS proxy in front)"
    )
    login_attempts: int = Field(
        5, ge=1, le=1000, description="wrong passwords per account before its logins pause"
    )
    login_lockout_seconds: float = Field(
        900.0, gt=0, le=86400, description="how long that pause lasts"
    )

    _salt: str | None = PrivateAttr(None)

    @classmethod
    def resolve(cls, **options: Any) -> Settings:
        """The settings of this start-up: the environment, with the given options on top.

        Options that are None were not given. Both sources go through the same validation, so
        ``--batch-size 0`` is refused exactly as ``BONEWATCH_BATCH_SIZE=0`` is.

        Raises:
            pydantic.ValidationError: a value out of range or of the wrong type.
        """
        return cls(**{k: v for k, v in options.items() if v is not None})

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``, validated like any other value (no environment read)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @property
    def path_root_for_storage(self) -> Path | None:
        """The folder ledger paths are relative to, or None when they are stored whole."""
        if not self.store_relative_paths:
            return None
        root = self.path_root or self.inbox
        return root.absolute() if root is not None else None

    @property
    def path_filter(self) -> PathFilter:
        """The include/exclude globs, as ingest applies them to files and archive members."""
        from bonewatch.ingest.archives import PathFilter  # ingest loads pydicom: not at start-up

        return PathFilter.of(self.include, self.exclude)

    @property
    def umask_bits(self) -> int:
        return int(self.umask, 8)

    def resolved_cache_dir(self) -> Path:
        from bonewatch.models.choice import default_cache_dir

        return self.cache_dir or default_cache_dir()

    @property
    def resolved_heatmap_dir(self) -> Path:
        return self.heatmap_dir or self.data_dir / "heatmaps"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            # A bare postgresql:// URL would pick psycopg2, which is not installed.
            for prefix in ("postgresql://", "postgres://"):
                if self.database_url.startswith(prefix):
                    return "postgresql+psycopg://" + self.database_url[len(prefix) :]
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'bonewatch.sqlite').resolve()}"

    @property
    def distributed(self) -> bool:
        return bool(self.broker_url)

    @property
    def visibility_timeout(self) -> float:
        """Seconds Redis waits before handing an unacknowledged task to another worker: longer
        than the longest batch may take, which the lease bounds."""
        return self.lease_seconds + 60.0

    def salt(self) -> str:
        """The PatientID salt: from the key file, configured, or a random one created once in
        the data directory."""
        if self.phi_key_file is not None:
            if self._salt is None:
                self._salt = _key_from_file(self.phi_key_file)
            return self._salt
        if self.phi_salt:
            return self.phi_salt
        if self._salt is None:
            self._salt = _data_dir_salt(self.data_dir / "phi-salt")
        return self._salt


def _key_from_file(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise RuntimeError(f"cannot read BONEWATCH_PHI_KEY_FILE {path}: {exc.strerror}") from exc
    if not key:
        raise RuntimeError(f"BONEWATCH_PHI_KEY_FILE {path} is empty")
    return key


def _data_dir_salt(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: of two processes starting together, one creates the salt and both read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    for _ in range(50):
        value = path.read_text().strip()
        if value:
            return value
        time.sleep(0.01)  # the creator has not written it yet
    raise RuntimeError(f"{path} is empty; delete it or set BONEWATCH_PHI_SALT")


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``BONEWATCH_*`` variables that name no setting, each with the nearest real name (or
    None): a misspelled setting is otherwise silently ignored."""
    known = [name.upper() for name in Settings.model_fields]
    found = []
    for variable in sorted(environ):
        name = variable.removeprefix("BONEWATCH_")
        if variable.startswith("BONEWATCH_") and name not in known:
            nearest = get_close_matches(name, known, n=1, cutoff=0.7)
            found.append((variable, f"BONEWATCH_{nearest[0]}" if nearest else None))
    return found
