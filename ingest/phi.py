"""Patient identifiers leave ingest only as keyed hashes.

The hash is HMAC-SHA256 under the site's key. Without the key an identifier cannot be checked
against the hash; with it, a short identifier (a 7-digit MRN has 10^7 values) can be found by
trying them all, so the key is kept apart from the ledger (``BONEWATCH_PHI_KEY_FILE``).
"""

from __future__ import annotations

import hashlib
import hmac


def patient_hash(key: str, patient_id: str) -> str:
    """HMAC-SHA256 of a patient identifier under the site key, hex."""
    return hmac.new(key.encode("utf-8"), patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
