"""Tests for ingest/watcher.py: real folders, real watchdog observers, bounded waits."""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bonewatch.ingest.watcher import InboxWatcher, is_candidate_name, iter_candidate_files

SETTLE = 0.3  # short settle period: the tests wait on it many times
WAIT = 10.0  # upper bound for anything that should happen within a second or two


def write(path: Path, data: bytes = b"DICM-ish payload") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def collect(
    watcher: InboxWatcher,
    *,
    until: Callable[[list[Path]], bool],
    timeout: float = WAIT,
) -> list[Path]:
    """Call ready() until ``until(all_returned)`` holds or ``timeout`` passes."""
    returned: list[Path] = []
    deadline = time.monotonic() + timeout
    while not until(returned) and time.monotonic() < deadline:
        returned += watcher.ready(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
    return returned


def drain_for(watcher: InboxWatcher, seconds: float) -> list[Path]:
    """Everything ready() returns over ``seconds``."""
    return collect(watcher, until=lambda _: False, timeout=seconds)


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["image1.dcm", "IM000001", "scan.png", "x.DCM", "study~1.dcm", "part.dcm", "tmp.dcm"],
)
def test_is_candidate_name_accepts_ordinary_names(name: str) -> None:
    assert is_candidate_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".hidden.dcm",
        ".DS_Store",
        "x.tmp",
        "x.dcm.part",
        "x.PARTIAL",
        "x.crdownload",
        "x.swp",
        "x.filepart",
        "x.download",
        "x.dcm~",
        "~$report.docx",
    ],
)
def test_is_candidate_name_rejects_hidden_and_temporary_names(name: str) -> None:
    assert not is_candidate_name(name)


# --- iter_candidate_files ------------------------------------------------------------------------


def test_iter_candidate_files_walks_sorted_and_skips_unwanted(tmp_path: Path) -> None:
    root = tmp_path / "inbox"
    keep = [
        write(root / "a.dcm"),
        write(root / "b" / "c.png"),
        write(root / "b" / "d" / "e"),  # no suffix: sniffing decides later
        write(root / "sub" / "done" / "kept.dcm"),  # done/ is special only directly under root
        write(root / "z.dcm"),
    ]
    for skipped in [
        ".hidden.dcm",
        ".git/objects/x.dcm",
        "b/.cache/y.dcm",
        "b/x.dcm.part",
        "b/x.tmp",
        "x.dcm~",
        "~$lock",
        "done/old.dcm",
        "failed/bad.dcm",
    ]:
        write(root / skipped)

    assert list(iter_candidate_files([root])) == keep


def test_iter_candidate_files_is_lazy(tmp_path: Path) -> None:
    root = tmp_path / "inbox"
    first = write(root / "a" / "1.dcm")
    (root / "z").mkdir()

    files = iter_candidate_files([root])
    assert inspect.isgenerator(files)
    assert next(files) == first
    # z/ has not been listed yet, so a file created in it now must still be found.
    late = write(root / "z" / "late.dcm")
    assert list(files) == [late]


def test_iter_candidate_files_yields_explicit_files_as_given(tmp_path: Path) -> None:
    odd = write(tmp_path / "upload.bin")
    temp_named = write(tmp_path / "named.part")
    folder = tmp_path / "f"
    inner = write(folder / "i.dcm")
    missing = tmp_path / "missing.dcm"

    got = list(iter_candidate_files([odd, str(temp_named), missing, folder]))

    assert got == [odd, temp_named, inner]


def test_iter_candidate_files_walks_a_folder_named_like_a_file(tmp_path: Path) -> None:
    inner = write(tmp_path / "x.dcm" / "image1.dcm")

    assert list(iter_candidate_files([tmp_path])) == [inner]


def test_iter_candidate_files_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    target_file = write(outside / "secret.dcm")
    write(outside / "tree" / "deep.dcm")
    root = tmp_path / "inbox"
    real = write(root / "real.dcm")
    (root / "in_link.dcm").symlink_to(real)
    (root / "out_link.dcm").symlink_to(target_file)
    (root / "out_dir").symlink_to(outside / "tree", target_is_directory=True)
    (root / "broken.dcm").symlink_to(tmp_path / "nowhere.dcm")

    assert list(iter_candidate_files([root])) == [root / "in_link.dcm", real]
    assert list(iter_candidate_files([root], follow_symlinks=True)) == [
        root / "in_link.dcm",
        root / "out_dir" / "deep.dcm",
        root / "out_link.dcm",
        real,
    ]


