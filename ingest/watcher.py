"""Finding input files, and knowing when a file in the inbox has been fully written.

Two entry points:

- :func:`iter_candidate_files` walks files and folders once (``bonewatch process PATH...``).
- :class:`InboxWatcher` follows an inbox folder (``bonewatch watch INBOX``): a start-up scan, then
  file-system events (inotify, or polling for network shares), and hands out each file once its
  size and mtime have stopped changing.

Both apply the same naming rules: hidden names, temporary names of copy and download tools, and the
``done/`` and ``failed/`` folders directly under a root are not candidates. Nothing here reads file
content; sniffing the format is the readers' job.

The inbox is written by others, so nothing in it may stop the watcher: it never opens anything
but a regular file (a FIFO would block it), walks folders iteratively and not deeper than
:data:`MAX_DEPTH`, and when an observer thread dies all the same (watchdog walks new folders
recursively on its own threads) it falls back to polling, once; a second death is an
:class:`InboxWatcherError` from :meth:`InboxWatcher.ready`, for the caller to exit on.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path, PurePath
from types import TracebackType

from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MOVED,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from bonewatch.ingest.archives import PathFilter

logger = logging.getLogger(__name__)

# Suffixes that copy tools, browsers and editors give a file while it is still being written.
TEMPORARY_SUFFIXES: tuple[str, ...] = (
    ".tmp",
    ".temp",
    ".part",
    ".partial",
    ".crdownload",
    ".download",
    ".filepart",
    ".swp",
    ".swx",
)

# Folders directly under a root where processed files may be moved; never input again.
SPECIAL_FOLDERS: frozenset[str] = frozenset({"done", "failed"})

# Lower bound between two passes over the queued events, so a storm of events on a file being
# written costs a bounded number of stat() calls per second instead of one per event.
_MIN_DRAIN_INTERVAL_S = 0.05

# Flags for what the event thread saw happen to a path; several coalesce into one entry.
_GONE = 1  # deleted or moved away: forget it
_CHECK_FILE = 2  # created, written, closed or moved in: stat it
# A folder created or moved in: walk it. watchdog simulates events for its content too, but only
# for sub-folders it managed to watch in time.
_CHECK_DIR = 4
_GONE_DIR = 8  # a folder deleted or moved away: forget every file under it

# Folders deeper than this below the inbox are not walked, by the watcher or by the polling
# observer (whose walk is recursive): their files are not input.
MAX_DEPTH = 32

# open() flags of the readability check: never blocks on a FIFO, never takes a terminal.
_CHECK_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

Signature = tuple[int, int]  # (size in bytes, mtime in ns)


class InboxWatcherError(RuntimeError):
    """The watcher cannot follow the inbox any more: its observer stopped and could not be
    replaced. The process should exit, so that a supervisor starts it again."""


def is_candidate_name(name: str) -> bool:
    """Tell whether a file name may be an input file.

    Args:
        name: A bare file name, not a path.

    Returns:
        False for hidden names (leading ``.``), editor backups (trailing ``~``), Office lock files
        (leading ``~$``) and names with a temporary suffix such as ``.part`` or ``.crdownload``
        (case-insensitive); True otherwise.
    """
    if not name or name.startswith(".") or name.startswith("~$") or name.endswith("~"):
        return False
    return not name.lower().endswith(TEMPORARY_SUFFIXES)


@dataclass
class SkipCounts:
    """What :func:`iter_candidate_files` left out: links leading outside, files the
    include/exclude globs do not take."""

    links_outside: int = 0
    excluded: int = 0


_SKIP_COUNTS: ContextVar[SkipCounts | None] = ContextVar("bonewatch_skip_counts", default=None)


@contextmanager
def counting_skips() -> Iterator[SkipCounts]:
    """Count what the :func:`iter_candidate_files` walks iterated in this block leave out.

    ``bonewatch process`` reports the counts in its summary line; the walk runs in the thread
    (and context) that iterates it, so no callback has to be threaded through the runner.
    """
    counts = SkipCounts()
    token = _SKIP_COUNTS.set(counts)
    try:
        yield counts
    finally:
        _SKIP_COUNTS.reset(token)


def iter_candidate_files(
    paths: Iterable[str | Path],
    *,
    follow_symlinks: bool = False,
    include: str | Iterable[str] = (),
    exclude: str | Iterable[str] = (),
    on_skip: Callable[[Path, str], None] | None = None,
) -> Iterator[Path]:
    """Expand files and folders into the candidate input files under them.

    Folders are walked recursively in sorted name order, lazily: only one folder listing per level
    is held at a time, so memory follows the largest folder, not the tree. While walking, hidden
    names (file or folder), temporary file names and ``done/``/``failed/`` directly under the root
    are skipped. A symlink met while walking is used only if ``follow_symlinks`` is set or it
    resolves inside the root it was found under. A folder is walked even if named like a file
    (``x.dcm/``). Paths given explicitly are taken as meant: a given file is yielded whatever its
    name, and a given symlink is followed.

    ``include`` and ``exclude`` globs (lists, or comma-separated strings) choose among the files,
    given or found, as :class:`~bonewatch.ingest.archives.PathFilter` says. What is left out for
    a symlink leading outside (``"link outside"``) or for the globs (``"excluded"``) is passed to
    ``on_skip``, and counted into an enclosing :func:`counting_skips` block.

    Args:
        paths: Files and folders, in the order to expand them.
        follow_symlinks: Also follow symlinks that lead outside their root.
        include: Globs a file must match (archives by name excepted), if any are given.
        exclude: Globs that leave a file out.
        on_skip: Called with each path left out and why.

    Yields:
        Regular files, as paths under the given path (not resolved).
    """
    chosen = PathFilter.of(include, exclude)
    counts = _SKIP_COUNTS.get()

    def skip(path: Path, why: str) -> None:
        if counts is not None:
            if why == "link outside":
                counts.links_outside += 1
            else:
                counts.excluded += 1
        if on_skip is not None:
            on_skip(path, why)

    def wanted(path: Path) -> bool:
        if chosen and not chosen.takes_file(path):
            skip(path, "excluded")
            return False
        return True

    for given in paths:
        path = Path(given)
        try:
            st = path.stat()
        except OSError as err:
            logger.warning("skipping %s: %s", path, err)
            continue
        if stat.S_ISDIR(st.st_mode):
            found = _walk(path, path.resolve(), path, follow_symlinks=follow_symlinks, on_skip=skip)
            yield from (file for file in found if wanted(file))
        elif stat.S_ISREG(st.st_mode):
            if wanted(path):
                yield path
        else:
            # A FIFO or device would block or never end when read.
            logger.warning("skipping %s: not a regular file or folder", path)


def _symlink_allowed(link: Path, root_real: Path, follow_symlinks: bool) -> bool:
    """Tell whether a symlink found under ``root_real`` may be followed."""
    if follow_symlinks:
        return True
    try:
        target = link.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on older Pythons
        return False
    return target.is_relative_to(root_real)


def _links_into(link: Path | str, root_real: Path) -> bool:
    """Whether a symlink leads to a place in ``root_real``: a folder there is walked under its
    own name, so walking it through the link would only take its files twice (or walk the
    inbox again, from inside itself)."""
    return Path(os.path.realpath(link)).is_relative_to(root_real)


def _is_wanted_relpath(rel: PurePath, *, is_dir: bool) -> bool:
    """Apply the naming rules to a path relative to its root."""
    parts = rel.parts
    if not parts or parts[0] in SPECIAL_FOLDERS:
        return False
    if any(part.startswith(".") for part in parts):
        return False
    return is_dir or is_candidate_name(parts[-1])


def _walk(
    root: Path,
    root_real: Path,
    start: Path,
    *,
    follow_symlinks: bool,
    max_depth: int | None = None,
    on_skip: Callable[[Path, str], None] | None = None,
) -> Iterator[Path]:
    """Yield candidate files under ``start``, a folder at or below ``root``, in sorted order.

    Iterative, so a deep tree costs memory, not stack. With ``max_depth``, folders more than
    that many levels below ``root`` are not entered (one log line each). ``on_skip`` hears of
    each symlink left out for leading outside (``"link outside"``).
    """
    visited: set[tuple[int, int]] = set()  # (st_dev, st_ino) of folders walked: breaks link loops
    stack: list[tuple[Iterator[os.DirEntry[str]], bool, int]] = []

    def enter(folder: Path | str, at_root: bool, depth: int) -> None:
        if max_depth is not None and depth > max_depth:
            logger.warning("not walking %r: more than %d folders deep", str(folder), max_depth)
            return
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            logger.warning("cannot list %r: %s", str(folder), err)
            return
        stack.append((iter(entries), at_root, depth))

    try:
        start_stat = start.stat()
    except OSError as err:
        logger.warning("cannot walk %s: %s", start, err)
        return
    visited.add((start_stat.st_dev, start_stat.st_ino))
    try:
        start_depth = len(start.relative_to(root).parts)
    except ValueError:
        start_depth = 0
    enter(start, start == root, start_depth)

    while stack:
        entries, at_root, depth = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name = entry.name
        if name.startswith(".") or (at_root and name in SPECIAL_FOLDERS):
            continue
        try:
            if entry.is_symlink() and not _symlink_allowed(
                Path(entry.path), root_real, follow_symlinks
            ):
                logger.info("skipping symlink %r: it leads outside %s", entry.path, root)
                if on_skip is not None:
                    on_skip(Path(entry.path), "link outside")
                continue
            if entry.is_dir():
                if entry.is_symlink() and _links_into(entry.path, root_real):
                    logger.debug("not walking %r: a link to a folder in %s", entry.path, root)
                    continue
                st = entry.stat()
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    logger.info("skipping %s: folder already walked (symlink loop?)", entry.path)
                    continue
                visited.add(key)
                enter(entry.path, False, depth + 1)
            elif entry.is_file():
                if is_candidate_name(name):
                    yield Path(entry.path)
            else:
                logger.debug("skipping %s: not a regular file (or a broken symlink)", entry.path)
        except OSError as err:
            # Vanished between listing and stat, or unreadable: not ours to report here.
            logger.debug("skipping %s: %s", entry.path, err)


@dataclass
class _Pending:
    """A file seen but not yet handed out."""

    signature: Signature | None  # None when stat() failed transiently
    due: float  # monotonic time of the next settle check


class _InboxEventHandler(FileSystemEventHandler):
    """Forwards watchdog events to the watcher; runs on the observer thread."""

    def __init__(self, watcher: InboxWatcher) -> None:
        super().__init__()
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_event(event)
        except Exception:  # an exception here would kill the observer thread silently
            logger.exception("inbox watcher: failed to handle %r", event)


class InboxWatcher:
    """Follow an inbox folder and hand out each file once it has been fully written.

    Use as a context manager: entering starts the observer and scans the files already there;
    :meth:`ready` then returns the files that have settled. A file is complete when its size and
    mtime have not changed for ``settle_seconds`` and it can be opened for reading. Each
    (path, size, mtime) is handed out at most once; a file rewritten later is handed out again.

    The event thread only records which paths changed (coalesced per path); all stat() and open()
    calls happen in :meth:`ready`, on the caller's thread. Call :meth:`ready` from one thread.

    Only regular files are handed out, and without ``follow_symlinks`` only those whose real path
    is in the inbox; nothing else is ever opened. If an observer thread dies (watchdog walks a
    folder moved in recursively, and a deep enough tree ends that walk with a RecursionError),
    :meth:`ready` logs it, polls from then on and scans the inbox again; if the polling observer
    dies too, :meth:`ready` raises :class:`InboxWatcherError`.

    Args:
        root: The inbox folder; must exist.
        poll: Use a polling observer (network shares, where inotify events do not arrive). If
            native events cannot be set up (e.g. the inotify watch limit), polling is used anyway.
        poll_interval: Seconds between polls in polling mode.
        settle_seconds: How long size and mtime must stay unchanged.
        follow_symlinks: Also follow symlinks that lead outside the inbox.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        poll: bool = False,
        poll_interval: float = 1.0,
        settle_seconds: float = 1.0,
        follow_symlinks: bool = False,
    ) -> None:
        if settle_seconds < 0 or poll_interval <= 0:
            raise ValueError("settle_seconds must be >= 0 and poll_interval > 0")
        # Resolved so that event paths, scan paths and the symlink check all agree.
        self.root = Path(root).resolve()
        self.poll = poll
        self.poll_interval = poll_interval
        self.settle_seconds = settle_seconds
        self.follow_symlinks = follow_symlinks
        self._observer: BaseObserver | None = None
        self._polling = False
        self._fell_back = False  # an observer died and polling took over
        # Shared with the event thread, under _lock.
        self._lock = threading.Lock()
        self._dirty: dict[Path, int] = {}
        self._wakeup = threading.Event()
        # Owned by the thread calling ready().
        self._consumer_lock = threading.Lock()
        self._pending: dict[Path, _Pending] = {}
        self._due_heap: list[tuple[float, int, Path]] = []
        self._heap_seq = 0
        self._handed_out: dict[Path, Signature] = {}
        self._last_drain = float("-inf")

    @property
    def polling(self) -> bool:
        """True when a polling observer is running (asked for, or fallen back to)."""
        return self._observer is not None and self._polling

    @property
    def alive(self) -> bool:
        """True while the observer and every thread it runs on are alive."""
        observer = self._observer
        return observer is not None and all(thread.is_alive() for thread in _threads_of(observer))

    def __enter__(self) -> InboxWatcher:
        if self._observer is not None:
            raise RuntimeError("InboxWatcher is already running")
        if not self.root.is_dir():
            raise NotADirectoryError(f"inbox {self.root} is not an existing folder")
        self._observer = self._start_observer()
        # Scan after the observer is up, so a file created in between is seen by one or the other.
        try:
            with self._consumer_lock:
                count = self._scan(time.monotonic())
        except BaseException:
            self.close()  # __exit__ will not run: do not leave the observer threads behind
            raise
        logger.info(
            "watching %s (%s), %d files found at start-up",
            self.root,
            "polling" if self.polling else "events",
            count,
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop and join the observer; safe to call twice."""
        observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        observer.join(timeout=10.0)
        if observer.is_alive():
            logger.warning("inbox observer for %s did not stop within 10 s", self.root)

    def _start_observer(self, *, poll: bool | None = None) -> BaseObserver:
        handler = _InboxEventHandler(self)
        if not (self.poll if poll is None else poll):
            observer: BaseObserver | None = None
            try:
                observer = Observer()
                observer.schedule(handler, str(self.root), recursive=True)
                observer.start()
                self._polling = False
                return observer
            except (OSError, RecursionError) as err:
                # ENOSPC from inotify's per-user watch limit on a large tree, EMFILE from its
                # limit on instances, a RecursionError from watchdog's walk of a deep tree.
                logger.warning(
                    "native file events unavailable for %s (%s); polling every %.1f s instead",
                    self.root,
                    err,
                    self.poll_interval,
                )
                if observer is not None:
                    _stop(observer)
        # lstat: symlinks are not followed out of the inbox; the listing stops at MAX_DEPTH, so
        # the snapshot's recursive walk stays shallow.
        observer = PollingObserverVFS(os.lstat, self._listdir, polling_interval=self.poll_interval)
        observer.schedule(handler, str(self.root), recursive=True)
        try:
            observer.start()
        except Exception as err:
            _stop(observer)
            raise InboxWatcherError(f"cannot watch {self.root}: {err}") from err
        self._polling = True
        return observer

    def _listdir(self, folder: str | None) -> Iterator[os.DirEntry[str]]:
        """os.scandir for the polling observer, without the sub-folders of folders at
        :data:`MAX_DEPTH`."""
        with os.scandir(folder) as listing:
            entries = list(listing)
        depth = os.fsdecode(folder or ".")[len(str(self.root)) :].count(os.sep)
        if depth >= MAX_DEPTH:
            entries = [entry for entry in entries if not entry.is_dir(follow_symlinks=False)]
        return iter(entries)

    def _check_observer(self, now: float) -> None:
        """Replace an observer whose thread died by a polling one and scan again, once."""
        if self.alive:
            return
        if self._fell_back:
            raise InboxWatcherError(
                f"the inbox observer for {self.root} stopped again after falling back to polling"
            )
        self._fell_back = True
        logger.error(
            "the inbox observer for %s stopped (a thread of it died); polling every %.1f s "
            "from now on, after a new scan",
            self.root,
            self.poll_interval,
        )
        dead, self._observer = self._observer, None
        if dead is not None:
            _stop(dead)
        self._observer = self._start_observer(poll=True)
        self._scan(now)

    def _scan(self, now: float) -> int:
        """Walk the whole inbox and observe every candidate; how many were found."""
        count = 0
        for path in _walk(
            self.root,
            self.root,
            self.root,
            follow_symlinks=self.follow_symlinks,
            max_depth=MAX_DEPTH,
        ):
            self._observe(path, now)
            count += 1
        return count

    def ready(self, timeout: float) -> list[Path]:
        """Wait up to ``timeout`` seconds for files to become complete.

        Returns as soon as at least one file is complete, or with an empty list at the timeout.
        Handling a folder that was moved in may take longer than ``timeout`` (it is walked here).

        Args:
            timeout: Seconds to wait; 0 checks once without waiting.

        Returns:
            The files completed since the last call, sorted; each path at most once.

        Raises:
            InboxWatcherError: The observer died, and so did the polling one that replaced it.
        """
        if self._observer is None:
            raise RuntimeError("InboxWatcher.ready() called outside its with-block")
        deadline = time.monotonic() + max(0.0, timeout)
        with self._consumer_lock:
            while True:
                now = time.monotonic()
                self._check_observer(now)
                if now - self._last_drain >= _MIN_DRAIN_INTERVAL_S:
                    self._drain_events(now)
                completed = self._collect_settled(time.monotonic())
                now = time.monotonic()
                if completed or now >= deadline:
                    return sorted(completed)
                wake_at = min(deadline, self._due_heap[0][0] if self._due_heap else deadline)
                if self._wakeup.is_set():
                    # Events are waiting but the last pass was moments ago: let them pile up.
                    wake_at = min(wake_at, self._last_drain + _MIN_DRAIN_INTERVAL_S)
                    time.sleep(max(0.0, wake_at - now))
                else:
                    self._wakeup.wait(max(0.0, wake_at - now))

    # --- event thread -------------------------------------------------------------------------

    def _on_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        # Our own open() for the readability check shows up as these: they change nothing.
        if kind in (EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE):
            return
        if kind in (EVENT_TYPE_MOVED, EVENT_TYPE_DELETED):
            gone = _GONE | _GONE_DIR if event.is_directory else _GONE
            self._mark(event.src_path, gone, is_dir=event.is_directory)
            if kind == EVENT_TYPE_MOVED and event.dest_path:
                check = _CHECK_DIR if event.is_directory else _CHECK_FILE
                self._mark(event.dest_path, check, is_dir=event.is_directory)
        elif event.is_directory:
            # A folder's "modified" only means its listing changed; its files send their own.
            if kind == EVENT_TYPE_CREATED:
                self._mark(event.src_path, _CHECK_DIR, is_dir=True)
        else:
            self._mark(event.src_path, _CHECK_FILE, is_dir=False)

    def _mark(self, raw_path: bytes | str, flag: int, *, is_dir: bool) -> None:
        path = Path(os.fsdecode(raw_path))
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return  # moved out of the inbox
        if not _is_wanted_relpath(rel, is_dir=is_dir):
            return
        with self._lock:
            self._dirty[path] = self._dirty.get(path, 0) | flag
            self._wakeup.set()

    # --- consumer thread ----------------------------------------------------------------------

    def _drain_events(self, now: float) -> None:
        with self._lock:
            self._wakeup.clear()
            dirty, self._dirty = self._dirty, {}
        self._last_drain = now
        gone_dirs = {path for path, flags in dirty.items() if flags & _GONE_DIR}
        if gone_dirs:
            self._forget_under(gone_dirs)
        for path, flags in dirty.items():
            try:
                # Forget first, then look: the stat below sees the final state whatever the
                # order was.
                if flags & _GONE:
                    self._forget(path)
                if flags & _CHECK_DIR:
                    self._walk_into(path, now)
                elif flags & _CHECK_FILE:
                    self._observe(path, now)
            except Exception:  # one hostile path must not stop the watcher
                logger.exception("inbox watcher: failed to look at %r", str(path))

    def _walk_into(self, folder: Path, now: float) -> None:
        if folder.is_symlink():
            if not _symlink_allowed(folder, self.root, self.follow_symlinks):
                logger.info("skipping symlink %r: it leads outside %s", str(folder), self.root)
                return
            if _links_into(folder, self.root):
                logger.debug("not walking %r: a link to a folder in the inbox", str(folder))
                return
        for path in _walk(
            self.root,
            self.root,
            folder,
            follow_symlinks=self.follow_symlinks,
            max_depth=MAX_DEPTH,
        ):
            self._observe(path, now)

    def _observe(self, path: Path, now: float) -> None:
        """Record the current size and mtime of a path that was seen or changed."""
        try:
            lst = path.lstat()
            if stat.S_ISLNK(lst.st_mode):
                if not _symlink_allowed(path, self.root, self.follow_symlinks):
                    logger.info("skipping symlink %r: it leads outside %s", str(path), self.root)
                    return
                st = path.stat()
            else:
                st = lst
        except (FileNotFoundError, NotADirectoryError):
            self._forget(path)
            return
        except OSError as err:
            # A share that blinked, a permission being fixed: look again after a settle period.
            logger.debug("cannot stat %s yet: %s", path, err)
            self._schedule(path, None, now)
            return
        if stat.S_ISDIR(st.st_mode):
            self._walk_into(path, now)
            return
        if not stat.S_ISREG(st.st_mode):
            # A FIFO, socket or device (perhaps renamed over a file that was pending): never
            # opened, never handed out.
            self._pending.pop(path, None)
            logger.info("skipping %r: not a regular file", str(path))
            return
        signature = (st.st_size, st.st_mtime_ns)
        entry = self._pending.get(path)
        if entry is None:
            if self._handed_out.get(path) == signature:
                return  # an event about a file already handed out, unchanged since
            self._schedule(path, signature, now)
        elif entry.signature != signature:
            self._schedule(path, signature, now)
        # Unchanged and pending: its settle clock keeps running.

    def _schedule(self, path: Path, signature: Signature | None, now: float) -> None:
        due = now + self.settle_seconds
        self._pending[path] = _Pending(signature, due)
        self._heap_seq += 1
        heapq.heappush(self._due_heap, (due, self._heap_seq, path))

    def _collect_settled(self, now: float) -> list[Path]:
        completed: list[Path] = []
        heap = self._due_heap
        while heap and heap[0][0] <= now:
            due, _, path = heapq.heappop(heap)
            entry = self._pending.get(path)
            if entry is None or entry.due != due:
                continue  # superseded by a later change, or forgotten
            try:
                st = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                self._forget(path)
                continue
            except OSError as err:
                logger.debug("cannot stat %s yet: %s", path, err)
                self._schedule(path, None, now)
                continue
            if not stat.S_ISREG(st.st_mode) or not self._inside(path):
                del self._pending[path]  # replaced by a FIFO, a device or a link leading out
                logger.info("skipping %r: not a regular file in the inbox", str(path))
                continue
            signature = (st.st_size, st.st_mtime_ns)
            if signature != entry.signature:
                self._schedule(path, signature, now)  # still being written
                continue
            try:
                _check_opens(path)
            except OSError as err:
                logger.debug("%s has settled but cannot be opened yet: %s", path, err)
                self._schedule(path, signature, now)
                continue
            del self._pending[path]
            if self._handed_out.get(path) != signature:
                self._handed_out[path] = signature
                completed.append(path)
        return completed

    def _inside(self, path: Path) -> bool:
        """Whether ``path``, links and all, is in the inbox (always, with ``follow_symlinks``):
        a link that pointed in when it was seen may point out by now."""
        return self.follow_symlinks or Path(os.path.realpath(path)).is_relative_to(self.root)

    def _forget(self, path: Path) -> None:
        self._pending.pop(path, None)
        self._handed_out.pop(path, None)

    def _forget_under(self, folders: set[Path]) -> None:
        # One pass over the tables per batch of events, however many folders went away at once
        # (an rm -rf of a tree sends one event per folder).
        for table in (self._pending, self._handed_out):
            stale = [key for key in table if not folders.isdisjoint(key.parents)]
            for key in stale:
                del table[key]


def _check_opens(path: Path) -> None:
    """Open ``path`` for reading and close it: OSError unless it opens as a regular file.

    Non-blocking, so a FIFO swapped in since the last stat cannot hang the watcher.
    """
    fd = os.open(path, _CHECK_OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    finally:
        os.close(fd)


def _threads_of(observer: BaseObserver) -> list[threading.Thread]:
    """The observer, its emitters, and the threads they hold (watchdog's inotify reader runs on
    a thread of its own, which the observer's liveness does not show)."""
    found: list[threading.Thread] = [observer, *observer.emitters]
    for owner in list(found):
        found += [v for v in vars(owner).values() if isinstance(v, threading.Thread)]
    return [thread for thread in found if thread.ident is not None]  # started ones


def _stop(observer: BaseObserver) -> None:
    """Stop an observer, started or not, dead threads and all, releasing its descriptors."""
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=10.0)
    except Exception:  # a half-started or half-dead observer: log, do not raise
        logger.exception("could not stop the inbox observer cleanly")
