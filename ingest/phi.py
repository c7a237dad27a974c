"""Patient identifiers leave ingest only as salted hashes."""

from __future__ import annotations

import hashlib


def patient_hash(salt: str, patient_id: str) -> str:
    """sha256 of the site salt and a patient identifier, hex; the identifier is not recoverable
    without the salt."""
    return hashlib.sha256((salt + patient_id).encode("utf-8")).hexdigest()
