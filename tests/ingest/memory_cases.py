"""Files that cost little on disk and much in memory, and their peak resident size when read.

``python -m tests.ingest.memory_cases CASE FOLDER [--max-bytes N]`` writes the case's files into
FOLDER (in a child process, so building them does not count), then reads them in a fresh child
and prints one JSON line: the case, the outcome of each file and the child's peak RSS in MB.
The tests import :func:`measure`; run by hand, it gives the figures quoted in reviews.

Cases:
  deflated    a Deflated Explicit VR Little Endian DICOM holding a 400 MB private element
  png         a 10,000 x 10,000 px grey PNG of about 100 kB
  png_batch   sixteen of those, decoded as one claimed batch by ``decode_claimed``
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

SIDE = 10_000
PRIVATE_BYTES = 400_000_000
BATCH = 16
_ROOT = Path(__file__).resolve().parents[2]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def write_big_png(path: Path, side: int = SIDE, seed: int = 0) -> Path:
    """A side x side 8-bit grey PNG of black pixels, compressed as it is made: about 100 kB.

    ``seed`` goes into a text chunk, so the files of a batch are not duplicates of each other.
    """
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte, then the pixels
    parts = [compressor.compress(row * 100) for _ in range(side // 100)]
    parts.append(compressor.compress(row * (side % 100)))
    idat = b"".join(parts) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    text = _png_chunk(b"tEXt", b"seed\x00" + str(seed).encode())
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + text
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    return path


def write_deflated_dicom(path: Path, private_bytes: int = PRIVATE_BYTES) -> Path:
    """A small CR image, deflated, with a huge private OB element before its pixels."""
    import numpy as np
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from bonewatch.ingest import make_uid, write_dicom

    plain = path.with_suffix(".plain.dcm")
    write_dicom(
        plain,
        np.linspace(0, 1, 64 * 64).reshape(64, 64),
        study_uid=make_uid("mem", "study"),
        series_uid=make_uid("mem", "series"),
        sop_uid=make_uid("mem", "sop"),
    )
    ds = pydicom.dcmread(plain)
    plain.unlink()
    ds.private_block(0x0011, "bonewatch test", create=True).add_new(
        0x10, "OB", bytes(private_bytes)
    )
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def build(case: str, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    if case == "deflated":
        return [write_deflated_dicom(folder / "deflated.dcm")]
    if case == "png":
        return [write_big_png(folder / "big.png")]
    if case == "png_batch":
        return [write_big_png(folder / f"big{i}.png", seed=i) for i in range(BATCH)]
    raise SystemExit(f"unknown case {case!r}")


def _outcome(result: Any) -> str:
    from bonewatch.ingest import DecodedImage

    if isinstance(result, DecodedImage):
        return f"decoded {result.pixels.shape[0]}x{result.pixels.shape[1]} {result.pixels.dtype}"
    return f"{type(result).__name__}: {result}"


def read(case: str, folder: Path, max_bytes: int | None) -> dict[str, Any]:
    """Read the case's files as the worker would (header, then decode); report the peak RSS."""
    import inspect

    from bonewatch.ingest import IngestError, read_header, read_image

    limits: dict[str, Any] = {} if max_bytes is None else {"max_bytes": max_bytes}
    paths = sorted(p for p in folder.iterdir() if p.is_file())
    outcomes: list[str] = []
    if case == "png_batch":
        outcomes = _decode_batch(paths, limits)
    else:
        for path in paths:
            try:
                meta = read_header(path, salt="s", **limits)
                outcomes.append(f"header {meta.rows}x{meta.columns}")
                if "sha256" in inspect.signature(read_image).parameters:  # since the review
                    limits["sha256"] = meta.sha256
                outcomes.append(_outcome(read_image(path, salt="s", **limits)))
            except IngestError as exc:
                outcomes.append(_outcome(exc))
    return {"case": case, "outcomes": outcomes, "peak_rss_mb": round(_peak_kb() / 1024)}


def _peak_kb() -> int:
    """This process's resident high-water mark. VmHWM belongs to the address space, which exec
    replaces; ru_maxrss would also count the parent's pages that the fork briefly shared (a
    test runner that has loaded TensorFlow is over a gigabyte)."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _decode_batch(paths: list[Path], limits: dict[str, Any]) -> list[str]:
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from bonewatch.db import ClaimedImage
    from bonewatch.models.preprocess import PreprocessSpec
    from bonewatch.worker.pipeline import decode_claimed
    from bonewatch.worker.settings import Settings

    settings = Settings(phi_salt="s", max_file_bytes=limits.get("max_bytes", 2_000_000_000))
    claimed = [
        ClaimedImage(
            image_id=i,
            path=str(p),
            sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
            attempts=1,
            queue="bulk",
            study_uid=None,
            body_part_examined=None,
        )
        for i, p in enumerate(paths)
    ]
    with ThreadPoolExecutor(settings.decode_workers) as pool:
        batch = decode_claimed(claimed, settings, pool, specs=[PreprocessSpec(224)])
        held = sum(image.pixels.nbytes for _, image, _ in batch.images)
        outcomes = [_outcome(image) for _, image, _ in batch.images]
        outcomes += [f"{f.error_class}: {f.reason}" for f in batch.failures]
        outcomes += [f"transient: {reason}" for _, reason in batch.transient]
        outcomes.append(f"pixels held by the batch: {held / 1e6:.0f} MB")
    return outcomes


def measure(case: str, folder: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """Build the case in one child process and read it in another; the reader's report."""
    run = [sys.executable, "-m", "tests.ingest.memory_cases"]
    subprocess.run([*run, "--build", case, str(folder)], check=True, cwd=_ROOT, timeout=600)
    extra = [] if max_bytes is None else ["--max-bytes", str(max_bytes)]
    done = subprocess.run(
        [*run, case, str(folder), *extra],
        check=True,
        cwd=_ROOT,
        timeout=600,
        capture_output=True,
        text=True,
    )
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def main(argv: list[str]) -> None:
    if argv[0] == "--build":
        build(argv[1], Path(argv[2]))
        return
    case, folder = argv[0], Path(argv[1])
    max_bytes = int(argv[3]) if len(argv) > 3 and argv[2] == "--max-bytes" else None
    print(json.dumps(read(case, folder, max_bytes)))


if __name__ == "__main__":
    main(sys.argv[1:])
