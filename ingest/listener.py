"""The DICOM listener: a Storage SCP that writes what modalities and PACS send as Part 10 files.

It answers C-ECHO and C-STORE for every storage SOP class in every transfer syntax as sent (no
transcoding). For each instance, before the response says Success:

1. the bytes the peer sent are written, with their file meta, under a temporary name in
   ``received/.incoming/`` (same file system as the destination), and flushed to disk;
2. the file is renamed to ``received/<StudyInstanceUID>/<SOPInstanceUID>.dcm``;
3. the ``register`` callback is called with it (the worker registers it in the ledger).

Anything failing answers a failure status, so the sender keeps the instance and retries. This
module never talks to the ledger or the queue. Besides ``ingest.dicom``, it is the one module
that uses pydicom (through pynetdicom, and to read a received header's Study Instance UID).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from bonewatch.ingest.peers import PeerPolicy, resolve_policy

log = logging.getLogger(__name__)

# C-STORE response statuses (PS3.4 B.2.3, PS3.7 C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # the disk is (nearly) full: the sender retries later
PROCESSING_FAILURE = 0x0110  # written but not registered (ledger unavailable), or a write fault
CANNOT_UNDERSTAND = 0xC000  # a UID that is not digits and dots, a header that cannot be read

# PS3.5 9.1: UID components are digits separated by dots, 64 characters at most.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_MAX = 64
# Largest PDU this listener offers to receive (PS3.8 D.1); big PDUs mean fewer per instance.
MAX_PDU = 1 << 20
# A PDU larger than this is cut off (the association drops) instead of being read into memory:
# what we offered, plus room for an association request with every presentation context.
PDU_READ_LIMIT = MAX_PDU + (1 << 16)
INCOMING = ".incoming"
# Names tried beside a taken <SOPInstanceUID>.dcm whose bytes differ (a re-send, changed).
MAX_VARIANTS = 100
FREE_SPACE_LOG_SECONDS = 30.0


class ListenerError(Exception):
    """The listener cannot start: a bad peer list, TLS files that cannot be loaded, a port."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for DICOM's TLS secure transport profile. With ``ca``, callers must present a
    certificate it signed."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class ListenerConfig:
    """Everything the listener needs, as plain values (the worker builds it from settings)."""

    received_dir: Path
    host: str = "0.0.0.0"
    port: int = 11112
    ae_title: str = "BONEWATCH"
    peers: str = ""
    max_associations: int = 10
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    min_free_bytes: int = 2048 << 20
    tls: TLSFiles | None = None


@dataclass(frozen=True)
class Received:
    """One instance on disk, handed to the registration callback."""

    path: Path
    study_uid: str
    sop_instance_uid: str
    calling_ae: str
    address: str
    new_file: bool  # False when the same bytes were already at this path (a re-send)


Register = Callable[[Received], None]


class RefusedInstance(Exception):
    """An instance answered with a failure status; ``status`` is the one sent back."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class _Counters:
    stored: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a DICOM UID: digits and dots, at most 64 characters."""
    return len(value) <= _UID_MAX and _UID.fullmatch(value) is not None


