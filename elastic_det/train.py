"""``python -m elastic_det.train [CONFIG] [--work-dir PATH_OR_URL] [--resume auto|none|PATH] ...``

Runs as one process or under torchrun (any ``--nnodes`` / ``--nproc-per-node``). Exit codes (see
``errors.py``): 0 done, 2 bad input, 3 another writer owns the work dir, 75 storage/network outage
(retryable), 143 preempted after a checkpoint (restart to resume).
"""

from __future__ import annotations

import argparse
import sys

from .errors import PREEMPTED_EXIT_CODE, ElasticDetError
from .launch import exit_status
from .process import exit_now  # how this module ends: by then every file is closed, the workers stopped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m elastic_det.train", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded shapes/tiny-FCOS default)")
    p.add_argument("--work-dir", help="local path or fsspec URL (s3://bucket/run); overrides work_dir")
    p.add_argument("--resume", default="auto",
                   help="auto (newest committed checkpoint in the work dir; default), none, or a checkpoint path")
    p.add_argument("--seed", type=int, help="overrides seed")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    p.add_argument("--no-validate", action="store_true", help="skip evaluation during and after training")
    p.add_argument("--amp", action="store_true", help="mixed precision: fp16 on CUDA, bf16 on CPU")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. train.max_steps=100 data.global_batch_size=32")
    return p.parse_args(argv)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    overrides = list(args.cfg_options)
    if args.work_dir:
        overrides.append(f"work_dir={args.work_dir}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.deterministic:
        overrides.append("train.deterministic=true")
    if args.no_validate:
        overrides.append("train.validate=false")
    return overrides


def main(argv: list[str] | None = None) -> int:
    """The training entry point; exceptions other than ours are recorded for torchelastic (``@record``)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_main)(argv)


def _main(argv: list[str] | None) -> int:
    from .config.schema import load_config

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides_from_args(args))
        if args.amp:
            from .models.amp import default_mode

            cfg.train.amp = default_mode()
        from .engine.trainer import train
        from .goodput.ledger import Ledger

        # the goodput ledger is a writer of the run's events; the engine itself knows nothing of it
        ledger = lambda files, info: Ledger(files, world_size=info.world_size)  # noqa: E731
        preempted = train(cfg, resume=args.resume, writers=[ledger])
    except ElasticDetError as e:
        print(f"elastic_det: error: {e}", file=sys.stderr)
        exit_status.report(e.exit_code, str(e))
        return e.exit_code
    return PREEMPTED_EXIT_CODE if preempted else 0


if __name__ == "__main__":
    # Under the supervisor a warm server has torch and the trainer imported already: this process only
    # hands its place over to a child of that server (launch/warm_client.py) and runs the trainer itself
    # when there is none. Nothing above imports torch, so that the hand-over takes milliseconds.
    from .launch.warm_client import handoff
    from .process import import_modules

    handed = handoff("elastic_det.train:main", sys.argv[1:])
    if handed is None:
        import_modules(("torch", "torchvision", "elastic_det.engine.trainer"))
    exit_now(main() if handed is None else handed)
