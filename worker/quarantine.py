"""Quarantine moves: a finished inbox file goes to the inbox's ``done/`` or ``failed/`` folder.

The inbox is written by other systems and people, so every name and link in it is taken as
hostile: a ``failed`` that is a symlink to somewhere else, a folder swapped for a symlink between
registration and the move, a recorded path with ``..`` in it. A move therefore

- needs the source's folder and the target's folder, resolved, under the resolved inbox;
- walks both folders from a handle on the inbox one component at a time, each opened with
  ``O_NOFOLLOW``, so a symlinked folder met on the way (planted, or swapped in meanwhile) ends
  the walk, and renames relative to those handles; ``done/``, ``failed/`` and the folders under
  them are never symlinks that a move follows;
- never replaces a file: a name that is taken gets the next number (``image1.1.dcm``),
  shortened where needed to fit the file system's limit on a name.

A move that cannot be made is a log line; nothing here raises to the caller.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path, PurePath

from bonewatch.ingest import printable_path
from bonewatch.worker.settings import Settings

log = logging.getLogger(__name__)

# Where a finished file goes when the user asks for moves. A duplicate's content is in the ledger
# under its original, so it counts as done.
_QUARANTINE_FOLDER = {
    "done": "done",
    "duplicate": "done",
    "failed": "failed",
    "unsupported": "failed",
}
_SPECIAL = frozenset(_QUARANTINE_FOLDER.values())

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_MAX = 255  # when the file system does not say
_MAX_NUMBER = 10_000  # numbered names tried before a move is given up
_RENAME_NOREPLACE = 1  # linux/fs.h


class MoveRefused(OSError):
    """A move that would leave the inbox, follow a symlink or replace a file."""


def quarantine_finished(finished: Iterable[tuple[str, str]], settings: Settings) -> list[Path]:
    """Move finished files out of the inbox into its ``done/`` or ``failed/`` folder.

    Does nothing unless ``BONEWATCH_QUARANTINE`` is on and the inbox is known (``watch INBOX``
    or ``BONEWATCH_INBOX``). Only files under the inbox move, each to the same relative path
    under the folder for its status (``failed/XR_WRIST/patient1/study1/image1.dcm``); a name
    already taken there gets a number (``image1.1.dcm``). The move is a rename, so the bytes and
    the modification time stay as they were. The ledger row keeps the original path. A file that
    cannot be moved, or whose move would follow a symlink or leave the inbox, is logged and left
    where it is.

    Args:
        finished: (path as recorded, final status) pairs; other statuses are skipped.
        settings: Uses ``quarantine`` and ``inbox``.

    Returns:
        The new locations of the files that were moved.
    """
    if not settings.quarantine or settings.inbox is None:
        return []
    inbox = settings.inbox
    roots = {inbox.absolute(), inbox.resolve()}
    moved = []
    for recorded, status in finished:
        folder = _QUARANTINE_FOLDER.get(status)
        relative = _under(Path(recorded), roots)
        if folder is None or relative is None:
            continue
        root, rest = relative
        try:
            name = _move(inbox.resolve(strict=True), rest, folder)
        except OSError as exc:
            log.warning("could not move %r to %s/: %s", printable_path(recorded), folder, exc)
            continue
        except Exception:  # a bug here must cost one move, never the caller
            log.exception("could not move %r to %s/", printable_path(recorded), folder)
            continue
        target = root / folder / rest.parent / name
        log.info("moved %r (%s) to %r", printable_path(recorded), status, printable_path(target))
        moved.append(target)
    return moved


def _under(path: Path, roots: set[Path]) -> tuple[Path, Path] | None:
    """(root, path relative to it) for the first root holding ``path``; None outside them all,
    and for files already in a root's ``done/`` or ``failed/``."""
    for root in sorted(roots):
        try:
            rest = path.relative_to(root)
        except ValueError:
            continue
        if not rest.parts or (len(rest.parts) > 1 and rest.parts[0] in _SPECIAL):
            return None
        return root, rest
    return None


def _move(root: Path, rest: PurePath, folder: str) -> str:
    """Move ``root/rest`` to ``root/folder/rest`` (or a numbered name beside it); the name used.

    Raises:
        OSError: The move was refused (:class:`MoveRefused`) or failed; nothing moved.
    """
    if ".." in rest.parts:
        raise MoveRefused("the path has a '..' component")
    # The source's folder as it is now: a folder swapped for a symlink shows here. A symlink to
    # another folder of the inbox is followed as the watcher followed it; the walk below then
    # takes the resolved folders, each without following a link.
    source = Path(os.path.realpath(root / rest.parent))
    if not source.is_relative_to(root):
        raise MoveRefused(f"its folder leads outside the inbox, to {printable_path(source)!r}")
    source_parts = source.relative_to(root).parts
    if source_parts[:1] and source_parts[0] in _SPECIAL:
        raise MoveRefused(f"its folder is in the inbox's {source_parts[0]}/")
    target_parts = (folder, *rest.parent.parts)
    target = Path(os.path.realpath(root.joinpath(*target_parts)))
    if not target.is_relative_to(root / folder):
        raise MoveRefused(
            f"{folder}/ or a folder in it is a symlink, to {printable_path(target)!r}"
        )

    root_fd = os.open(root, _DIR_FLAGS)
    try:
        with (
            _folder(root_fd, source_parts, create=False) as src_fd,
            _folder(root_fd, target_parts, create=True) as dst_fd,
        ):
            st = os.stat(rest.name, dir_fd=src_fd, follow_symlinks=False)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise MoveRefused("not a regular file")
            return _rename_to_free_name(src_fd, rest.name, dst_fd)
    finally:
        os.close(root_fd)


@contextmanager
def _folder(root_fd: int, parts: Sequence[str], *, create: bool) -> Iterator[int]:
    """A handle on the folder ``parts`` below ``root_fd``, each component opened without
    following a symlink (and made first when ``create``)."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if create:
                with suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise MoveRefused(f"{part!r} on the way is a symlink") from exc
                raise
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _rename_to_free_name(src_fd: int, name: str, dst_fd: int) -> str:
    """Rename ``name`` into ``dst_fd`` under it or the first free ``stem.N.suffix``; never
    replacing anything, even a name taken while we look."""
    try:
        name_max = os.fpathconf(dst_fd, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = _NAME_MAX
    for number in range(_MAX_NUMBER):
        candidate = _numbered(name, number, name_max)
        if _taken(candidate, dst_fd):
            continue
        try:
            _rename_noreplace(src_fd, name, dst_fd, candidate)
        except FileExistsError:
            continue  # taken since we looked
        return candidate
    raise MoveRefused(f"no free name for it after {_MAX_NUMBER} tries")


def _numbered(name: str, number: int, name_max: int) -> str:
    """``name`` for 0, else ``stem.N.suffix``, the stem (then the suffix) cut to fit
    ``name_max`` bytes."""
    if number == 0:
        return name
    pure = PurePath(name)
    stem, suffix, tag = pure.stem, pure.suffix, f".{number}"
    while len(os.fsencode(stem + tag + suffix)) > name_max:
        if stem:
            stem = stem[:-1]
        else:
            suffix = suffix[:-1]
    return stem + tag + suffix


def _taken(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


@cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's renameat2, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


def _rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """Rename ``src`` to ``dst`` (relative to the handles); FileExistsError when ``dst`` exists.

    RENAME_NOREPLACE makes that check and the rename one step. Where the system or the file
    system has no such flag, the check is made just before the rename.
    """
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), printable_path(dst))
    if _taken(dst, dst_fd):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), printable_path(dst))
    os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
