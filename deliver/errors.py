"""The delivery errors: a destination that refused or could not be reached."""

from __future__ import annotations


class DeliveryError(Exception):
    """Sending an object failed; the outbox retries it with backoff."""
