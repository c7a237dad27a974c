"""The ingest error family: statuses, and reasons any ledger can store."""

from __future__ import annotations

import pytest

from bonewatch.ingest import (
    CorruptFileError,
    IngestError,
    NoPixelDataError,
    UnsupportedMultiFrameError,
)
from bonewatch.ingest.errors import printable


def test_reasons_quoting_damaged_values_become_storable_text() -> None:
    # A NUL (PostgreSQL text refuses it) and a lone surrogate (UTF-8 refuses it), as pydicom
    # may quote them from a damaged element, and a decoder message over two lines.
    error = CorruptFileError("bad value '1.2\x00\udcff':\n  plugin: failed")
    assert error.reason == "bad value '1.2\\x00\\udcff': plugin: failed"
    assert str(error) == error.reason
    error.reason.encode("utf-8")


@pytest.mark.parametrize("text", ["plain reason", "Röntgen 手 – ok", ""])
def test_printable_reasons_are_left_alone(text: str) -> None:
    assert printable(text) == text


def test_statuses_and_error_classes() -> None:
    assert CorruptFileError("x").status == "failed"
    assert NoPixelDataError("x").status == "unsupported"
    frames = UnsupportedMultiFrameError.for_frames(12)
    assert isinstance(frames, IngestError) and frames.status == "unsupported"
    assert frames.error_class == "UnsupportedMultiFrameError"
    assert frames.reason.startswith("multi-frame object with 12 frames;")
