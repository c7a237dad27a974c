"""What a hostile inbox holds, made and cleaned up for tests: deep folder chains, FIFOs."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

# Deeper than Python's default recursion limit (1000), well inside PATH_MAX (4096) from a
# temporary folder: the chain's path is about 2 * DEEP bytes.
DEEP = 1200
_LINK = "d"  # each level's name


def make_deep_tree(top: Path, depth: int = DEEP) -> Path:
    """``top/d/d/.../d``, ``depth`` levels below ``top``; made with folder handles, so no path
    gets long."""
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(_LINK, dir_fd=fd)
            child = os.open(_LINK, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    return top


def remove_deep_tree(top: Path) -> None:
    """Remove a tree made by :func:`make_deep_tree` one level at a time, from the top, without
    recursion (``shutil.rmtree`` recurses, and would fail on it)."""
    if not top.is_dir() or top.is_symlink():
        return
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    top_fd = os.open(top, flags)
    try:
        while True:
            try:
                child = os.open(_LINK, flags, dir_fd=top_fd)
            except OSError:
                break
            try:
                for name in os.listdir(child):
                    if name == _LINK:
                        os.rename(name, ".next", src_dir_fd=child, dst_dir_fd=top_fd)
                    elif stat.S_ISDIR(os.stat(name, dir_fd=child, follow_symlinks=False).st_mode):
                        os.rename(name, f".{name}-moved", src_dir_fd=child, dst_dir_fd=top_fd)
                    else:
                        os.unlink(name, dir_fd=child)
            finally:
                os.close(child)
            os.rmdir(_LINK, dir_fd=top_fd)
            with contextlib.suppress(FileNotFoundError):
                os.rename(".next", _LINK, src_dir_fd=top_fd, dst_dir_fd=top_fd)
    finally:
        os.close(top_fd)
    shutil.rmtree(top)


def unblock_fifo(path: Path) -> None:
    """Open ``path`` for writing without blocking, and close it: a reader blocked on opening the
    FIFO then goes on (and reads end-of-file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno not in (errno.ENXIO, errno.ENOENT, errno.ENOTDIR):  # no reader: fine
            raise
        return
    os.close(fd)


def iter_tree(top: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry below ``top`` with its lstat, without following links and without recursion;
    names are bytes-safe (surrogate-escaped)."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
