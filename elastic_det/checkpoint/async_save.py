"""Asynchronous checkpointing: the training loop blocks only for a CPU snapshot of the state.

The snapshot is written and committed by :class:`CheckpointStore` in a background thread. At most one save
is in flight: the next ``submit`` waits for it, so checkpoints commit in step order and the snapshot
buffers of a finished save can be reused by the next one (a fresh 300 MB allocation costs more in page
faults than the copy itself).
"""

from __future__ import annotations

import copy
import ctypes
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .manifest import Manifest
from .store import CheckpointStore

OnDone = Callable[[Manifest | None, BaseException | None, float], None]

DEFER_MIN_BYTES = 1 << 20
"""CPU tensors this large are copied by the save thread, before the next optimizer step (see AsyncSaver)."""

WRITER_NICENESS = 19
"""How much lower the save thread's CPU priority is than training's once its copies are done (Linux): the
lowest, so that a CPU-bound loop loses as little as possible while a save writes (at 10 its steps ran
1.1-1.3x slower); such a save takes longer to commit, and the next save waits for it."""


@dataclass
class DeferredCopy:
    """A tensor of the live state still to be copied into its snapshot buffer."""

    name: str
    source: torch.Tensor
    target: torch.Tensor
    version: int  # source._version when the snapshot was taken: an in-place change since then bumps it


class StateChangedError(RuntimeError):
    """A tensor of the state changed in place after ``submit`` but before the save thread copied it."""


_pending_copies: set[threading.Event] = set()  # one per save whose deferred copies are not done yet
_pending_lock = threading.Lock()
_fence_installed = False


def _fence(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Global optimizer step pre-hook: wait until every snapshot in progress has copied its tensors.

    Installed once and never removed: removing a hook from the save thread could mutate torch's hook
    dict while ``optimizer.step`` iterates over it. Idle, it costs one lock per step.
    """
    with _pending_lock:
        pending = list(_pending_copies)
    for copied in pending:
        copied.wait()


def _install_fence() -> None:
    global _fence_installed
    with _pending_lock:
        if not _fence_installed:
            register_optimizer_step_pre_hook(_fence)
            _fence_installed = True


def snapshot_to_cpu(state: dict, reuse: dict | None = None, defer: list[DeferredCopy] | None = None) -> dict:
    """A deep copy of ``state`` with every tensor copied into CPU memory that the copy owns.

    ``reuse`` is an earlier snapshot of the same structure: its tensors are overwritten in place where
    shape and dtype match, instead of allocating new ones (it must not be in use any more). CUDA tensors
    are copied into pinned memory asynchronously, then synchronised once. Tensors that appear several
    times (the same object) stay shared in the copy. With ``defer``, contiguous CPU tensors of at least
    :data:`DEFER_MIN_BYTES` get their buffer but are not copied: a :class:`DeferredCopy` is appended for
    :func:`copy_deferred` instead.
    """
    devices: set[torch.device] = set()
    with _one_intra_op_thread():
        out = _copy(state, reuse, {}, devices, defer, "")
    for device in devices:
        torch.cuda.synchronize(device)
    return out


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Copy on one thread: a memcpy is bandwidth-bound, and torch's parallel copy stalls whenever
    another core is busy (data-loader workers, a neighbour): measured 0.02 s vs 0.1-0.3 s for 335 MB."""
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


_ATOMIC = (int, float, bool, str, bytes, type(None))


def _copy(obj: Any, prev: Any, memo: dict[int, Any], devices: set[torch.device],
          defer: list[DeferredCopy] | None, name: str) -> Any:
    if type(obj) in _ATOMIC:  # immutable: nothing to copy (most leaves of a state that are not tensors)
        return obj
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = _copy_tensor(obj.detach(), prev, devices, defer, name)
        return memo[id(obj)]
    if isinstance(obj, dict):
        prev = prev if isinstance(prev, dict) else {}
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _copy(value, prev.get(key), memo, devices, defer, f"{name}.{key}" if name else str(key))
        if getattr(obj, "__dict__", None) and out is not obj:  # e.g. a state dict's _metadata
            out.__dict__.update(copy.deepcopy(obj.__dict__))
        return out
    if isinstance(obj, (list, tuple)):
        same = type(prev) is type(obj) and len(prev) == len(obj)
        items = [_copy(v, prev[i] if same else None, memo, devices, defer, f"{name}[{i}]")
                 for i, v in enumerate(obj)]
        if isinstance(obj, list):
            return items
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy.deepcopy(obj)


def _copy_tensor(t: torch.Tensor, prev: Any, devices: set[torch.device], defer: list[DeferredCopy] | None,
                 name: str) -> torch.Tensor:
    device = t.device.type
    if t.layout != torch.strided or t.is_quantized or device not in ("cpu", "cuda"):
        return t.to("cpu", copy=True) if device != "cpu" else t.clone()
    pinned = device == "cuda"
    reusable = (isinstance(prev, torch.Tensor) and not prev.is_cuda and prev.shape == t.shape
                and prev.dtype == t.dtype and prev.is_contiguous() and (not pinned or prev.is_pinned()))
    dst = prev if reusable else torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
    if defer is not None and not pinned and t.nbytes >= DEFER_MIN_BYTES and t.is_contiguous():
        defer.append(DeferredCopy(name, t, dst, t._version))
        return dst
    dst.copy_(t, non_blocking=pinned)
    if pinned:
        devices.add(t.device)
    return dst


def copy_deferred(copies: list[DeferredCopy]) -> None:
    """Copy each deferred tensor into its snapshot buffer; :class:`StateChangedError` when one of them
    changed in place since the snapshot was taken (the checkpoint would mix two steps)."""
    for item in copies:
        if item.source._version != item.version:
            raise StateChangedError(_changed(item))
        _memcpy(item.target, item.source)
        if item.source._version != item.version:
            raise StateChangedError(_changed(item))


def _changed(item: DeferredCopy) -> str:
    return (f"checkpoint.async: the state's tensor '{item.name}' changed in place before the save thread "
            f"copied it (outside optimizer.step, which waits for the copy); this save is refused rather than "
            f"mixing two steps. Set checkpoint.async=false for this model.")


def _memcpy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """One plain memcpy on this thread, without the GIL (ctypes releases it) and without torch's intra-op
    thread pool, which the training thread is using at the same time."""
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.nbytes)


