"""The goodput timeline: one bar per attempt along wall-clock time, coloured by where the time went.

Green is training that counts; red hatched is lost work (computed, then lost to a kill); grey is start-up
and restore, orange waiting (launch, rendezvous, dead time before the attempt), blue checkpoint blocking,
purple evaluation. The marker at a bar's end says how the attempt ended, ticks on the bar are committed
checkpoints. Below, the whole run in one bar, in percent.
"""

from __future__ import annotations

import io

from .report import BUCKETS, LABELS, Report

COLOURS = {"good": "#2ca02c", "startup": "#8c8c8c", "waiting": "#ffbb78", "lost": "#d62728",
           "uncommitted": "#bcbd22", "checkpoint": "#1f77b4", "evaluation": "#9467bd", "other": "#d9d9d9"}
HATCH = {"lost": "////", "uncommitted": ".."}
END_MARKERS = {"done": ("*", "black", "done"), "preempted": ("v", "tab:orange", "preempted"),
               "killed": ("X", "tab:red", "killed"), "failed": ("x", "tab:red", "failed"),
               "running": (">", "tab:green", "running"), "stopped": ("X", "tab:red", "killed")}
MAX_ROWS = 40  # more attempts than this share one row


def render_png(report: Report, dpi: int = 110) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    attempts = report.attempts
    rows = len(attempts) if len(attempts) <= MAX_ROWS else 1
    fig, (ax, total) = plt.subplots(2, 1, figsize=(11, 1.9 + 0.42 * rows + 1.0),
                                    gridspec_kw={"height_ratios": [max(rows, 1.5), 0.9]})
    scale = 60.0 if report.wall > 180 else 1.0
    unit = "min" if scale == 60.0 else "s"

    def x(t: float) -> float:
        return (t - report.start) / scale

    previous_end = report.start
    for a in attempts:
        y = a.index if rows > 1 else 0
        gap = a.start - previous_end
        if gap > 0:  # dead time before the attempt
            ax.barh(y, gap / scale, left=x(previous_end), height=0.5, color=COLOURS["waiting"], alpha=0.6)
        previous_end = max(previous_end, a.end)
        for start, end, bucket in a.segments:
            ax.barh(y, (end - start) / scale, left=x(start), height=0.7, color=COLOURS[bucket],
                    hatch=HATCH.get(bucket), edgecolor="white" if bucket in HATCH else None, linewidth=0)
        for t, _step in a.commits:
            ax.plot([x(t)], [y], marker="|", markersize=14, color="black", linewidth=0)
        marker, colour, _ = END_MARKERS.get(a.how, END_MARKERS["killed"])
        ax.plot([x(a.end)], [y], marker=marker, markersize=10, color=colour, linewidth=0)
        if rows > 1:
            label = f"ws {a.world_size or '?'}, steps {a.first_step}-{a.last_step}"
            label += f", {a.lost_steps} lost" if a.lost_steps else ""
            ax.annotate(label, (x(a.end), y), xytext=(10, 0), textcoords="offset points", va="center", fontsize=8)
    if report.end > previous_end:
        ax.barh(rows - 1 if rows > 1 else 0, (report.end - previous_end) / scale, left=x(previous_end),
                height=0.5, color=COLOURS["waiting"], alpha=0.6)
    ax.set_yticks(range(rows), [f"attempt {a.index}" for a in attempts] if rows > 1 else ["attempts"])
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xlim(0, max(report.wall / scale, 1e-9) * 1.2)
    ax.set_xlabel(f"wall time since the first start ({unit})")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"goodput {100 * report.goodput:.1f}%: {report.status} at step {report.final_step}"
                 f"{f'/{report.max_steps}' if report.max_steps else ''}, {len(attempts)} attempt(s), wall "
                 f"{report.wall / 60:.1f} min", fontsize=11)
    used = [b for b in BUCKETS if report.buckets[b] > 0]
    handles = [Patch(facecolor=COLOURS[b], hatch=HATCH.get(b), edgecolor="white", label=LABELS[b]) for b in used]
    for how in dict.fromkeys(a.how for a in attempts):
        marker, colour, label = END_MARKERS.get(how, END_MARKERS["killed"])
        handles.append(ax.plot([], [], marker=marker, color=colour, linewidth=0, label=label)[0])
    handles.append(ax.plot([], [], marker="|", color="black", markersize=10, linewidth=0, label="commit")[0])
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.28 if rows > 2 else -0.45),
              ncol=min(len(handles), 6), fontsize=8, frameon=False)

    left = 0.0
    wall = report.wall or 1.0
    for b in BUCKETS:
        share = 100 * report.buckets[b] / wall
        if share <= 0:
            continue
        total.barh(0, share, left=left, color=COLOURS[b], hatch=HATCH.get(b), edgecolor="white", linewidth=0)
        if share >= 4:
            total.text(left + share / 2, 0, f"{share:.0f}%", ha="center", va="center", fontsize=8)
        left += share
    total.set_xlim(0, 100)
    total.set_yticks([0], ["whole run"])
    total.set_xlabel("% of wall time")
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()
