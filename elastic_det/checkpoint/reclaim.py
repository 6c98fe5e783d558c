"""Deleting local checkpoint files at once while their disk space is freed in the background.

Unlinking a 335 MB file costs 50-80 ms here, all of it spent freeing its blocks and page cache, which the
kernel does when the last reference to the file goes. So each file is opened, then unlinked (its name is
gone at once: listings and a crash see it deleted), and the open descriptor is closed by a background
thread, which pays for the freeing. A process killed before that thread is done frees the space as it
exits; nothing about what is committed depends on it.
"""

from __future__ import annotations

import logging
import os
import threading

from ..storage.local import fsync_dir

log = logging.getLogger(__name__)


class Reclaimer:
    """Removes local files and directory trees now; frees their space in a background thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def remove_tree(self, path: str) -> None:
        """Remove the file or directory tree at ``path`` (missing is fine); OSError when removal fails."""
        held: list[int] = []
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                for directory, _, files in os.walk(path, topdown=False):
                    for name in files:
                        _unlink_holding(os.path.join(directory, name), held)
                    os.rmdir(directory)
            else:
                _unlink_holding(path, held)
        except FileNotFoundError:
            pass
        finally:
            self._free_later(held)
        fsync_dir(os.path.dirname(path))

    def wait(self) -> None:
        """Block until the space of everything removed so far is freed."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _free_later(self, fds: list[int]) -> None:
        if not fds:
            return
        previous = self._thread
        self._thread = threading.Thread(target=_close_all, args=(fds, previous), name="checkpoint-reclaim")
        self._thread.start()


def _unlink_holding(path: str, held: list[int]) -> None:
    try:
        held.append(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)))
    except FileNotFoundError:
        return
    except OSError:  # not openable (a symlink, a socket, no read permission): unlinked the slow way
        pass
    os.unlink(path)


def _close_all(fds: list[int], previous: threading.Thread | None) -> None:
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:  # never urgent: yield the CPU to training (Linux: a thread's nice value is its own)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
    if previous is not None:
        previous.join()  # one freeing at a time: they compete for the same disk
    for fd in fds:
        try:
            os.close(fd)
        except OSError as e:  # the name is gone already; nothing is lost
            log.warning("Freeing a deleted checkpoint file failed: %s", e)