def _copies_done(copied: threading.Event) -> None:
    copied.set()
    with _pending_lock:
        _pending_copies.discard(copied)


def _set_niceness(native_id: int | None, niceness: int) -> None:
    """Set a thread's nice value (Linux: a thread's nice value is its own). Raising it back needs privileges
    (root, CAP_SYS_NICE or RLIMIT_NICE): without them it stays where it is."""
    if native_id is not None and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, native_id, niceness)
        except OSError:
            pass


class AsyncSaver:
    """Writes checkpoints in a background thread; one in flight at a time.

    With ``reuse_buffers`` the snapshot of a finished save is kept and overwritten by the next one: one
    extra copy of the state stays in host memory between saves, in exchange for a much shorter block.

    With ``defer_copies`` ``submit`` copies only the small tensors (and everything that is not a tensor);
    the large CPU tensors (weights, optimizer moments) are copied by the save thread while the loop runs
    the next forward and backward, which do not change them. The next ``optimizer.step()`` (any optimizer:
    a global step pre-hook) waits until those copies are done, and a tensor found changed in place before
    its copy (``Tensor._version``) refuses the save with :class:`StateChangedError` instead of mixing two
    steps. Once its copies are done, the save thread lowers its CPU priority (``WRITER_NICENESS``).
    """

    def __init__(self, store: CheckpointStore, reuse_buffers: bool = True, defer_copies: bool = True):
        self.store = store
        self.reuse_buffers = reuse_buffers
        self.defer_copies = defer_copies
        self._thread: threading.Thread | None = None
        self._spare: dict | None = None
        self._callback_error: BaseException | None = None
        self._priority_lock = threading.Lock()
        self._awaited = False  # the training thread waits for the save in flight: it must not yield any more

    def submit(self, step: int, state: dict, meta: dict, on_done: OnDone) -> None:
        """Snapshot ``state`` (blocking, except the deferred copies) and save it in the background.

        Waits for the save in flight first. ``on_done(manifest, error, seconds)`` is called from the
        background thread; ``seconds`` runs from the start of the snapshot to the commit (or failure).
        An error while taking the snapshot is raised here.
        """
        self.wait()
        start = time.perf_counter()
        self._awaited = False
        deferred: list[DeferredCopy] | None = [] if self.defer_copies else None
        snapshot = snapshot_to_cpu(state, reuse=self._spare, defer=deferred)
        self._spare = None
        copied = threading.Event()
        if deferred:
            _install_fence()
            with _pending_lock:
                _pending_copies.add(copied)
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-step-{step}",
                                        args=(step, snapshot, deferred or [], copied, dict(meta), on_done, start))
        try:
            self._thread.start()
        except BaseException:
            _copies_done(copied)
            raise

    def _run(self, step: int, snapshot: dict, deferred: list[DeferredCopy], copied: threading.Event, meta: dict,
             on_done: OnDone, start: float) -> None:
        manifest, error = None, None
        try:
            try:
                copy_deferred(deferred)
            finally:
                _copies_done(copied)
            with self._priority_lock:
                if not self._awaited:
                    _set_niceness(threading.get_native_id(), WRITER_NICENESS)
            manifest = self.store.save(step, snapshot, meta)
        except BaseException as e:  # reported to on_done; the training thread decides what to do
            error = e
        if self.reuse_buffers:
            self._spare = snapshot
        try:
            on_done(manifest, error, time.perf_counter() - start)
        except BaseException as e:  # a bug in the callback: raised in the training thread by wait()
            self._callback_error = e

    def wait(self) -> None:
        """Block until no save is in flight (a no-op when called from the save thread itself).

        The save thread gets the caller's CPU priority back first where the process may raise priorities
        (a preemption save must not wait for a writer that yields to everything else on the machine).
        Raises what an ``on_done`` callback raised (a bug: it must not vanish with the save thread).
        """
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            if thread.is_alive():
                with self._priority_lock:
                    self._awaited = True
                    if hasattr(os, "getpriority"):
                        _set_niceness(thread.native_id, os.getpriority(os.PRIO_PROCESS, 0))
            thread.join()
            error, self._callback_error = self._callback_error, None
            if error is not None:
                raise error

    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
