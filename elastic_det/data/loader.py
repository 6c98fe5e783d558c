"""Data loaders driven by the batch plan: each loader batch is this rank's share of one global step.

Samples are addressed as ``(epoch, index)`` and augmented with torch's generator seeded from
``(seed, epoch, index)``, so a sample looks the same whichever worker or rank loads it, and no RNG state
has to be checkpointed. Workers do not react to preemption signals (see ``_worker_signals``); only the
main process does.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import DataError, StorageUnavailableError

_IGNORED_IN_WORKERS = (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample: a 64-bit hash of ``(seed, epoch, index)``."""
    state = np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(1, dtype=np.uint64)
    return int(state[0])


class TrainSamples(torch.utils.data.Dataset):
    """``samples[(epoch, index)] -> (image, target)``: ``dataset[index]`` through ``transforms``.

    The image is a plain float tensor (CHW); the target holds plain tensors ``boxes`` (XYXY, float32) and
    ``labels`` (int64), ``image_id`` (int) and, for datasets with masks, ``masks`` ((n, h, w) uint8).
    """

    def __init__(self, dataset: Any, transforms: Callable, seed: int):
        self.dataset = dataset
        self.transforms = transforms
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            image, target = self.transforms(*self.dataset[index])
        out = {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
               "image_id": int(target["image_id"])}
        if "masks" in target:
            out["masks"] = target["masks"].as_subclass(torch.Tensor)
        return image.as_subclass(torch.Tensor), out


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images of different sizes stay a list, as torchvision detectors take them."""
    return [image for image, _ in batch], [target for _, target in batch]


def build_train_loader(samples: TrainSamples, step_indices: Iterable[tuple[int, list[int]]],
                       num_workers: int, pin_memory: bool = False) -> DataLoader:
    """One loader batch per step: ``step_indices`` yields ``(epoch, this rank's indices)`` in step order.

    ``step_indices`` is consumed lazily (workers prefetch a few steps ahead); it may be infinite. The
    loader can be iterated once.
    """
    return _DataLoader(samples, batch_sampler=_StepBatches(step_indices, samples.dataset), num_workers=num_workers,
                       collate_fn=detection_collate, pin_memory=pin_memory, persistent_workers=False,
                       worker_init_fn=_worker_signals if num_workers > 0 else None)


def build_val_loader(dataset: Any, transforms: Callable, rank: int, world_size: int, batch_size: int,
                     num_workers: int, pin_memory: bool = False) -> DataLoader:
    """This rank's part of the evaluation set: indices ``rank, rank + world_size, ...`` in batches."""
    indices = list(range(rank, len(dataset), world_size))
    batches = [(0, indices[k:k + batch_size]) for k in range(0, len(indices), batch_size)]
    return _DataLoader(TrainSamples(dataset, transforms, seed=0), batch_sampler=_StepBatches(batches, dataset),
                       num_workers=num_workers, collate_fn=detection_collate, pin_memory=pin_memory,
                       persistent_workers=False, worker_init_fn=_worker_signals if num_workers > 0 else None)


class _StepBatches:
    """Loader batches ``[(epoch, index), ...]``; datasets with remote images get each batch's images
    fetched into the node-local cache ``dataset.prefetch_steps`` batches before the batch is handed out."""

    def __init__(self, step_indices: Iterable[tuple[int, list[int]]], dataset: Any):
        self.step_indices = step_indices
        self.dataset = dataset

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        ahead = getattr(self.dataset, "prefetch_steps", 0)
        window: deque[tuple[int, list[int]]] = deque()
        try:
            for epoch, indices in self.step_indices:
                if ahead > 0:
                    self.dataset.prefetch(indices)
                window.append((epoch, indices))
                if len(window) > ahead:
                    epoch, indices = window.popleft()
                    yield [(epoch, i) for i in indices]
            for epoch, indices in window:
                yield [(epoch, i) for i in indices]
        finally:
            if ahead > 0:
                self.dataset.stop_prefetch()  # fetches queued for batches that will not be loaded

    def __len__(self) -> int:
        return len(self.step_indices)  # type: ignore[arg-type]


def _worker_signals(worker_id: int) -> None:
    """Keep a worker alive through preemption signals, which are meant for the main process.

    torchrun signals the trainer's whole process group and Slurm every process of the job, so workers
    see SIGTERM/SIGINT/SIGUSR1/SIGUSR2 too; dying would fail the step the main process is finishing.
    SIGINT and SIGUSR1/2 are ignored. SIGTERM is not simply ignored: the DataLoader (and
    multiprocessing at interpreter exit) stop workers with SIGTERM, and ignoring that hangs the exit. So
    SIGTERM is blocked and a thread exits the worker only when its parent, the main process, sent it.
    """
    for sig in _IGNORED_IN_WORKERS:
        signal.signal(sig, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: SIGTERM keeps its default action
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_parent_sigterm, args=(os.getppid(),), daemon=True,
                     name="sigterm-filter").start()


def _exit_on_parent_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            # Exit status 0: the parent asked for it, and torch reports any other status as a failure.
            os._exit(0)


class _DataLoader(DataLoader):
    """A DataLoader that re-raises a worker's DataError (or StorageUnavailableError) with its own message.

    DataLoader re-raises a worker exception as the same type with the worker's whole traceback as its
    message; the CLI prints these errors as one paragraph, so keep only the message itself.
    """

    def __iter__(self) -> Iterator:
        return _CleanDataErrors(super().__iter__())


class _CleanDataErrors:
    def __init__(self, iterator: Iterator):
        self._iterator = iterator

    def __iter__(self) -> _CleanDataErrors:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._iterator)
        except (DataError, StorageUnavailableError) as e:
            error_type = type(e)
            message = _worker_message(str(e), error_type)
            if message is None:
                raise
            # torch's re-raising frame holds the exception, whose traceback holds that frame: a cycle
            # that keeps the iterator, and so its workers, alive until garbage collection. Break it, and
            # raise the clean error outside this block so that no frame holds ``e`` either.
            e.__traceback__ = None
        raise error_type(message)

    def __len__(self) -> int:
        return len(self._iterator)


def _worker_message(text: str, error_type: type[Exception] = DataError) -> str | None:
    """The message of the worker's error inside the traceback that DataLoader re-raises, or None."""
    marker = f"{error_type.__module__}.{error_type.__qualname__}: "
    if marker not in text:
        return None
    return text.rsplit(marker, 1)[1].strip() + " (in a data-loader worker)"
