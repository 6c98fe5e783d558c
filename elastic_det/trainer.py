"""``train(cfg)``: config -> build -> restore -> Runner + hooks. The one place where the parts meet."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from . import dist, env_info
from .checkpoint.store import Checkpoint, CheckpointStore
from .config import Config, config_hash, diff, to_dict, to_yaml
from .data.build import build_dataset
from .data.loader import TrainSamples, build_train_loader, build_val_loader
from .data.plan import ElasticBatchPlan, aspect_groups, split_share
from .data.transforms import build_transforms
from .errors import CheckpointError, ConfigError, UserError
from .evaluation.coco_eval import format_table
from .evaluation.inference import evaluate
from .models.build import batch_dependent_layers, build_model
from .models.weights import load_model_state
from .preemption import PreemptionFlag
from .run_files import MetricsLog, RunFiles, setup_text_logging
from .runner.checkpoint_hook import CheckpointHook
from .runner.eval_hook import EvalHook
from .runner.logging_hooks import LoggerHook, TimerHook
from .runner.optim import LRSchedulerHook, OptimizerHook, build_optimizer, build_scheduler, restore_scheduler
from .runner.progress import Progress, StepSchedule
from .runner.runner import Runner
from .runner.trace_hook import TraceHook, next_attempt_path
from .storage import WorkDir, is_shared_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    """What ``elastic.batch_policy`` makes of the config at the current world size."""

    name: str
    global_batch_size: int
    lr: float

    def describe(self, cfg: Config, world_size: int) -> str:
        if self.name == "fixed_global":
            return (f"batch policy fixed_global: global batch {self.global_batch_size} at world size "
                    f"{world_size} (about {self.global_batch_size / world_size:.2f} samples per rank), "
                    f"lr {self.lr:g}; sample order and schedule do not depend on the world size")
        return (f"batch policy scale_lr: {cfg.data.samples_per_device} samples per rank x {world_size} ranks = "
                f"global batch {self.global_batch_size}; lr {cfg.optimizer.lr:g} x {self.global_batch_size}/"
                f"{cfg.data.global_batch_size} = {self.lr:g}")


def batch_policy(cfg: Config, world_size: int) -> BatchPolicy:
    if cfg.elastic.batch_policy == "fixed_global":
        if cfg.data.global_batch_size < world_size:
            raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size} is smaller than the world "
                              f"size {world_size}: every rank needs at least one sample per step.")
        return BatchPolicy("fixed_global", cfg.data.global_batch_size, cfg.optimizer.lr)
    if cfg.data.samples_per_device <= 0:
        raise ConfigError("elastic.batch_policy=scale_lr needs data.samples_per_device > 0 (the per-rank batch; "
                          "data.global_batch_size is then the batch that optimizer.lr was tuned for).")
    if cfg.train.max_epochs and not cfg.train.max_steps:
        raise ConfigError("elastic.batch_policy=scale_lr needs train.max_steps: its steps change size with the "
                          "world size, so train.max_epochs cannot be turned into a fixed number of steps.")
    size = cfg.data.samples_per_device * world_size
    return BatchPolicy("scale_lr", size, cfg.optimizer.lr * size / cfg.data.global_batch_size)


def train(cfg: Config, resume: str = "auto") -> bool:
    """Train to ``train.max_steps``; returns True when stopped by a preemption (after its checkpoint)."""
    info = dist.init_distributed(cfg.dist)
    dist.start_parent_watchdog()
    preempt = PreemptionFlag()
    preempt.install()
    try:
        return _train(cfg, resume, info, preempt)
    finally:
        dist.shutdown()


def _train(cfg: Config, resume: str, info: dist.DistInfo, preempt: PreemptionFlag) -> bool:
    work_dir = WorkDir(cfg.work_dir, cfg.checkpoint.storage_options)
    if info.is_main:
        work_dir.check_writable()
    files = RunFiles(work_dir, enabled=info.is_main)
    setup_text_logging(files, info.rank)
    metrics = MetricsLog(files)
    env = env_info.collect(info.world_size)
    log.info("Environment:\n%s", env_info.format_env(env))
    _warn_if_not_shared(cfg.work_dir, info)
    if info.is_main:
        work_dir.write_bytes_atomic("config.yaml", to_yaml(cfg).encode())

    torch.manual_seed(cfg.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    # data (local rank 0 prepares generated data first so the ranks of a node don't race to make it)
    if info.local_rank == 0:
        train_set = build_dataset(cfg.data, "train")
    dist.barrier()
    if info.local_rank != 0:
        train_set = build_dataset(cfg.data, "train")
    policy = batch_policy(cfg, info.world_size)
    group_ids = aspect_groups(train_set.aspect_ratios()) if cfg.data.group_by_aspect_ratio else None
    plan = ElasticBatchPlan(len(train_set), cfg.seed, cfg.data.drop_last, group_ids=group_ids,
                            group_batch_size=policy.global_batch_size if group_ids else None)
    steps_per_epoch = plan.batches_per_epoch(policy.global_batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(f"The training set has {len(train_set)} images, fewer than one global batch "
                          f"({policy.global_batch_size}) with data.drop_last=true.")
    max_steps = cfg.train.max_steps or cfg.train.max_epochs * steps_per_epoch

    # model, optimizer, schedule
    if cfg.model.norm == "sync_bn" and info.distributed and info.device.type == "cpu":
        raise ConfigError("model.norm=sync_bn needs CUDA (SyncBatchNorm does not run on CPU/gloo); use "
                          "group_norm or frozen_bn on CPU.")
    model = build_model(cfg.model, train_set.num_classes).to(info.device)
    if cfg.model.load_from:
        _load_weights(model, cfg)
    bn = batch_dependent_layers(model)
    if bn:
        level = logging.WARNING if info.distributed else logging.INFO
        log.log(level, "%d BatchNorm layers train on per-rank statistics (%s, ...): results depend on the "
                "per-device batch, so they change with the world size. Use model.norm=frozen_bn, sync_bn or "
                "group_norm for a world-size-invariant run.", len(bn), bn[0])
    optimizer = build_optimizer(cfg.optimizer, model, policy.lr)
    scheduler = build_scheduler(cfg.schedule, optimizer, max_steps)
    scaler, amp_dtype = _amp(cfg.train.amp, info.device)

    # restore
    store = CheckpointStore(work_dir, keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                            keep_best=cfg.checkpoint.keep_best,
                            on_event=lambda e: metrics.event(e.pop("event"), e.pop("step", -1), **e))
    checkpoint = _find_checkpoint(store, resume, info)
    progress = Progress(seed=cfg.seed)
    hook_states: dict[str, Any] = {}
    if checkpoint is not None:
        progress, hook_states = _restore(checkpoint, cfg, model, optimizer, scheduler, scaler, policy)

    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                        find_unused_parameters=cfg.model.find_unused_parameters)

    # data order from the cursor on: this rank's share of every global step
    schedule = StepSchedule(plan, len(train_set), policy.global_batch_size, cfg.data.drop_last, progress)
    samples = TrainSamples(train_set, build_transforms(cfg.data.train_transforms, train=True), cfg.seed)
    shares = ((s.epoch, split_share(s.indices, info.rank, info.world_size))
              for s in map(schedule.at, range(progress.global_step, max_steps)))
    batches = build_train_loader(samples, shares, cfg.data.num_workers)

    # hooks
    logger = LoggerHook(metrics, cfg.log.interval, cfg.log.progress_bar,
                        files.local_path("tensorboard") if cfg.log.tensorboard else None, info.is_main)
    hooks = [OptimizerHook(cfg.optimizer.clip_grad_norm), LRSchedulerHook(scheduler), TimerHook(), logger]
    if cfg.data.trace and info.is_main:
        existing = work_dir.listdir("trace")
        hooks.append(TraceHook(files, next_attempt_path(existing), train_set.image_ids))
    if cfg.train.validate:
        hooks.append(_eval_hook(cfg, info, metrics, logger))
    hooks.append(CheckpointHook(store, cfg.checkpoint, preempt, metrics, files, build_state=_build_state,
                                meta={"config_hash": config_hash(cfg)}, is_main=info.is_main))

    runner = Runner(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, schedule=schedule,
                    batches=batches, hooks=hooks, dist_info=info, progress=progress, max_steps=max_steps,
                    micro_batch_size=cfg.data.micro_batch_size, amp_dtype=amp_dtype,
                    meta={"config": to_yaml(cfg), "env": env})
    runner.load_hook_states(hook_states)

    start_fields = {"world_size": info.world_size, "restart_count": info.restart_count,
                    "batch_policy": policy.name, "global_batch_size": policy.global_batch_size, "lr": policy.lr,
                    "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch, "max_steps": max_steps}
    log.info("%s", policy.describe(cfg, info.world_size))
    log.info("Start at global step %d (epoch %d, step %d of %d in it), world size %d, restart %d",
             progress.global_step, progress.epoch, progress.step_in_epoch, steps_per_epoch, info.world_size,
             info.restart_count)
    if info.is_main:
        if checkpoint is None:
            metrics.event("start", progress.global_step, **start_fields)
        else:
            changes = diff(_saved_config(checkpoint), to_dict(cfg))
            for line in changes:
                log.info("Config changed since the checkpoint: %s", line)
            metrics.event("resume", progress.global_step, checkpoint=checkpoint.location,
                          config_changes=changes, **start_fields)
    try:
        runner.train()
        if runner.stop_reason is None and info.is_main:
            metrics.event("done", runner.progress.global_step, world_size=info.world_size)
    finally:
        if info.is_main:
            files.close()
    return runner.stop_reason == "preempt"


def _build_state(runner: Runner) -> dict[str, Any]:
    """Everything a resume needs, as tensors and plain data: loadable with ``weights_only=True``."""
    return {
        "model": runner.unwrapped_model.state_dict(),
        "optimizer": runner.optimizer.state_dict(),
        "scheduler": runner.scheduler.state_dict(),
        "scaler": runner.scaler.state_dict() if runner.scaler is not None else {},
        "progress": runner.progress.state_dict(),
        "hooks": runner.hook_states(),
        "meta": runner.meta,
    }


def _find_checkpoint(store: CheckpointStore, resume: str, info: dist.DistInfo) -> Checkpoint | None:
    """Rank 0 decides which checkpoint (falling back past broken ones); the others load that one."""
    if resume == "none":
        return None
    choice: tuple[str, str] | None = None
    checkpoint = None
    if info.is_main:
        try:
            checkpoint = store.load_latest() if resume == "auto" else store.load(resume)
            choice = ("ok", checkpoint.location) if checkpoint is not None else None
        except UserError as e:
            choice = ("error", str(e))
            dist.broadcast_object(choice)
            raise
    choice = dist.broadcast_object(choice)
    if choice is None:
        return None
    if choice[0] == "error":
        raise CheckpointError(choice[1])
    return checkpoint if info.is_main else store.load(choice[1])


def _restore(checkpoint: Checkpoint, cfg: Config, model, optimizer, scheduler, scaler,
             policy: BatchPolicy) -> tuple[Progress, dict[str, Any]]:
    state = checkpoint.state
    missing = [k for k in ("model", "optimizer", "scheduler", "progress") if k not in state]
    if missing:
        raise CheckpointError(f"Checkpoint {checkpoint.location} lacks {', '.join(missing)}: it is not a "
                              "training checkpoint (use model.load_from for weights only).")
    load_model_state(model, state["model"], checkpoint.location)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"Checkpoint {checkpoint.location}: optimizer state does not fit "
                              f"optimizer.type={cfg.optimizer.type}: {e}") from None
    restore_scheduler(scheduler, state["scheduler"], policy.lr)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    progress = Progress.from_state_dict(state["progress"])
    if progress.seed != cfg.seed:
        log.warning("seed %d differs from the checkpoint's %d: the data order changes from here on",
                    cfg.seed, progress.seed)
        progress.seed = cfg.seed
    log.info("Resumed from %s at global step %d", checkpoint.location, progress.global_step)
    return progress, state.get("hooks", {})


def _saved_config(checkpoint: Checkpoint) -> dict[str, Any]:
    from omegaconf import OmegaConf

    text = checkpoint.state.get("meta", {}).get("config", "")
    return OmegaConf.to_container(OmegaConf.create(text)) if text else {}


def _load_weights(model: torch.nn.Module, cfg: Config) -> None:
    store = CheckpointStore(WorkDir(os.path.dirname(cfg.model.load_from) or ".", cfg.checkpoint.storage_options))
    checkpoint = store.load(cfg.model.load_from)
    weights = checkpoint.state.get("model", checkpoint.state)
    load_model_state(model, weights, cfg.model.load_from)
    log.info("Loaded weights from %s (load_from: weights only, training starts at step 0)", cfg.model.load_from)


def _amp(mode: str, device: torch.device) -> tuple[torch.amp.GradScaler | None, torch.dtype | None]:
    if mode == "none":
        return None, None
    if mode == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs CUDA (GradScaler); on CPU use train.amp=bf16.")
        return torch.amp.GradScaler("cuda"), torch.float16
    return None, torch.bfloat16


def _eval_hook(cfg: Config, info: dist.DistInfo, metrics: MetricsLog, logger: LoggerHook) -> EvalHook:
    val_set = build_dataset(cfg.data, "val")
    loader = build_val_loader(val_set, build_transforms(cfg.data.val_transforms, train=False), info.rank,
                              info.world_size, cfg.data.val_batch_size, cfg.data.num_workers)

    def run(model: torch.nn.Module) -> dict[str, float] | None:
        return evaluate(model, val_set, loader, info.device, cfg.train.amp)

    return EvalHook(run, cfg.train.eval_interval, metrics, format_table, on_metrics=logger.log_val)


def _warn_if_not_shared(url: str, info: dist.DistInfo) -> None:
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(info.world_size)))
    if (nodes > 1 or info.world_size > local_world) and not is_shared_path(url):
        log.warning("work_dir %s looks like a node-local path, but this run spans several nodes: every node "
                    "must see the same work dir (a shared file system or an object store such as s3://), or "
                    "resume will not find the other nodes' checkpoints.", url)
