"""``bonewatch synth``: phantom studies drawn by ``models.phantoms`` and written by ``ingest``.

Output follows MURA's layout (``<split>/XR_<REGION>/patient<N>/study<M>_<label>/image<K>``) with
MURA's two CSV files, plus ``fractures.csv`` with each fracture's box in the written image's pixel
coordinates. Regions outside the seven parts (chest, knee, pelvis) are written as ``XR_CHEST`` …
so stage 1 learns to reject them. The same seed gives the same files.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonewatch.ingest import TRANSFER_SYNTAXES_WRITABLE, make_uid, write_dicom, write_png
from bonewatch.models.phantoms import OTHER_REGIONS, PARTS, draw_phantom

FORMATS = ("png", "dicom", "both")
_SLOTS = (*PARTS, "OTHER")  # one slot in eight draws a region stage 1 must reject


@dataclass
class SynthSummary:
    studies: int = 0
    images: int = 0
    fractures: int = 0
    by_region: dict[str, int] = field(default_factory=dict)


def _study_format(fmt: str, index: int) -> str:
    if fmt == "both":
        return "png" if index % 2 == 0 else "dicom"
    return fmt


def synthesize(
    out: Path,
    *,
    studies: int,
    fmt: str = "png",
    seed: int = 0,
    split: str = "train",
    size: int = 512,
    on_study: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write ``studies`` phantom studies under ``out`` and return what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out.mkdir(parents=True, exist_ok=True)
    prefix = Path(out.resolve().name) / split
    summary = SynthSummary()
    image_rows: list[str] = []
    study_rows: list[tuple[str, int]] = []
    fracture_rows: list[tuple[str, int, int, int, int]] = []
    studies_of_patient: dict[int, int] = {}
    for i in range(studies):
        rng = np.random.default_rng([seed, i])
        slot = _SLOTS[i % len(_SLOTS)]
        region = OTHER_REGIONS[int(rng.integers(len(OTHER_REGIONS)))] if slot == "OTHER" else slot
        positive = slot != "OTHER" and bool(rng.random() < 0.5)
        patient = 1 + seed * 100_000 + i // 2
        studies_of_patient[patient] = studies_of_patient.get(patient, 0) + 1
        study_dir = (
            Path(split)
            / f"XR_{region}"
            / f"patient{patient:05d}"
            / f"study{studies_of_patient[patient]}_{'positive' if positive else 'negative'}"
        )
        (out / study_dir).mkdir(parents=True, exist_ok=True)
        n_images = int(rng.integers(1, 4))
        fractured = [positive and rng.random() < 0.85 for _ in range(n_images)]
        if positive and not any(fractured):
            fractured[0] = True
        kind = _study_format(fmt, i)
        dicom: dict[str, Any] = {
            "photometric": "MONOCHROME1" if rng.random() < 0.5 else "MONOCHROME2",
            "bits_stored": int(rng.choice([8, 10, 12, 16])),
            "transfer_syntax": TRANSFER_SYNTAXES_WRITABLE[i % len(TRANSFER_SYNTAXES_WRITABLE)],
            "modality": "CR" if rng.random() < 0.5 else "DX",
            "body_part": region if rng.random() < 0.6 else ("EXTREMITY" if slot != "OTHER" else ""),
            "study_uid": make_uid("bonewatch-synth", str(seed), str(i), "study"),
            "series_uid": make_uid("bonewatch-synth", str(seed), str(i), "series"),
        }
        for k in range(n_images):
            phantom = draw_phantom(region, fractured=fractured[k], rng=rng, size=size)
            rel = study_dir / f"image{k + 1}.{'png' if kind == 'png' else 'dcm'}"
            if kind == "png":
                write_png(out / rel, phantom.pixels, bits=8)
            else:
                write_dicom(
                    out / rel,
                    phantom.pixels,
                    bits_stored=dicom["bits_stored"],
                    photometric=dicom["photometric"],
                    transfer_syntax=dicom["transfer_syntax"],
                    modality=dicom["modality"],
                    body_part=dicom["body_part"] or None,
                    view_position="PA" if k % 2 == 0 else "LL",
                    laterality=phantom.laterality,
                    patient_id=f"PHANTOM{patient:05d}",
                    patient_name=f"Phantom^{patient:05d}",
                    study_uid=dicom["study_uid"],
                    series_uid=dicom["series_uid"],
                    sop_uid=make_uid("bonewatch-synth", str(seed), str(i), "image", str(k)),
                    instance_number=k + 1,
                )
            image_rows.append((prefix / rel.relative_to(split)).as_posix())
            for box in phantom.fracture_boxes:
                fracture_rows.append((rel.as_posix(), *box))
            summary.images += 1
            summary.fractures += len(phantom.fracture_boxes)
        study_rows.append(((prefix / study_dir.relative_to(split)).as_posix() + "/", int(positive)))
        summary.studies += 1
        summary.by_region[region] = summary.by_region.get(region, 0) + 1
        if on_study is not None:
            on_study(1)
    with (out / f"{split}_image_paths.csv").open("w", newline="") as fh:
        fh.writelines(f"{row}\n" for row in image_rows)
    with (out / f"{split}_labeled_studies.csv").open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(study_rows)
    with (out / "fractures.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "x0", "y0", "x1", "y1"])
        writer.writerows(fracture_rows)
    return summary
