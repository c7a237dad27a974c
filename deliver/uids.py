"""Deterministic UIDs: the same study, bundle version and object always get the same UIDs, so
a re-send replaces the object in the PACS, and a new bundle version makes new objects."""

from __future__ import annotations

import uuid
from typing import NamedTuple

KINDS: tuple[str, ...] = ("sr", "sc")


class ObjectUIDs(NamedTuple):
    series_uid: str
    sop_instance_uid: str


def object_uids(
    study_uid: str,
    bundle_name: str,
    bundle_version: str,
    kind: str,
    source_sop_instance_uid: str | None = None,
) -> ObjectUIDs:
    """The series and instance UIDs of one result object, hashed from the values.

    A Secondary Capture also hashes its source SOP instance; all the SCs of a study and bundle
    version share one series, as do its SRs."""
    if kind not in KINDS:
        raise ValueError(f"unknown object kind {kind!r}; one of {', '.join(KINDS)}")
    if (kind == "sc") != (source_sop_instance_uid is not None):
        raise ValueError("a Secondary Capture, and only one, names its source SOP instance")
    base = ["bonewatch", study_uid, bundle_name, bundle_version, kind]
    return ObjectUIDs(
        _uid([*base, "series"]), _uid([*base, "instance", source_sop_instance_uid or ""])
    )


def _uid(parts: list[str]) -> str:
    """A ``2.25.`` UID (Part 5 §B.2) from a name-based UUID (RFC 9562 version 5) of ``parts``."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(0).join(parts)).int}"


def device_uid(bundle_name: str, bundle_version: str) -> str:
    """The device observer UID of a bundle version in the reports it makes."""
    return _uid(["bonewatch", bundle_name, bundle_version, "device"])
