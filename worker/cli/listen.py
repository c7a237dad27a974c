"""The DICOM network: ``listen`` (Storage SCP) and ``echo`` (a C-ECHO check)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated

import typer

from bonewatch.worker.cli._common import (
    BundleOpt,
    err,
    fail,
    out,
    settings_from,
    start_live_service,
)

_AE_TITLE = re.compile(r"(?! *$)[\x20-\x5b\x5d-\x7e]{1,16}")
_TARGET = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@\[\]]+):(?P<port>\d{1,5})")


def _check_ae_title(value: str | None, option: str) -> None:
    if value is not None and not _AE_TITLE.fullmatch(value):
        fail(f"{option} {value!r}: an AE title is 1 to 16 characters, no backslash")


def listen(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (BONEWATCH_DICOM_HOST).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port to bind (BONEWATCH_DICOM_PORT)."),
    ] = None,
    ae_title: Annotated[
        str | None, typer.Option(help="Called AE title (BONEWATCH_DICOM_AE_TITLE).")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="TLS certificate (PEM).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="TLS private key (PEM).")
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="CA of client certificates (PEM)."),
    ] = None,
    process: Annotated[
        bool,
        typer.Option(
            "--process/--no-process", help="Embedded mode: run the models on what arrives."
        ),
    ] = True,
    bundle: BundleOpt = None,
) -> None:
    """Receive studies over DICOM until Ctrl-C or SIGTERM.

    A Storage SCP for every storage SOP class and transfer syntax, answering C-ECHO too.
    Each instance is written to DATA_DIR/received/ and registered on the `live` queue before
    the sender hears Success. Callers must use the called AE title, and be listed in
    BONEWATCH_DICOM_PEERS (empty: callers on loopback only).
    """
    from bonewatch.ingest.listener import ListenerError, TLSFiles
    from bonewatch.worker.listen import listen as run_listener

    _check_ae_title(ae_title, "--ae-title")
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together")
    if tls_ca is not None and tls_cert is None:
        fail("--tls-ca needs --tls-cert and --tls-key")
    tls = TLSFiles(tls_cert, tls_key, tls_ca) if tls_cert and tls_key else None
    settings = settings_from(
        dicom_host=host, dicom_port=port, dicom_ae_title=ae_title, bundle=bundle
    )
    stop, enqueue = start_live_service(settings, serve_here=process)
    try:
        summary = run_listener(
            settings,
            stop=stop,
            tls=tls,
            process=process,
            enqueue=enqueue,
            on_event=lambda m: err.print(m, highlight=False),
        )
    except ListenerError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        err.print("stopped")
        return
    err.print(f"stopped: {summary.stored} instance(s) received, {summary.refused} refused")


def echo(
    target: Annotated[str, typer.Argument(help="The peer, as AET@HOST:PORT.")],
    calling_ae: Annotated[
        str | None, typer.Option(help="This side's AE title [default: BONEWATCH].")
    ] = None,
    timeout: Annotated[float, typer.Option(min=0.1, max=600, help="Seconds to wait.")] = 10.0,
    tls: Annotated[bool, typer.Option("--tls", help="Use TLS.")] = False,
    tls_ca: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="CA of the peer's certificate (PEM)."),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Client certificate (PEM).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Client key (PEM).")
    ] = None,
) -> None:
    """Check a DICOM connection with a C-ECHO.

    Prints the result and the round trip.
    """
    from bonewatch.ingest.listener import ListenerError, client_tls_context
    from bonewatch.ingest.listener import echo as send_echo

    match = _TARGET.fullmatch(target)
    if match is None or not 0 < int(match["port"]) < 65536:
        fail(f"{target!r} is not AET@HOST:PORT (e.g. ORTHANC@pacs.example.org:4242)")
    called, host, port = match["aet"], match["host"].strip("[]"), int(match["port"])
    _check_ae_title(called, "AET")
    _check_ae_title(calling_ae, "--calling-ae")
    context = None
    if tls or tls_ca or tls_cert:
        try:
            context = client_tls_context(tls_ca, tls_cert, tls_key)
        except ListenerError as exc:
            fail(str(exc))
    if logging.getLogger().level > logging.INFO:
        # pynetdicom logs a rejection as three ERROR lines; the one line below says it all
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    result = send_echo(
        host, port, called, calling_ae=calling_ae or "BONEWATCH", timeout=timeout,
        ssl_context=context,
    )  # fmt: skip
    if result.ok:
        rtt = f"{result.seconds * 1000:.1f} ms"
        out.print(f"C-ECHO {target}: Success, round trip {rtt}", highlight=False)
        return
    fail(f"C-ECHO {target}: {result.detail or f'status 0x{result.status:04X}'}", code=1)
