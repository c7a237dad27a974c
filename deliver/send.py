"""Sending result objects: C-STORE (pynetdicom) and STOW-RS (dicomweb-client).

One call sends a batch over one association (or one STOW request) and says, per SOP instance,
whether it was stored: None when it was, else the reason. Retrying is the outbox's business.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from bonewatch.deliver.errors import DeliveryError

log = logging.getLogger(__name__)

_DESTINATION = re.compile(
    r"^(?P<aet>[^@\s]{1,16})@(?P<host>[^:\s]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$"
)


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that stores what it is sent: ``AET@host:port``, or a DICOMweb base URL."""

    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str | None = None

    def __str__(self) -> str:
        return self.url if self.url else f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@host:port`` or an ``http(s)://`` STOW-RS base URL.

        Raises:
            ValueError: neither.
        """
        text = text.strip()
        if text.startswith(("http://", "https://")):
            return cls(url=text.rstrip("/"))
        match = _DESTINATION.match(text)
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"{text!r} is not AET@host:port")
        return cls(match["aet"], match["host"].strip("[]"), int(match["port"]))


def parse_destinations(text: str) -> tuple[Destination, ...]:
    """``AET@host:port[,...]`` (empty for none)."""
    return tuple(Destination.parse(part) for part in text.split(",") if part.strip())


def send_dimse(
    datasets: Sequence[Dataset],
    destination: Destination,
    *,
    calling_ae: str,
    timeout: float = 30.0,
) -> dict[str, str | None]:
    """C-STORE each dataset over one association.

    Raises:
        DeliveryError: no association (refused, rejected, unreachable): nothing was sent.
    """
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"no association with {destination} (refused, rejected or unreachable)")
    outcome: dict[str, str | None] = {}
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if not assoc.is_established:
                outcome[uid] = "association lost"
                continue
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                outcome[uid] = "no response (timeout or aborted association)"
            elif code in (0x0000, 0xB000, 0xB007, 0xB006):
                outcome[uid] = None
            else:
                outcome[uid] = f"C-STORE status 0x{code:04X}"
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


def send_dicomweb(
    datasets: Sequence[Dataset], destination: Destination, *, timeout: float = 30.0
) -> dict[str, str | None]:
    """STOW-RS the datasets in one request to ``destination.url``.

    Raises:
        DeliveryError: the request failed (unreachable, HTTP error): nothing counted as stored.
    """
    from dicomweb_client.api import DICOMwebClient

    if not destination.url:
        raise ValueError(f"{destination} is not a DICOMweb URL")
    client = DICOMwebClient(url=destination.url, timeout=timeout)
    client.set_http_retry_params(retry=False)  # retrying is the outbox's business
    try:
        response = client.store_instances(list(datasets))
    except Exception as exc:  # requests' and dicomweb-client's errors alike
        raise DeliveryError(f"STOW-RS to {destination} failed: {exc}") from exc
    failed = {
        str(item.ReferencedSOPInstanceUID): f"STOW-RS failure reason {item.get('FailureReason')}"
        for item in response.get("FailedSOPSequence", [])
    }
    return {str(ds.SOPInstanceUID): failed.get(str(ds.SOPInstanceUID)) for ds in datasets}
