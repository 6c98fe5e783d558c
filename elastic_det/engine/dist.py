"""Process group from the torchrun environment, collectives the trainer needs, and a parent-death watchdog.

The small collectives (``any_rank``, ``any_rank_each``, ``mean_over_ranks``) run inside the region that
``set_watch`` installs (``PreemptionFlag.watch``): a rank told to stop while one of them waits for a peer
that is gone exits at once instead of waiting for the process-group timeout. ``is_peer_lost`` recognises
the error a collective raises when its peer's connection closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from ..config.schema import DistConfig
from ..errors import UserError
from ..process import die_with_parent, is_warm_child

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    restart_count: int  # TORCHELASTIC_RESTART_COUNT: how many times the agent restarted the workers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: DistConfig) -> DistInfo:
    """Join the process group described by torchrun's environment (a single process when there is none)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        forked_children_die_with_parent()
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if rank > 0:
            wait_for_store(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                           cfg.timeout_seconds)
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_seconds))
    if _agent_hosts_store():
        log.warning(
            "TORCHELASTIC_USE_AGENT_STORE=True: workers share the agent's rendezvous store, which makes "
            "restarts hang on this torch. Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment of "
            "every torchrun agent (the launch/ scripts do)."
        )
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return DistInfo(rank, world_size, local_rank, device, restarts)


def wait_for_store(host: str, port: str, timeout: float) -> bool:
    """Whether rank 0's store at ``host:port`` accepted a connection within ``timeout`` seconds.

    torch's store client backs off up to ~0.5 s after a refused connection, so a rank that asks before rank 0
    has opened the store (it was forked a moment earlier, or its node is faster) loses that on every restart.
    A plain connection every 10 ms costs nothing. Nothing to wait for (False) when torchrun's agent hosts the
    store (``TORCHELASTIC_USE_AGENT_STORE``) or no address is given; after ``timeout`` the process group's
    own connection attempt reports the failure.
    """
    if not host or not port.isdigit() or _agent_hosts_store():
        return False
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def _agent_hosts_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


_watch: Callable[[str], contextlib.AbstractContextManager] | None = None


def set_watch(watch: Callable[[str], contextlib.AbstractContextManager] | None) -> None:
    """The context the small collectives run in (``PreemptionFlag.watch``: a stuck rank stops on a signal)."""
    global _watch
    _watch = watch


def watched(what: str) -> contextlib.AbstractContextManager:
    """A region of the main thread that must end soon after a stop signal (see ``preemption``)."""
    return _watch(what) if _watch is not None else contextlib.nullcontext()


_PEER_LOST_MARKERS = (
    "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
    "Socket Timeout", "NCCL communicator was aborted", "ncclRemoteError", "ncclSystemError",
)


def is_peer_lost(error: BaseException) -> bool:
    """True for the errors a collective raises when a peer is gone (gloo: its connection closed; nccl: the
    communicator aborted; a ``torch.distributed`` backend or network error)."""
    if not dist.is_available():
        return False
    if isinstance(error, (dist.DistBackendError, dist.DistNetworkError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _PEER_LOST_MARKERS)


def peer_lost_detail(error: BaseException) -> str:
    """The first line of a backend error, without gloo's advice and source location."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split(" This is typically caused by")[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return f"{type(error).__name__}: {text}"


_fork_parent = 0
_fork_hook_installed = False


def forked_children_die_with_parent() -> None:
    """Make every child this process forks (the data-loader workers) die with it (Linux).

    A forked worker inherits the process group's sockets. When the trainer is SIGKILLed, workers that
    outlive it keep those sockets open, so its peers see no closed connection and wait in their
    collective until the workers notice the orphaning themselves (5 s in torch's DataLoader): that was
    most of the time a restart spent before anything restarted. ``PR_SET_PDEATHSIG`` lets the kernel kill
    them the moment their parent (the thread that forked them: the main thread, for our loaders) dies.
    """
    global _fork_hook_installed
    if _fork_hook_installed or not sys.platform.startswith("linux"):
        return
    _fork_hook_installed = True

    def before() -> None:
        global _fork_parent
        _fork_parent = os.getpid()

    def in_child() -> None:
        with contextlib.suppress(Exception):
            die_with_parent(signal.SIGKILL)
            if os.getppid() != _fork_parent:  # the parent died before prctl took effect
                os._exit(0)

    os.register_at_fork(before=before, after_in_child=in_child)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a MAX all-reduce)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    with watched("an all-reduce of flags"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def any_rank_each(flags: list[bool], device_flags: torch.Tensor | None = None) -> list[bool]:
    """Element-wise ``any_rank`` for several flags in one collective.

    ``device_flags`` (a 1-d integer tensor, on any device, computed there without a host read) are
    appended to ``flags``: the result holds both, and the only host read is the result's.
    """
    host = torch.tensor([int(f) for f in flags], dtype=torch.int64)
    if not dist.is_initialized():
        t = host if device_flags is None else torch.cat([host, device_flags.to("cpu", torch.int64)])
        return [bool(v) for v in t.tolist()]
    device = _collective_device()
    t = host.to(device) if device_flags is None else torch.cat([host.to(device),
                                                                 device_flags.to(device, torch.int64)])
    with watched("an all-reduce of flags"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]


def mean_over_ranks(values: dict[str, float | torch.Tensor], weight: float) -> dict[str, float]:
    """Weighted mean of scalars (numbers or 0-d tensors on any device) over ranks, in one all-reduce.

    ``weight`` is this rank's share of the global batch. The only host synchronisation is the final read.
    """
    names = sorted(values)
    device = _collective_device() if dist.is_initialized() else torch.device("cpu")
    parts = [torch.as_tensor(values[n]).detach().reshape(()).to(device, torch.float64) * weight for n in names]
    t = torch.stack([*parts, torch.tensor(float(weight), dtype=torch.float64, device=device)])
    with watched("an all-reduce of losses"):
        if dist.is_initialized():
            dist.all_reduce(t)
        totals = t.tolist()
    return {n: totals[i] / totals[-1] if totals[-1] else 0.0 for i, n in enumerate(names)}


def is_main() -> bool:
    """Rank 0 of the process group (or a single process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def local_main_first(build: Callable[[], T], local_rank: int) -> T:
    """``build()`` on each node's local rank 0 first (it may create files the others then read), then on
    the other ranks. An error on any rank's first build reaches every rank as the same error (one
    all-gather), so all ranks end with the same message instead of a peer's broken connection."""
    result: T | None = None
    error: BaseException | None = None
    if local_rank == 0:
        try:
            result = build()
        except UserError as e:
            error = e
    if dist.is_initialized():
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else (type(error), str(error)))
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise error if error is not None else first[0](first[1])
    elif error is not None:
        raise error
    return result if local_rank == 0 else build()


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def start_parent_watchdog(interval_s: float = 1.0) -> None:
    """Exit when the launching process (the torchrun agent) dies.

    torchrun puts workers in their own session, so a SIGKILLed agent leaves them training unseen. A daemon
    thread polls the parent PID; when the worker has been re-parented, it exits at once.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return
    if is_warm_child():  # the parent is the warm server; the client torchrun started watches the agent
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                log.error("The torchrun agent (pid %d) is gone; this worker stops.", parent)
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
