"""Mutated DICOM and PNG bytes: the readers return an image or an IngestError, nothing else."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import (
    TRANSFER_SYNTAXES_WRITABLE,
    DecodedImage,
    IngestError,
    read_header,
    read_image,
    write_dicom,
    write_png,
)


def _seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pixels = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for i, syntax in enumerate(TRANSFER_SYNTAXES_WRITABLE):
            path = Path(tmp) / f"{i}.dcm"
            write_dicom(
                path,
                pixels,
                transfer_syntax=syntax,
                photometric="MONOCHROME1",
                study_uid="1.2.3",
                series_uid="1.2.3.4",
                sop_uid=f"1.2.3.4.{i}",
                patient_id="P1",
                patient_name="Doe^Jane",
                body_part="HAND",
            )
            out[syntax] = path.read_bytes()
        png = Path(tmp) / "a.png"
        write_png(png, pixels)
        out["png"] = png.read_bytes()
    return out


SEEDS = _seeds()

# Damaged files make pydicom warn about every odd value it meets; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return kind, bytes(data)


def _read_all(tmp: Path, kind: str, data: bytes) -> None:
    path = tmp / ("x.png" if kind == "png" else "x.dcm")
    path.write_bytes(data)
    for reader in (read_header, read_image):
        try:
            result = reader(path, salt="fuzz")
        except IngestError as exc:
            assert exc.reason and exc.status in {"failed", "unsupported"}
            continue
        if reader is read_image:
            assert isinstance(result, DecodedImage)
            assert result.pixels.dtype == np.float32 and result.pixels.ndim == 2
            assert np.isfinite(result.pixels).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_files_give_an_image_or_an_ingest_error(tmp_path_factory, case) -> None:
    _read_all(tmp_path_factory.mktemp("fuzz"), *case)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_files_long_run(tmp_path_factory, case) -> None:
    _read_all(tmp_path_factory.mktemp("fuzz"), *case)