def test_iter_candidate_files_survives_a_symlink_loop(tmp_path: Path) -> None:
    root = tmp_path / "inbox"
    image = write(root / "a" / "x.dcm")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)

    assert list(iter_candidate_files([root], follow_symlinks=True)) == [image]


# --- InboxWatcher --------------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["events", "polling"])
def poll(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def make_watcher(
    root: Path, poll: bool = False, *, settle: float = SETTLE, follow_symlinks: bool = False
) -> InboxWatcher:
    return InboxWatcher(
        root,
        poll=poll,
        poll_interval=0.1,
        settle_seconds=settle,
        follow_symlinks=follow_symlinks,
    )


def test_watcher_start_up_scan_finds_existing_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.dcm")
    b = write(tmp_path / "deep" / "b.png")
    write(tmp_path / ".hidden.dcm")
    write(tmp_path / "done" / "old.dcm")

    with make_watcher(tmp_path) as watcher:
        got = collect(watcher, until=lambda r: len(r) >= 2)
        got += drain_for(watcher, 2 * SETTLE)

    assert sorted(got) == [a, b]


def test_watcher_returns_new_files(tmp_path: Path, poll: bool) -> None:
    with make_watcher(tmp_path, poll) as watcher:
        assert watcher.polling is poll
        assert watcher.ready(timeout=0.2) == []
        new = write(tmp_path / "sub" / "new.dcm")
        got = collect(watcher, until=bool)
        got += drain_for(watcher, 2 * SETTLE)

    assert got == [new]


def test_watcher_holds_back_a_file_until_its_last_write(tmp_path: Path, poll: bool) -> None:
    target = tmp_path / "slow.dcm"
    chunk = b"\0" * 4096
    chunks = 10
    finished = threading.Event()

    def slow_writer() -> None:
        with open(target, "wb") as out:
            for _ in range(chunks):
                out.write(chunk)
                out.flush()
                time.sleep(0.25)  # under the settle period: the file never looks finished
        finished.set()

    with make_watcher(tmp_path, poll, settle=0.5) as watcher:
        writer = threading.Thread(target=slow_writer)
        writer.start()
        try:
            got = collect(watcher, until=bool, timeout=WAIT)
            size_at_return = target.stat().st_size
            writer_done_at_return = finished.is_set()
            got += drain_for(watcher, 1.5)
        finally:
            writer.join(timeout=WAIT)

    assert got == [target]
    assert writer_done_at_return
    assert size_at_return == chunks * len(chunk)


def test_watcher_takes_a_renamed_part_file_once_under_its_final_name(
    tmp_path: Path, poll: bool
) -> None:
    with make_watcher(tmp_path, poll) as watcher:
        part = write(tmp_path / "x.part", b"first half")
        with open(part, "ab") as out:
            out.write(b" second half")
        time.sleep(2 * SETTLE)  # long enough that x.part would have settled, were it a candidate
        final = part.rename(tmp_path / "x.dcm")
        got = collect(watcher, until=bool)
        got += drain_for(watcher, 2 * SETTLE)

    assert got == [final]


def test_watcher_ignores_hidden_temporary_and_special_names(tmp_path: Path) -> None:
    with make_watcher(tmp_path) as watcher:
        for name in [".x.dcm", "x.tmp", "x.crdownload", "x.dcm~", ".cache/y.dcm", "done/z.dcm"]:
            write(tmp_path / name)
        marker = write(tmp_path / "marker.dcm")
        got = collect(watcher, until=bool)
        got += drain_for(watcher, 2 * SETTLE)

    assert got == [marker]


def test_watcher_walks_a_folder_named_like_a_file(tmp_path: Path, poll: bool) -> None:
    with make_watcher(tmp_path, poll) as watcher:
        (tmp_path / "x.dcm").mkdir()
        inner = write(tmp_path / "x.dcm" / "image1.dcm")
        got = collect(watcher, until=bool)
        got += drain_for(watcher, 2 * SETTLE)

    assert got == [inner]


def test_watcher_walks_a_folder_moved_in(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    staging = tmp_path / "staging" / "study1"
    files = [write(staging / f"image{i}.dcm") for i in range(3)]

    with make_watcher(inbox) as watcher:
        staging.rename(inbox / "study1")
        got = collect(watcher, until=lambda r: len(r) >= 3)
        got += drain_for(watcher, 2 * SETTLE)

    assert sorted(got) == [inbox / "study1" / f.name for f in files]


@pytest.mark.parametrize("follow", [False, True])
def test_watcher_skips_symlinks_leading_outside_unless_asked(tmp_path: Path, follow: bool) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outside = write(tmp_path / "outside" / "secret.dcm")
    inside = write(inbox / "inside.dcm")
    (inbox / "at_start.dcm").symlink_to(outside)

    with make_watcher(inbox, follow_symlinks=follow) as watcher:
        (inbox / "later.dcm").symlink_to(outside)
        (inbox / "local_link.dcm").symlink_to(inside)
        (inbox / "linked_dir").symlink_to(outside.parent, target_is_directory=True)
        got = drain_for(watcher, 4 * SETTLE)

    expected = [inside, inbox / "local_link.dcm"]
    if follow:
        expected += [inbox / "at_start.dcm", inbox / "later.dcm"]
        expected += [inbox / "linked_dir" / outside.name]
    assert sorted(got) == sorted(expected)


def test_watcher_returns_a_rewritten_file_again_and_forgets_deleted_ones(tmp_path: Path) -> None:
    image = write(tmp_path / "a.dcm", b"version 1")

    with make_watcher(tmp_path) as watcher:
        assert collect(watcher, until=bool) == [image]
        # Reads and metadata-only events (chmod, utime to the same times) are not changes.
        image.read_bytes()
        st = image.stat()
        os.chmod(image, st.st_mode)
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert drain_for(watcher, 2 * SETTLE) == []
        image.write_bytes(b"version 2, longer")
        assert collect(watcher, until=bool) == [image]
        # Deleted, then the same bytes with the same mtime come back: a new arrival.
        st = image.stat()
        image.unlink()
        assert drain_for(watcher, 2 * SETTLE) == []
        image.write_bytes(b"version 2, longer")
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert collect(watcher, until=bool) == [image]


def test_watcher_coalesces_an_event_burst(tmp_path: Path) -> None:
    count = 1000
    with make_watcher(tmp_path) as watcher:
        busy = tmp_path / "busy.dcm"
        with open(busy, "wb") as out:
            for _ in range(3000):  # thousands of modify events on one path
                out.write(b"x")
                out.flush()
        made = {write(tmp_path / "burst" / f"{i:05d}.dcm") for i in range(count)}
        made.add(busy)
        started = time.monotonic()
        got = collect(watcher, until=lambda r: len(r) >= len(made), timeout=30.0)
        got += drain_for(watcher, 2 * SETTLE)
        elapsed = time.monotonic() - started

    assert len(got) == len(set(got))
    assert set(got) == made
    assert elapsed < 15.0


def test_watcher_idle_wait_does_not_spin(tmp_path: Path) -> None:
    write(tmp_path / "a.dcm")
    with make_watcher(tmp_path) as watcher:
        assert collect(watcher, until=bool)
        cpu_before = time.process_time()
        wall_before = time.monotonic()
        assert watcher.ready(timeout=1.0) == []
        wall = time.monotonic() - wall_before
        cpu = time.process_time() - cpu_before

    assert 0.9 <= wall < 2.0
    assert cpu < 0.2


def test_watcher_stops_its_threads_and_refuses_misuse(tmp_path: Path) -> None:
    baseline = threading.active_count()
    watcher = make_watcher(tmp_path)
    with pytest.raises(RuntimeError):
        watcher.ready(timeout=0)
    with watcher:
        assert threading.active_count() > baseline
    assert threading.active_count() == baseline
    with pytest.raises(RuntimeError):
        watcher.ready(timeout=0)
    with pytest.raises(NotADirectoryError):
        InboxWatcher(tmp_path / "missing").__enter__()
