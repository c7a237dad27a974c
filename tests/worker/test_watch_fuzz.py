"""A live ``watch`` (quarantine on) against a seeded stream of hostile inbox entries.

Random names (control characters, dots, names at the length limit, bytes that are not UTF-8),
symlinks (to outside files, folders and FIFOs, dangling, in loops, planted as ``done``/``failed``,
swapped in for folders), FIFOs (also renamed over files), sockets and a tree deeper than
Python's recursion limit. Afterwards: nothing left the inbox, nothing outside it was read or
changed, and ``watch`` still takes an ordinary file to ``done``.

``BONEWATCH_FUZZ_SEED`` and ``BONEWATCH_FUZZ_ITERATIONS`` change the run; a failure names its seed.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from bonewatch.worker.runner import open_ledger
from tests.hostile import iter_tree, make_deep_tree, remove_deep_tree, unblock_fifo
from tests.worker.live_watch import live_watch

SEED = int(os.environ.get("BONEWATCH_FUZZ_SEED", "2026"))
ITERATIONS = int(os.environ.get("BONEWATCH_FUZZ_ITERATIONS", "300"))
TIME_LIMIT_S = 25.0  # for the stream of entries; the whole test stays under a minute
NAME_MAX = 255


def _png(rng: random.Random, level: float) -> bytes:
    """A PNG, unique per call; bright ones are ELBOW/done for the tiny bundle, dark ones not."""
    pixels = np.random.default_rng(rng.getrandbits(32)).random((40, 40)) * 0.05 + level
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fit(name: str) -> str:
    while len(os.fsencode(name)) > NAME_MAX:
        name = name[1:]
    return name


class HostileInbox:
    """Makes one hostile entry at a time under ``inbox``; remembers what to check and clean."""

    def __init__(
        self, rng: random.Random, inbox: Path, outside: Path, staging: Path, deep: list[Path]
    ) -> None:
        self.rng, self.inbox, self.outside, self.staging = rng, inbox, outside, staging
        self.folders: list[Path] = [inbox]
        self.files: list[Path] = []
        self.written: set[str] = set()  # sha256 of every non-empty content put in the inbox
        self.fifos: list[Path] = []
        self.deep = deep  # deep trees made: removed by the fixture, whatever the outcome
        self.count = 0
        self.actions: list[Callable[[], None]] = [
            *[self.ordinary_file] * 4,
            *[self.junk_file] * 3,
            self.bytes_named_file,
            self.folder,
            self.folder,
            self.link_to_outside,
            self.link_dangling,
            self.link_loop,
            self.plant_special_link,
            self.swap_folder_for_link,
            self.fifo,
            self.fifo_over_file,
            self.unix_socket,
            self.rename_file,
            self.deep_tree,
        ]

    # --- names and places ----------------------------------------------------------------------

    def name(self) -> str:
        rng, n = self.rng, self.count
        self.count += 1
        suffix = rng.choice([".png", ".dcm", "", ".PNG", ".png", ".dcm", ".part", ".dcm~"])
        kind = rng.randrange(9)
        if kind == 0:
            stem = "".join(
                chr(rng.choice([*range(1, 32), 127])) for _ in range(rng.randrange(1, 6))
            )
            stem += f"ctl{n}"
        elif kind == 1:
            stem = rng.choice(["..", "...", ". .", "..."]) + f"dots{n}" + rng.choice(["", ".."])
        elif kind == 2:
            stem = "L" * rng.randrange(150, 260) + str(n)
        elif kind == 3:
            stem = "é" * rng.randrange(60, 130) + str(n)
        elif kind == 4:
            stem = os.fsdecode(bytes(rng.randrange(128, 256) for _ in range(4))) + f"bin{n}"
        elif kind == 5:
            stem = rng.choice(["done", "failed", "-rf", "~$lock", " ", "\u202eevil"]) + str(n)
        elif kind == 6:
            stem = f"line\nbreak{n}"
        else:
            stem = f"plain{n}"
        return _fit(stem + suffix)

    def place(self) -> Path:
        alive = [f for f in self.folders if f.is_dir() and not f.is_symlink()]
        return self.rng.choice(alive or [self.inbox])

    def _write(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)
        self.files.append(path)
        if data:
            self.written.add(_sha(data))

    # --- actions -------------------------------------------------------------------------------

    def ordinary_file(self) -> None:
        self._write(self.place() / self.name(), _png(self.rng, self.rng.choice([0.9, 0.0, 0.5])))

    def junk_file(self) -> None:
        data = self.rng.randbytes(self.rng.choice([0, 1, 64, 700]))
        self._write(self.place() / self.name(), data)

    def bytes_named_file(self) -> None:
        raw = bytes(self.rng.randrange(128, 256) for _ in range(3)) + b".png"
        path = os.path.join(os.fsencode(self.place()), raw)
        data = _png(self.rng, 0.9)
        with open(path, "wb") as out:
            out.write(data)
        self.files.append(Path(os.fsdecode(path)))
        self.written.add(_sha(data))

    def folder(self) -> None:
        folder = self.place() / self.name()
        folder.mkdir()
        self.folders.append(folder)

    def link_to_outside(self) -> None:
        target = self.rng.choice(
            [
                self.outside / "secret.png",
                self.outside / "sub",
                self.outside / "pipe",
                self.outside,
                self.outside.parent,
                Path("/etc/passwd"),
            ]
        )
        (self.place() / self.name()).symlink_to(target)

    def link_dangling(self) -> None:
        (self.place() / self.name()).symlink_to(self.outside / f"nothing-{self.count}")

    def link_loop(self) -> None:
        here = self.place()
        a, b = here / self.name(), here / self.name()
        kind = self.rng.randrange(3)
        if kind == 0:
            a.symlink_to(b.name)
            b.symlink_to(a.name)
        elif kind == 1:
            a.symlink_to(a.name)
        else:
            a.symlink_to(self.rng.choice([".", "..", str(self.inbox)]), target_is_directory=True)

    def plant_special_link(self) -> None:
        """``done``/``failed`` (at the top or further down) as a link to outside; an existing
        folder is moved aside under a hidden name first, an existing link taken away."""
        name = self.rng.choice(["done", "failed"])
        where = self.inbox if self.rng.random() < 0.5 else self.place()
        if (where / name).is_symlink():
            (where / name).unlink()  # and moves work again, for a while
            return
        if (where / name).is_dir():
            (where / name).rename(where / f".was-{name}-{self.count}")
        elif os.path.lexists(where / name):
            return
        (where / name).symlink_to(self.rng.choice([self.outside, self.outside / "sub"]))

    def swap_folder_for_link(self) -> None:
        """A folder (with files waiting, perhaps) replaced by a link to outside, as between
        registration and the move; the quarantine folders' sub-folders too."""
        candidates = [
            f for f in self.folders if f != self.inbox and f.is_dir() and not f.is_symlink()
        ]
        for special in ("done", "failed"):
            top = self.inbox / special
            if top.is_dir() and not top.is_symlink():
                candidates += [p for p in top.iterdir() if p.is_dir() and not p.is_symlink()]
        if not candidates:
            return
        folder = self.rng.choice(candidates)
        folder.rename(folder.with_name(f".swapped-{self.count}"))
        self.count += 1
        folder.symlink_to(self.rng.choice([self.outside, self.outside / "sub"]))

    def fifo(self) -> None:
        path = self.place() / self.name()
        os.mkfifo(path)
        self.fifos.append(path)

    def fifo_over_file(self) -> None:
        files = [f for f in self.files if f.is_file()]
        if not files:
            return self.fifo()
        target = self.rng.choice(files)
        staged = self.staging / f"fifo-{self.count}"
        self.count += 1
        os.mkfifo(staged)
        os.rename(staged, target)
        self.fifos.append(target)
        return None

    def unix_socket(self) -> None:
        path = self.place() / f"s{self.count}.dcm"
        self.count += 1
        if len(os.fsencode(path)) >= 100:  # sun_path's limit
            return
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))

    def rename_file(self) -> None:
        files = [f for f in self.files if f.is_file() and not f.is_symlink()]
        if files:
            source = self.rng.choice(files)
            target = self.place() / self.name()
            os.rename(source, target)
            self.files.append(target)

    def deep_tree(self) -> None:
        if self.deep:
            return
        tree = make_deep_tree(self.staging / "tree")
        self.deep.append(tree)
        moved = self.inbox / f"deep{self.count}"
        self.deep.append(moved)
        tree.rename(moved)


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: its kind and content (bytes' sha256, a link's target)."""
    found: dict[str, tuple] = {}
    for path, st in iter_tree(folder):
        key = os.fsencode(path.relative_to(folder)).hex()
        if stat.S_ISREG(st.st_mode):
            found[key] = ("file", _sha(path.read_bytes()), st.st_mtime_ns)
        elif stat.S_ISLNK(st.st_mode):
            found[key] = ("link", os.readlink(path))
        else:
            found[key] = (stat.S_IFMT(st.st_mode),)
    return found


def _outside_files_hashes(top: Path, inbox: Path) -> set[str]:
    """sha256 of every regular file under ``top`` but outside ``inbox``."""
    hashes = set()
    for path, st in iter_tree(top):
        if stat.S_ISREG(st.st_mode) and not path.is_relative_to(inbox):
            hashes.add(_sha(path.read_bytes()))
    return hashes


@pytest.fixture
def deep_trees():
    """Deep trees a test made; removed without recursion afterwards, even when it failed (left
    behind, one would end a later pytest session's clean-up of old temporary folders)."""
    made: list[Path] = []
    yield made
    for tree in made:
        remove_deep_tree(tree)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_watch_survives_a_hostile_inbox(tmp_path, settings, deep_trees):
    rng = random.Random(SEED)
    inbox, outside, staging = tmp_path / "inbox", tmp_path / "outside", tmp_path / "staging"
    for folder in (inbox, outside / "sub", staging):
        folder.mkdir(parents=True)
    secrets = {
        outside / "secret.png": _png(rng, 0.9),  # would be a `done` row if it were ever read
        outside / "notes.txt": b"outside notes\n",
        outside / "sub" / "inner.png": _png(rng, 0.9),
        outside / "sub" / "image1.png": _png(rng, 0.0),
    }
    for path, data in secrets.items():
        path.write_bytes(data)
    os.mkfifo(outside / "pipe")
    outside_before = _snapshot(outside)
    quarantined = settings.replace(quarantine=True)
    hostile = HostileInbox(rng, inbox, outside, staging, deep_trees)
    final = inbox / "final-ordinary.png"
    made: list[str] = []

    with live_watch(inbox, quarantined) as watch:
        try:
            assert watch.started()
            deadline = time.monotonic() + TIME_LIMIT_S
            for step in range(ITERATIONS):
                if time.monotonic() > deadline:
                    break
                action = rng.choice(hostile.actions)
                try:
                    action()
                    made.append(action.__name__)
                except OSError:
                    made.append(f"{action.__name__}: refused by the file system")
                if step % 20 == 0:
                    assert watch.running(), f"seed {SEED}: watch stopped: {watch.errors!r}"
                time.sleep(rng.random() * 0.04)
            final.write_bytes(_png(rng, 0.9))
            engine = open_ledger(quarantined)

            def final_done() -> bool:
                with engine.connect() as db:
                    row = db.execute(
                        text("SELECT status FROM images WHERE path = :path"), {"path": str(final)}
                    ).first()
                return row is not None and row[0] == "done"

            assert watch.wait(final_done, timeout=30), (
                f"seed {SEED}: the last file never ended done"
            )
        finally:
            watch.stop.set()
            for _ in range(50):  # a reader blocked on a FIFO goes on, and the loop ends
                if not watch.thread.is_alive():
                    break
                for fifo in [*hostile.fifos, outside / "pipe"]:
                    unblock_fifo(fifo)
                time.sleep(0.1)

    assert not watch.errors, f"seed {SEED}: {watch.errors!r}"
    # Nothing outside changed, nothing was moved out: the outside folder is as it was, the
    # temporary folder holds what it held, and no inbox content is anywhere but the inbox.
    assert _snapshot(outside) == outside_before, f"seed {SEED}: the outside folder changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "inbox", "outside", "staging"]
    assert not hostile.written & _outside_files_hashes(tmp_path, inbox), f"seed {SEED}"
    # Nothing outside was read: no outside content is in the ledger.
    with open_ledger(quarantined).connect() as db:
        ledger = {r[0] for r in db.execute(text("SELECT sha256 FROM images")) if r[0]}
    assert not ledger & {_sha(data) for data in secrets.values()}, f"seed {SEED}: read outside"
    assert ledger, "nothing was registered at all"
    moved = sum(1 for _ in iter_tree(inbox / "done")) + sum(1 for _ in iter_tree(inbox / "failed"))
    print(f"seed {SEED}: {len(made)} entries, {len(ledger)} contents in the ledger, {moved} moved")
    assert {"deep_tree", "fifo_over_file", "plant_special_link"} <= set(made) or len(made) < 40
