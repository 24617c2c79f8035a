"""Plot validation loss curves of training logs: against step and against training time.

    python records/plot.py LOG [LOG ...] -o curves.png [--target 3.28] [--ymax 4.0]

LOG is a log written by train_gpt.py (logs/<run_id>.txt): its `step:N/T val_loss:L
train_time:Mms` lines are plotted, one colour per log, with the target loss as a dashed
line. Logs of a record and your own runs can go in one picture to compare them. A log
without any validation line is skipped with a one-line message; none usable: exit 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("stats", Path(__file__).resolve().parent / "stats.py")
stats = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("stats", stats)  # its dataclasses look their module up there
_spec.loader.exec_module(stats)


def val_curve(path) -> list[tuple[int, float, float]]:
    """(step, val_loss, train time in s) of every validation line below the log's
    separator (or in the whole file when it has none), by step. A resumed run appends to
    its log from its checkpoint's step: where a step was validated twice (before the stop
    and after the resume), the later line counts."""
    source, rest = stats._split_source(stats.read_log_text(path))
    points = {}
    for line in rest.splitlines():
        m = stats._VAL_RE.fullmatch(line.strip())
        if m is not None:
            points[int(m["step"])] = (int(m["step"]), float(m["loss"]), int(m["ms"]) / 1000)
    return [points[step] for step in sorted(points)]


def labels_for(paths) -> list[str]:
    """File stems, with the parent folder added where two stems are the same."""
    stems = [Path(p).stem for p in paths]
    return [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def plot(curves: dict, out: Path, target: float, ymax: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10")
    for i, (label, points) in enumerate(curves.items()):
        steps, losses, seconds = zip(*points)
        style = dict(color=colors(i % 10), marker="o", markersize=3, linewidth=1.5, label=label)
        by_step.plot(steps, losses, **style)
        by_time.plot(seconds, losses, **style)
    for ax, xlabel in ((by_step, "step"), (by_time, "training time (s)")):
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(True, alpha=0.3)
        if ymax is not None:
            ax.set_ylim(top=ymax)
    by_step.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("logs", nargs="+", metavar="LOG", help="training log(s) (logs/<run_id>.txt)")
    ap.add_argument("-o", "--output", required=True, help="the picture to write (.png, .svg, .pdf)")
    ap.add_argument("--target", type=float, default=3.28, help="target loss line (default 3.28)")
    ap.add_argument("--ymax", type=float, default=None, help="upper end of the loss axis (default: all points)")
    args = ap.parse_args(argv)
    curves = {}
    for path, label in zip(args.logs, labels_for(args.logs)):
        try:
            points = val_curve(path)
        except stats.LogError as e:
            print(f"plot.py: skipping {e}", file=sys.stderr)
            continue
        if not points:
            print(f"plot.py: skipping {path}: no 'val_loss' line", file=sys.stderr)
            continue
        curves[label] = points
    if not curves:
        print("plot.py: no log with validation lines to plot", file=sys.stderr)
        return 1
    out = Path(args.output)
    try:
        plot(curves, out, args.target, args.ymax)
    except (OSError, ValueError) as e:
        print(f"plot.py: cannot write {out}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(curves)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
