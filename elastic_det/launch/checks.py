"""What ``elastic_det.supervise`` checks: the torch floor, the train command (pre-flight), and progress.

* The torch floor: the launch scripts pass torchrun ``--signals-to-handle`` (new in torch 2.10) and
  ``--shutdown-timeout`` (new in torch 2.12), also as ``PET_SIGNALS_TO_HANDLE`` / ``PET_SHUTDOWN_TIMEOUT``;
  an older torchrun rejects the flags with a usage error on every launch, or (as environment variables)
  silently ignores them. Checked against ``torch.__version__`` before anything starts.
* The pre-flight, before the first attempt, in this process: parse the train arguments, load the config,
  build the dataset indexes and probe the work dir, so that bad input stops the job before torchrun runs.
* Progress: the newest committed checkpoint step in the work dir, from the manifest listing alone.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from ..errors import ElasticDetError, UserError
from ..storage import WorkDir

if TYPE_CHECKING:
    from ..checkpoint.store import CheckpointStore

TORCH_FLOOR = (2, 12)
TORCHVISION_FLOOR = (0, 27)  # the torchvision release paired with TORCH_FLOOR
TRAIN_MODULE = "elastic_det.train"


class UnsupportedTorchError(UserError):
    """The installed torch is older than the torchrun flags the launchers use: final."""


class TrainUsageError(UserError):
    """The train arguments inside the command do not parse: final."""


def parse_version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch(version: str | None = None) -> None:
    """Raise :class:`UnsupportedTorchError` when ``version`` (default: the installed torch) is too old."""
    if version is None:  # the installed distribution's version: importing torch here would take seconds
        try:
            version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            raise UnsupportedTorchError("torch is not installed in this environment (python: "
                                        f"{sys.executable}); install the project with pip first.") from None
    if parse_version(version) < TORCH_FLOOR:
        need = ".".join(map(str, TORCH_FLOOR))
        raise UnsupportedTorchError(
            f"torch {version} is installed, but the launchers need torch >= {need}: they pass torchrun "
            f"--signals-to-handle (torch >= 2.10) and --shutdown-timeout (torch >= 2.12), which an older "
            f"torchrun rejects or ignores. Install torch>={need} and torchvision>="
            f"{'.'.join(map(str, TORCHVISION_FLOOR))} (pyproject.toml declares the same floor).")


def find_train_args(command: list[str]) -> list[str] | None:
    """The arguments of ``elastic_det.train`` inside ``command`` (torchrun, python -m, or the console
    script), or None when the command does not run it."""
    for i, token in enumerate(command):
        if token == TRAIN_MODULE and i > 0 and command[i - 1] in ("-m", "--module"):
            return command[i + 1:]
        if token.endswith(("elastic_det/train.py", "elastic-det-train")):
            return command[i + 1:]
    return None


@dataclass
class Target:
    """What the supervisor watches: the work dir (None when the command is not a training run it knows)."""

    work_dir: WorkDir | None
    train_args: list[str] | None


def resolve(command: list[str], work_dir: str | None, preflight: bool) -> Target:
    """Find the work dir of ``command`` and, with ``preflight``, check its config, data and work dir.

    Raises the :class:`ElasticDetError` of the first problem (a :class:`UserError` is final; an
    :class:`InfrastructureError` is worth another try).
    """
    train_args = find_train_args(command)
    if train_args is None or (work_dir and not preflight):
        return Target(WorkDir(work_dir) if work_dir else None, train_args)
    from ..config.schema import load_config
    from ..train import overrides_from_args, parse_args

    try:
        args = parse_args(train_args)
    except SystemExit as e:  # argparse printed the usage and the problem
        raise TrainUsageError(f"The {TRAIN_MODULE} arguments in the command do not parse: "
                              f"{' '.join(train_args)}") from e
    cfg = load_config(args.config, overrides_from_args(args))
    target = Target(WorkDir(work_dir or cfg.work_dir, cfg.checkpoint.storage_options,
                            timeout=cfg.checkpoint.timeout_seconds), train_args)
    if preflight:
        from ..data.build import build_dataset

        build_dataset(cfg.data, "train")
        if cfg.train.validate:
            build_dataset(cfg.data, "val")
        target.work_dir.check_writable()
    return target


def progress_store(work_dir: WorkDir | None) -> CheckpointStore | None:
    """The store whose manifests tell progress (one per run: it remembers the manifests it has read)."""
    from ..checkpoint.store import CheckpointStore

    return CheckpointStore(work_dir) if work_dir is not None else None


def committed_step(store: CheckpointStore | None) -> int | None:
    """The newest committed checkpoint step (0 when none), None when the work dir cannot be listed.

    Lists the manifests (as discovery does before verifying); no checkpoint data is read.
    """
    if store is None:
        return None
    try:
        steps = store.committed_steps()
    except (ElasticDetError, OSError):
        return None
    return steps[-1] if steps else 0


def work_dir_hint(command: list[str], work_dir: str | None) -> WorkDir | None:
    """The work dir named by ``--work-dir`` (the supervisor's, else the train command's), for logging a
    pre-flight that failed before the config could say; None when neither names one."""
    train_args = find_train_args(command) or []
    for i, arg in enumerate(train_args):
        if arg.startswith("--work-dir="):
            work_dir = work_dir or arg.split("=", 1)[1]
        elif arg == "--work-dir" and i + 1 < len(train_args):
            work_dir = work_dir or train_args[i + 1]
    try:
        return WorkDir(work_dir) if work_dir else None
    except Exception:  # an unusable URL: nothing to log into
        return None


def rendezvous_mode(command: list[str], environ: dict[str, str]) -> str:
    """Which rendezvous store the torchrun command uses, and what losing a node costs with it (one line for
    the supervisor's log). Flags win over torchrun's ``PET_*`` environment variables, as in torchrun."""
    def option(name: str) -> str:
        flags = (f"--{name}", f"--{name.replace('-', '_')}")
        value = environ.get(f"PET_{name.upper().replace('-', '_')}", "")
        own = command[:command.index(TRAIN_MODULE)] if TRAIN_MODULE in command else command
        for i, arg in enumerate(own):
            if arg in flags and i + 1 < len(own):
                value = own[i + 1]
            elif arg.startswith(tuple(f"{f}=" for f in flags)):
                value = arg.split("=", 1)[1]
        return value

    if "--standalone" in command or environ.get("PET_STANDALONE"):
        return "rendezvous: standalone (one host; the store lives in this agent)"
    backend, endpoint = option("rdzv-backend") or "static", option("rdzv-endpoint") or "?"
    conf = dict(item.split("=", 1) for item in option("rdzv-conf").split(",") if "=" in item)
    if backend.startswith("etcd"):
        return f"rendezvous: external store (etcd at {endpoint}): losing any node costs one rendezvous round"
    if backend == "c10d" and conf.get("is_host", "").lower() in ("false", "0", "no"):
        return (f"rendezvous: external store at {endpoint} (is_host=false): losing any node costs one rendezvous "
                "round; losing the store stops every torchrun until it is back, then the supervisors meet again")
    return (f"rendezvous: first-node mode ({backend} store inside the agent on the host of {endpoint}): losing "
            "that node stops every node until a store is back there; any other node costs one rendezvous round")
