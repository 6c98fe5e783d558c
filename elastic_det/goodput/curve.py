"""Plot a run's ``metrics.jsonl``: loss and bbox_mAP against global step, with restarts marked.

    python -m elastic_det.plot WORK_DIR -o curve.png

WORK_DIR may be a local path or an fsspec URL (``s3://bucket/runs/x``), or the metrics file itself.
After a restart, steps between the resumed checkpoint and the failure are logged again; the last line
logged for a step wins, so the curve shows the run that continued.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ..errors import USER_ERROR_EXIT_CODE, StorageError, UserError
from ..records import parse_jsonl

MARKED_EVENTS = ("resume", "checkpoint", "checkpoint_failed", "preempt", "fallback")
_STYLE = {  # marker kind -> (colour, line style)
    "resume": ("tab:red", "-"),
    "world_size": ("tab:purple", "--"),
    "checkpoint": ("tab:green", ":"),
    "checkpoint_failed": ("tab:olive", "-."),
    "preempt": ("tab:orange", "-"),
    "fallback": ("tab:brown", "-."),
}


@dataclass(frozen=True)
class Marker:
    kind: str  # one of MARKED_EVENTS, or "world_size"
    step: int
    label: str = ""  # world_size: the new size


@dataclass
class Series:
    train_steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    bbox_mAP: list[float] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)

    def steps_of(self, kind: str) -> list[int]:
        return [m.step for m in self.markers if m.kind == kind]


def metrics_path(work_dir: str) -> str:
    """``WORK_DIR/metrics.jsonl``, or the argument itself when it names a ``.jsonl`` file."""
    return work_dir if work_dir.endswith(".jsonl") else work_dir.rstrip("/") + "/metrics.jsonl"


def read_metrics(path: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a metrics file, in order. A line cut short by a kill is skipped."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8", **(storage_options or {})) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"No metrics file at {path}: is this a work dir of a run that has logged "
                        "(metrics.jsonl is written every log.interval steps)?") from None
    except OSError as e:
        raise StorageError(f"Cannot read metrics file {path}: {e}") from None
    records = parse_jsonl("\n".join(lines))
    if not records:
        raise UserError(f"Metrics file {path} holds no metrics lines yet; nothing to plot.")
    return records


def extract_series(records: Iterable[dict[str, Any]]) -> Series:
    """Train loss and val bbox_mAP per step (last line per step wins), and the event markers.

    An event without a ``step`` is placed at the last step logged before it.
    """
    train: dict[int, dict[str, Any]] = {}
    val: dict[int, float] = {}
    events: dict[tuple[str, int], Marker] = {}
    last_step = 0
    for r in records:
        step = int(r.get("step", last_step))
        last_step = step
        if r.get("mode") == "train" and "loss" in r:
            train[step] = r
        elif r.get("mode") == "val" and "bbox_mAP" in r:
            val[step] = float(r["bbox_mAP"])
        elif r.get("event") in MARKED_EVENTS:
            events[(r["event"], step)] = Marker(r["event"], step)
    series = Series()
    markers = list(events.values())
    previous_size = None
    for step in sorted(train):
        series.train_steps.append(step)
        series.loss.append(float(train[step]["loss"]))
        size = train[step].get("world_size", previous_size)
        if previous_size is not None and size != previous_size:
            markers.append(Marker("world_size", step, str(size)))
        previous_size = size
    series.val_steps = sorted(val)
    series.bbox_mAP = [val[s] for s in series.val_steps]
    series.markers = sorted(markers, key=lambda m: (m.step, m.kind))
    return series


def plot(series: Series, out: str, title: str = "") -> None:
    """Write the figure to ``out`` (a local path or an fsspec URL; the format follows the extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if series.val_steps else 1
    fig, axes = plt.subplots(rows, 1, sharex=True, figsize=(10, 3.2 * rows + 0.8), squeeze=False)
    axes = axes[:, 0]
    axes[0].plot(series.train_steps, series.loss, color="tab:blue", linewidth=1.2)
    axes[0].set_ylabel("loss")
    if rows == 2:
        axes[1].plot(series.val_steps, series.bbox_mAP, color="tab:blue", marker="o", markersize=3)
        axes[1].set_ylabel("bbox_mAP")
    axes[-1].set_xlabel("global step")
    seen = set()
    for m in series.markers:
        colour, style = _STYLE[m.kind]
        for ax in axes:
            ax.axvline(m.step, color=colour, linestyle=style, linewidth=0.9, alpha=0.6,
                       label=m.kind.replace("_", " ") if m.kind not in seen and ax is axes[0] else None)
        seen.add(m.kind)
        if m.kind == "world_size":
            axes[0].annotate(f"world size {m.label}", xy=(m.step, 1.0), xycoords=("data", "axes fraction"),
                             xytext=(2, -2), textcoords="offset points", va="top", fontsize=8, color=colour)
    if seen:
        axes[0].legend(loc="upper right", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    fmt = out.rsplit(".", 1)[-1].lower() if "." in out.rsplit("/", 1)[-1] else "png"
    try:
        if fmt not in fig.canvas.get_supported_filetypes():
            raise UserError(f"Cannot write the plot to {out}: unknown image format '{fmt}' "
                            f"(use one of {', '.join(sorted(fig.canvas.get_supported_filetypes()))}).")
        with fsspec.open(out, "wb") as f:
            fig.savefig(f, format=fmt, dpi=120)
    except OSError as e:
        raise StorageError(f"Cannot write the plot to {out}: {e}") from None
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elastic_det.plot", description=__doc__.split("\n")[0])
    parser.add_argument("work_dir", help="work dir (path or fsspec URL) or its metrics.jsonl")
    parser.add_argument("-o", "--out", default="curve.png", help="output image (default: curve.png)")
    args = parser.parse_args(argv)
    try:
        path = metrics_path(args.work_dir)
        title = args.work_dir if "://" in args.work_dir else os.path.abspath(args.work_dir)
        plot(extract_series(read_metrics(path)), args.out, title=title)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print(f"wrote {args.out}")
    return 0