def server_tls_context(files: TLSFiles) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later); with a CA, client certificates required.

    Raises:
        ListenerError: a file that cannot be read or does not hold what it should.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(files.cert), str(files.key))
        if files.ca is not None:
            context.load_verify_locations(cafile=str(files.ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ListenerError(f"cannot load the TLS files: {exc}") from exc
    return context


def client_tls_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A client-side TLS context: the server checked against ``ca`` (or the system's roots),
    and this side's certificate presented when given."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # DICOM peers are configured by address and AE title
    try:
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise ListenerError(f"cannot load the TLS files: {exc}") from exc
    return context


class _BoundedHandler(RequestHandler):
    """pynetdicom's request handler, with a cap on the size of one PDU it will read.

    A PDU header declares its length in four bytes; without the cap a peer could make the
    listener buffer up to 4 GiB for one PDU. Past the cap the read fails like a dropped
    connection, and that association ends.
    """

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert sock is not None  # set by the parent class
        read = sock.recv

        def bounded_recv(nr_bytes: int) -> bytearray:
            if nr_bytes > PDU_READ_LIMIT:
                raise OSError(f"the peer announced a PDU of {nr_bytes} bytes")
            return read(nr_bytes)

        sock.recv = bounded_recv  # type: ignore[method-assign]
        return assoc


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, with a time limit on every connection's socket and the
    TLS handshake done on the connection's own thread (never on the accepting one, which a
    slow or silent client would otherwise hold up for everyone)."""

    io_timeout: float = 60.0

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.settimeout(self.io_timeout)
        # Small writes (a C-STORE response) go out at once, not after the peer's delayed ACK.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS handshake with %s failed: %s", _host(client_address), exc)
                self.shutdown_request(request)
                return
        super().finish_request(request, client_address)


def _host(address: Any) -> str:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


class StorageListener:
    """The Storage SCP. ``start()`` binds and serves on background threads; ``stop()`` ends it.

    Args:
        config: Where to listen, who may send, where files go, the disk threshold, TLS.
        register: Called with each instance once it is on disk; raising makes the response a
            failure (``RefusedInstance`` for a chosen status, anything else 0x0110).
    """

    def __init__(self, config: ListenerConfig, register: Register) -> None:
        self.config = config
        self.register = register
        try:
            self.policy: PeerPolicy = resolve_policy(config.peers)
        except ValueError as exc:
            raise ListenerError(f"BONEWATCH_DICOM_PEERS: {exc}") from exc
        self.ssl_context = server_tls_context(config.tls) if config.tls else None
        self.incoming = config.received_dir / INCOMING
        self.counters = _Counters()
        self._place_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._last_space_log = 0.0
        self._space_refusals = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) bound; the port is the real one when 0 was asked for."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> StorageListener:
        """Bind and serve on background threads.

        Raises:
            ListenerError: the address cannot be bound.
        """
        self.incoming.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_parts(self.incoming)
        if removed:
            log.info("removed %d partial file(s) left by an earlier run", removed)
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = MAX_PDU
        ae.network_timeout = self.config.network_timeout
        ae.acse_timeout = self.config.acse_timeout
        ae.dimse_timeout = self.config.dimse_timeout
        ae.add_supported_context(Verification)
        syntaxes = list(AllTransferSyntaxes)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), syntaxes)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        try:
            server = cast(_Server, ae.make_server(
                (self.config.host, self.config.port),
                ssl_context=self.ssl_context,
                evt_handlers=handlers,
                server_class=_Server,
                request_handler=_BoundedHandler,
            ))  # fmt: skip
        except OSError as exc:
            raise ListenerError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
            ) from exc
        server.io_timeout = self.config.network_timeout
        ae._servers.append(server)  # where pynetdicom's own start_server keeps it
        self._ae = ae
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="bonewatch-scp"
        )
        self._thread.daemon = True
        self._thread.start()
        host, port = self.address
        log.info(
            "listening on %s:%d as %s%s; accepting %s",
            host,
            port,
            self.config.ae_title,
            " over TLS" if self.ssl_context else "",
            self.policy.describe(),
        )
        return self

    def stop(self) -> None:
        """Stop accepting, abort associations still open, and wait for the server thread."""
        if self._server is None:
            return
        self._ae.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> StorageListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ association checks

    def _on_requested(self, event: Any) -> None:
        """Refuse, before negotiation, a wrong called AE title, a caller not on the list, or
        one association too many; each refusal is logged with who asked."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        address = str(assoc.requestor.address)
        who = f"{calling}@{address}"
        if called != self.config.ae_title.strip():
            log.warning(
                "rejected association from %s: called AE title %r not recognised (this "
                "listener is %r)",
                who,
                called,
                self.config.ae_title,
            )
            _reject(assoc, 0x01, 0x01, 0x07)
            return
        if not self.policy.allows(calling, address):
            if self.policy.peers == ():
                hint = f"to allow it, set BONEWATCH_DICOM_PEERS={calling}@{address}"
            else:
                hint = f"to allow it, add {calling}@{address} to BONEWATCH_DICOM_PEERS"
            log.warning(
                "rejected association from %s: not an allowed peer (%s); %s",
                who,
                self.policy.describe(),
                hint,
            )
            _reject(assoc, 0x01, 0x01, 0x03)
            return
        active = [a for a in assoc.ae.active_associations if a.is_acceptor]
        if len(active) > self.config.max_associations:
            log.warning(
                "rejected association from %s: %d associations open already "
                "(BONEWATCH_DICOM_MAX_ASSOCIATIONS=%d)",
                who,
                len(active) - 1,
                self.config.max_associations,
            )
            _reject(assoc, 0x02, 0x03, 0x02)
            return
        log.info("association from %s accepted", who)

    def _on_aborted(self, event: Any) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "association with %s@%s aborted; instances it had acknowledged are kept",
            str(requestor.ae_title).strip(),
            requestor.address,
        )

    # ------------------------------------------------------------------ C-STORE

    def _on_store(self, event: Any) -> int:
        """Write, flush, rename, register; the status says whether all of it happened."""
        requestor = event.assoc.requestor
        calling, address = str(requestor.ae_title).strip(), str(requestor.address)
        sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        try:
            received = self.store(event, calling_ae=calling, address=address)
            self.register(received)
        except RefusedInstance as exc:
            self._count(refused=1)
            if exc.status != OUT_OF_RESOURCES:
                log.warning(
                    "refused instance %s from %s@%s: %s",
                    _printable(sop_uid),
                    calling,
                    address,
                    exc.reason,
                )
            return exc.status
        except Exception as exc:  # the ledger is down, a bug: the sender must retry
            self._count(refused=1)
            log.error(
                "instance %s from %s@%s not acknowledged: %s: %s",
                _printable(sop_uid),
                calling,
                address,
                type(exc).__name__,
                exc,
            )
            return PROCESSING_FAILURE
        self._count(stored=1)
        log.debug("stored %s from %s@%s", received.path, calling, address)
        return SUCCESS

    def _count(self, *, stored: int = 0, refused: int = 0) -> None:
        with self.counters.lock:
            self.counters.stored += stored
            self.counters.refused += refused

    def store(self, event: Any, *, calling_ae: str, address: str) -> Received:
        """Put one C-STORE request's dataset on disk at its final name.

        Raises:
            RefusedInstance: a bad UID, too little free space, an unreadable header, a write
                fault.
        """
        sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        if not is_valid_uid(sop_uid):
            raise RefusedInstance(
                CANNOT_UNDERSTAND, f"SOP Instance UID {_printable(sop_uid)} is not a UID"
            )
        meta = event.file_meta
        if calling_ae:
            meta.SourceApplicationEntityTitle = calling_ae
        head = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
        with _dataset_bytes(event) as body:
            self._check_free_space(len(head) + len(body))
            part = self.incoming / f"{os.getpid()}-{uuid.uuid4().hex}.part"
            try:
                _write_durably(part, head, body)
            except OSError as exc:
                _unlink_quietly(part)
                status = OUT_OF_RESOURCES if _is_disk_full(exc) else PROCESSING_FAILURE
                raise RefusedInstance(status, f"cannot write the instance: {exc}") from exc
        try:
            study_uid = _study_uid(part)
            if not is_valid_uid(study_uid):
                raise RefusedInstance(
                    CANNOT_UNDERSTAND, f"Study Instance UID {_printable(study_uid)} is not a UID"
                )
            path, new_file = self._place(part, study_uid, sop_uid)
        except BaseException:
            _unlink_quietly(part)
            raise
        return Received(path, study_uid, sop_uid, calling_ae, address, new_file)

    def _check_free_space(self, size: int) -> None:
        try:
            stat = os.statvfs(self.config.received_dir)
        except OSError as exc:
            raise RefusedInstance(PROCESSING_FAILURE, f"cannot check free space: {exc}") from exc
        free = stat.f_bavail * stat.f_frsize
        if free - size >= self.config.min_free_bytes:
            return
        self._space_refusals += 1
        now = time.monotonic()
        if now - self._last_space_log >= FREE_SPACE_LOG_SECONDS:
            log.error(
                "refusing instances with Out of Resources (0xA700): %d MB free on %s, "
                "BONEWATCH_MIN_FREE_MB keeps %d MB (%d refused since the last line)",
                free >> 20,
                self.config.received_dir,
                self.config.min_free_bytes >> 20,
                self._space_refusals,
            )
            self._last_space_log = now
            self._space_refusals = 0
        raise RefusedInstance(OUT_OF_RESOURCES, "too little free disk space")

    def _place(self, part: Path, study_uid: str, sop_uid: str) -> tuple[Path, bool]:
        """Rename ``part`` to its final name, durably; the same bytes already there are kept
        (returns new_file False), different bytes get ``<SOP>.<n>.dcm`` beside them."""
        folder = self.config.received_dir / study_uid
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
        target = folder / f"{sop_uid}.dcm"
        with self._place_lock:
            for variant in range(1, MAX_VARIANTS + 1):
                if not target.exists():
                    os.rename(part, target)
                    _fsync_dir(folder)
                    return target, True
                if _same_bytes(part, target):
                    part.unlink()
                    return target, False
                target = folder / f"{sop_uid}.{variant}.dcm"
        raise RefusedInstance(
            PROCESSING_FAILURE, f"{MAX_VARIANTS} different copies of {sop_uid} already"
        )


def _reject(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    """Send A-ASSOCIATE-RJ from an EVT_REQUESTED handler (pynetdicom then skips negotiation)."""
    assoc.acse.send_reject(result, source, diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


@contextlib.contextmanager
def _dataset_bytes(event: Any) -> Iterator[memoryview | bytes]:
    """The encoded dataset exactly as the peer sent it, without copying or decoding it."""
    stream = event.request.DataSet
    if isinstance(stream, BytesIO):
        with stream.getbuffer() as view:
            yield view
    else:  # not expected from pynetdicom; its own accessor copies, but works
        yield event.encoded_dataset(include_meta=False)


def _write_durably(path: Path, head: bytes, body: memoryview | bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        for chunk in (head, body):
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _study_uid(path: Path) -> str:
    """The Study Instance UID of a received file, read from its header only."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        return str(ds.get("StudyInstanceUID") or "").strip()
    except Exception as exc:  # noqa: BLE001 - any parse failure: the sender learns it
        raise RefusedInstance(
            CANNOT_UNDERSTAND, f"the dataset cannot be read: {type(exc).__name__}: {exc}"
        ) from exc


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return _sha256(a) == _sha256(b)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_disk_full(exc: OSError) -> bool:
    import errno

    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _printable(value: str) -> str:
    return repr(value[:80])


def remove_stale_parts(incoming: Path) -> int:
    """Delete partial files of listener processes that no longer run; returns how many."""
    removed = 0
    for part in incoming.glob("*.part"):
        pid = part.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        _unlink_quietly(part)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class EchoResult:
    """What a C-ECHO came to: the status (None when no association), the round trip, why."""

    ok: bool
    status: int | None
    seconds: float
    detail: str


def echo(
    host: str,
    port: int,
    called_ae: str,
    *,
    calling_ae: str = "BONEWATCH",
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> EchoResult:
    """Send one C-ECHO (Verification) to ``called_ae`` at ``host:port`` and time it."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    started = time.perf_counter()
    tls_args = (ssl_context, host) if ssl_context is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        seconds = time.perf_counter() - started
        if assoc.is_rejected:
            detail = _rejection(assoc)
        else:
            detail = _unreachable(host, port, timeout) or "the peer aborted the association"
        return EchoResult(False, None, seconds, detail)
    try:
        started = time.perf_counter()
        status = assoc.send_c_echo()
        seconds = time.perf_counter() - started
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code is None:
        return EchoResult(False, None, seconds, "no response to the C-ECHO")
    return EchoResult(code == SUCCESS, code, seconds, "Success" if code == SUCCESS else "")


def _unreachable(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to the peer fails, or None when one can be made."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no association: no answer from {host}:{port} within {timeout:g} s"
    except OSError as exc:
        return f"no association: {exc.strerror or exc}"


_REJECT_REASONS: dict[tuple[Any, Any], str] = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "too many associations",
}


def _rejection(assoc: Any) -> str:
    primitive = assoc.acceptor.primitive
    source = getattr(primitive, "result_source", None)
    diagnostic = getattr(primitive, "diagnostic", None)
    reason = _REJECT_REASONS.get((source, diagnostic), "rejected")
    return f"rejected: {reason}"
