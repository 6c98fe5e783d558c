"""Config: YAML files with ``_base_`` inheritance, merged by OmegaConf, checked against a dataclass schema.

The dataclass defaults below *are* the embedded default (a small FCOS on the synthetic shapes set);
``configs/default.yaml`` is its YAML twin. ``load_config`` is the only entry point:

    cfg = load_config("configs/bccd/fcos_tiny.yaml", ["optimizer.lr=0.01", "train.max_steps=100"])

Errors name the file or key at fault: an unknown key comes with its full path and the closest valid key,
a wrong type with the key, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from .output import config_hash, diff, to_dict, to_public_dict, to_yaml, yaml_key
from .ranges import RANGES
from .redaction import REDACTED
from .rules import MASK_MODELS, check_rules

__all__ = ["Config", "ConfigError", "config_hash", "diff", "get_key", "load_config", "to_dict",
           "to_public_dict", "to_yaml"]


def _key(name: str) -> dict[str, str]:
    """Field metadata for a YAML key that is not a valid Python name (``checkpoint.async``)."""
    return {"key": name}


@dataclass
class ShapesConfig:
    """The synthetic shapes set: generated on first use into ``cache_dir`` and reused after."""

    num_train: int = 2000
    num_val: int = 200
    image_size: int = 128
    max_objects: int = 4
    seed: int = 0
    cache_dir: str = "~/.cache/elastic_det"


@dataclass
class TransformConfig:
    """Augmentation, built with ``torchvision.transforms.v2`` (boxes transformed by the library)."""

    min_size: list[int] = field(default_factory=list)  # shortest side, one drawn per sample; [] = keep size
    max_size: int = 1333  # cap on the longest side when resizing
    flip_prob: float = 0.0
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off


@dataclass
class DataCacheConfig:
    """Node-local cache: annotation indexes (all datasets) and the images of remote roots (``s3://...``)."""

    dir: str = "~/.cache/elastic_det/data"  # local disk shared by the ranks of a node; "" = no cache
    max_gb: float = 100.0  # bound on cached images (least recently used evicted); 0 = read images through
    prefetch_steps: int = 2  # global steps whose images are fetched ahead (remote roots)
    prefetch_threads: int = 16  # threads of the main process that fetch them


@dataclass
class DataConfig:
    type: str = "shapes"  # shapes | coco | voc | package.module:function
    root: str = ""  # COCO: image folder; VOC: dataset root (Annotations/, JPEGImages/, ImageSets/)
    train_ann: str = ""  # COCO annotation file for training
    val_ann: str = ""  # COCO annotation file for evaluation
    train_split: str = "train"  # VOC: ImageSets/Main/<split>.txt
    val_split: str = "val"
    classes: list[str] = field(default_factory=list)  # VOC class names; [] = discovered from the annotations
    val_root: str = ""  # COCO: image folder of the val split when it differs from root
    # root, val_root, train_ann, val_ann may be URLs (s3://bucket/prefix): read through cache below
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for data URLs (endpoint, ...)
    cache: DataCacheConfig = field(default_factory=DataCacheConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    filter_empty: bool = True  # drop training images without boxes (they are always kept for evaluation)
    global_batch_size: int = 16
    micro_batch_size: int = 0  # per-device limit; a rank's share is split into micro-batches; 0 = no limit
    samples_per_device: int = 0  # batch_policy=scale_lr: per-rank batch (global_batch_size = the lr's reference)
    drop_last: bool = True  # drop the last partial global batch of an epoch
    group_by_aspect_ratio: bool = False  # group global batches by aspect ratio (wide vs tall)
    num_workers: int = 2
    val_batch_size: int = 8
    trace: bool = False  # rank 0 writes WORK_DIR/trace/attempt-K.jsonl, the ids of every global step
    masks: bool | None = None  # load COCO segmentations as instance masks; null = when model.type predicts them
    train_transforms: TransformConfig = field(default_factory=lambda: TransformConfig(flip_prob=0.5))
    val_transforms: TransformConfig = field(default_factory=TransformConfig)


@dataclass
class ModelConfig:
    type: str = "tiny_fcos"  # tiny_fcos | tiny_retinanet | tiny_mask_rcnn | faster_rcnn_r50_fpn |
    # retinanet_r50_fpn | fcos_r50_fpn | ssdlite320_mobilenet_v3 | maskrcnn_resnet50_fpn |
    # maskrcnn_resnet50_fpn_v2 | package.module:function
    num_classes: int = 0  # 0 = from the dataset
    weights: str = ""  # torchvision weights name, e.g. FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    weights_backbone: str = ""  # e.g. ResNet50_Weights.IMAGENET1K_V1
    load_from: str = ""  # weights of a checkpoint or export to start from (fine-tuning)
    min_size: int = 128  # the detector's own resize (GeneralizedRCNNTransform)
    max_size: int = 128
    trainable_backbone_layers: int = 3
    norm: str = "auto"  # auto | frozen_bn | bn | sync_bn | group_norm (backbone; auto: torchvision's choice,
    # BatchNorm for the tiny models: not world-size invariant, use group_norm or frozen_bn for that)
    width: int = 64  # tiny models: FPN channels
    find_unused_parameters: bool = False


@dataclass
class OptimizerConfig:
    type: str = "adamw"  # sgd | adamw
    lr: float = 0.002  # for data.global_batch_size
    momentum: float = 0.9  # sgd
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad_norm: float = 10.0  # 0 = off


@dataclass
class ScheduleConfig:
    """Learning-rate schedule in global steps: linear warmup, then multistep, cosine or constant."""

    policy: str = "cosine"  # multistep | cosine | constant
    warmup_steps: int = 50
    warmup_factor: float = 0.001
    milestones: list[int] = field(default_factory=list)  # multistep, in global steps
    gamma: float = 0.1
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class TrainConfig:
    max_steps: int = 600  # global steps; 0 = use max_epochs
    max_epochs: int = 0
    amp: str = "none"  # none | fp16 (CUDA, GradScaler) | bf16 (autocast, CPU or CUDA)
    validate: bool = True
    eval_interval: int = 0  # evaluate every N global steps (0 = only at the end)
    deterministic: bool = False
    nonfinite: str = "stop"  # a NaN/inf loss: stop (exit 65) | skip (drop that step's update on every rank)
    nonfinite_patience: int = 10  # skip: stop after this many skipped steps in a row


@dataclass
class EmaConfig:
    """An exponential moving average of the weights, used for evaluation, ``elastic_det.test`` and exports."""

    enabled: bool = False
    decay: float = 0.9998  # per global step, once warmed up
    warmup_steps: int = 2000  # decay ramps as decay * (1 - exp(-updates / warmup_steps)); 0 = constant


@dataclass
class CheckpointConfig:
    interval: int = 200  # global steps; 0 = off
    interval_minutes: float = 0.0  # wall-clock bound on lost work; 0 = off
    keep_last: int = 2
    keep_best: str = ""  # metric to keep the best checkpoint by, e.g. bbox_mAP
    keep_every: int = 0  # also keep every K-th step
    async_save: bool = field(default=False, metadata=_key("async"))
    max_failures: int = 3  # consecutive failed saves before training stops
    timeout_seconds: float = 10.0  # one object-store request waits at most this (x4 with retries), then fails
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to fsspec (e.g. S3 endpoint)


@dataclass
class LogConfig:
    interval: int = 20  # global steps
    tensorboard: bool = False
    progress_bar: str = "auto"  # auto (when attached to a terminal) | always | never


@dataclass
class ElasticConfig:
    batch_policy: str = "fixed_global"  # fixed_global | scale_lr


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_seconds: float = 120.0  # collective timeout: a lost peer becomes a restart, not a hang


@dataclass
class Config:
    seed: int = 0
    work_dir: str = "work_dirs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        # data.masks: null is derived here, where the model type is known: the dataset builders only see
        # cfg.data, and the run's config.yaml then records what was loaded.
        if self.data.masks is None:
            self.data.masks = self.model.type in MASK_MODELS


CHOICES: dict[str, tuple[str, ...]] = {
    "train.amp": ("none", "fp16", "bf16"),
    "train.nonfinite": ("stop", "skip"),
    "optimizer.type": ("sgd", "adamw"),
    "schedule.policy": ("multistep", "cosine", "constant"),
    "model.norm": ("auto", "frozen_bn", "bn", "sync_bn", "group_norm"),
    "log.progress_bar": ("auto", "always", "never"),
    "elastic.batch_policy": ("fixed_global", "scale_lr"),
    "dist.backend": ("auto", "gloo", "nccl"),
}


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (or the embedded default when None), apply ``--cfg-options`` overrides, validate."""
    merged = OmegaConf.create({})
    if path is not None:
        merged = _load_with_bases(os.path.abspath(os.fspath(path)), chain=())
    if overrides:
        merged = OmegaConf.merge(merged, _parse_overrides(overrides))
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"Config {path or '(default)'}: cannot resolve interpolation: {e}") from None
    cfg = _build(Config, _drop_redacted(data or {}), prefix="")
    _check_values(cfg)
    return cfg


def _drop_redacted(value: Any) -> Any:
    """A run's config.yaml holds ``<redacted>`` for credentials: loading it again (``elastic_det.test``)
    leaves them out, so the standard AWS environment supplies them."""
    if isinstance(value, dict):
        return {k: _drop_redacted(v) for k, v in value.items() if v != REDACTED}
    return value


def _load_with_bases(path: str, chain: tuple[str, ...]):
    if path in chain:
        cycle = " -> ".join([*chain, path])
        raise ConfigError(f"Config {path}: _base_ files form a cycle: {cycle}")
    if not os.path.isfile(path):
        referrer = f" (named in _base_ of {chain[-1]})" if chain else ""
        raise ConfigError(f"Config file not found: {path}{referrer}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, UnicodeDecodeError, ...
        raise ConfigError(f"Config {path} is not valid YAML: {e}") from None
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"Config {path} must be a mapping of keys to values, not {type(node).__name__}")
    bases = node.pop("_base_", None)
    if bases is None:
        return node
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    for base in bases:
        if not isinstance(base, str):
            raise ConfigError(f"Config {path}: _base_ entries must be file paths, got {base!r}")
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        merged = OmegaConf.merge(merged, _load_with_bases(base_path, chain=(*chain, path)))
    return OmegaConf.merge(merged, node)


def _parse_overrides(overrides: list[str]):
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"--cfg-options expects KEY=VALUE items, got {item!r} (e.g. train.max_steps=100)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"--cfg-options {' '.join(overrides)}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Validation against the schema


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"Config key '{where}' must be a mapping, got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            full = f"{prefix}{key}"
            valid = [f"{prefix}{k}" for k in fields]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys here: {', '.join(valid)}."
            raise ConfigError(f"Unknown config key '{full}'.{hint}")
        f = fields[key]
        kwargs[f.name] = _coerce(hints[f.name], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            _type_error(key, value, f"a list of {item_tp.__name__}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _type_error(key, value, "a mapping")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _type_error(key, value, "bool (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _type_error(key, value, "int")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _type_error(key, value, "float")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _type_error(key, value, "str")
        return value
    raise TypeError(f"schema type {tp!r} of {key} is not supported")  # a bug in the schema, not user input


def _type_error(key: str, value: Any, expected: str) -> typing.NoReturn:
    raise ConfigError(
        f"Config key '{key}' has value {value!r} of type {type(value).__name__}, expected {expected}."
    )


def _check_values(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise ConfigError(f"Config key '{key}' is {value!r}; choose one of {', '.join(allowed)}.")
    for key, valid in RANGES.items():
        values = get_key(cfg, key[:-2]) if key.endswith("[]") else [get_key(cfg, key)]
        for i, value in enumerate(values):
            if not valid.contains(value):
                name = f"{key[:-2]}[{i}]" if key.endswith("[]") else key
                raise ConfigError(f"Config key '{name}' is {value!r}; it must be {valid.describe()}.")
    check_rules(cfg)

def get_key(cfg: Any, dotted: str) -> Any:
    """``get_key(cfg, "data.global_batch_size")``."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
