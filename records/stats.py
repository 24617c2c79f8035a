#!/usr/bin/env python3
"""Statistics for speedrun record claims, computed from train_gpt.py training logs.

A record is accepted when, over several runs, the mean final validation loss is below
the target (3.28) with a one-sided one-sample t-test p-value below alpha (0.01). This
tool reads the logs written by train_gpt.py and prints the numbers a record README
reports: per-run final val loss and train time, their mean and sample std (ddof=1),
the t-test p-value and whether the criterion holds.

    python records/stats.py LOG [LOG ...] [--target 3.28] [--alpha 0.01] [--steps N]
    python records/stats.py LOG --diff OTHER_LOG

Log layout (as train_gpt.py writes it):
  1. the full source code of train_gpt.py, verbatim;
  2. a line of exactly 100 '=' characters;
  3. version lines and nvidia-smi output, then another line of 100 '=';
  4. training lines; validation lines look exactly like
     ``step:{n}/{N} val_loss:{loss:.4f} train_time:{ms}ms step_avg:{avg:.2f}ms``.
The final validation line is the one with n == N; its train_time (integer ms) / 1000 is
the run's train time in seconds.

Exit status: 0 when a summary (or a diff) was printed, even if some logs were skipped;
1 when no valid log remains (or a --diff input has no embedded source); 2 on usage errors.

Only the standard library, numpy and scipy are used (scipy only for the t-test).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

DEFAULT_TARGET = 3.28
DEFAULT_ALPHA = 0.01
SEPARATOR = "=" * 100

# One validation line. The loss group also admits nan/inf so that a diverged run is
# reported as such rather than as "no final validation line".
_VAL_RE = re.compile(
    r"step:(?P<step>\d+)/(?P<total>\d+)"
    r" val_loss:(?P<loss>[-+]?(?:\d+(?:\.\d*)?|\.\d+|nan|inf))"
    r" train_time:(?P<ms>\d+)ms"
    r"(?: step_avg:(?P<avg>\S+)ms)?"  # not at step 0
)

_PROG = "stats.py"


class LogError(ValueError):
    """A log that cannot be used; the message names the file."""


@dataclass(frozen=True)
class ValPoint:
    step: int
    total_steps: int
    val_loss: float
    train_time_ms: int


@dataclass(frozen=True)
class Run:
    """The facts of one training log that the record statistics need."""

    path: str
    final_step: int
    total_steps: int
    val_loss: float
    train_time_ms: int
    source: Optional[str] = dataclasses.field(default=None, repr=False)
    val_history: tuple = dataclasses.field(default=(), repr=False)

    @property
    def train_time_s(self) -> float:
        return self.train_time_ms / 1000.0


@dataclass(frozen=True)
class Summary:
    n: int
    losses: tuple
    times_s: tuple
    loss_mean: float
    loss_std: Optional[float]  # sample std (ddof=1); None with fewer than 2 runs
    time_mean: float
    time_std: Optional[float]
    target: float
    alpha: float
    t_statistic: Optional[float]  # None with fewer than 2 runs
    pvalue: Optional[float]  # one-sided, H1: mean loss < target; None with < 2 runs
    passed: Optional[bool]  # pvalue < alpha; None with fewer than 2 runs


# ---------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------


def read_log_text(path) -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
            return f.read()
    except OSError as e:
        reason = e.strerror or e.__class__.__name__
        raise LogError(f"{path}: cannot read file: {reason}") from e


def _split_source(text: str):
    """Return (source, rest) around the first separator line, or (None, text)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip("\r\n") == SEPARATOR:
            return "".join(lines[:i]), "".join(lines[i + 1:])
    return None, text


def extract_source(path) -> str:
    """The train_gpt.py source embedded at the top of a log (text before the separator)."""
    source, _ = _split_source(read_log_text(path))
    if source is None:
        raise LogError(
            f"{path}: no separator line of 100 '=' found, so no embedded source code"
        )
    return source


def parse_log_text(text: str, path: str = "<log>") -> Run:
    source, rest = _split_source(text)
    # Only look below the separator when there is one: the source code above it may
    # itself mention the val-line format.
    points = []
    for line in rest.splitlines():
        if "val_loss:" not in line:
            continue
        m = _VAL_RE.fullmatch(line.strip())
        if m is None:
            continue
        points.append(
            ValPoint(
                step=int(m["step"]),
                total_steps=int(m["total"]),
                val_loss=float(m["loss"]),
                train_time_ms=int(m["ms"]),
            )
        )
    finals = [p for p in points if p.step == p.total_steps]
    if not finals:
        if points:
            last = points[-1]
            raise LogError(
                f"{path}: no final validation line (last val_loss at step "
                f"{last.step}/{last.total_steps}; run incomplete?)"
            )
        raise LogError(f"{path}: no final validation line (no 'val_loss:' line found)")
    final = finals[-1]
    if not math.isfinite(final.val_loss):
        raise LogError(f"{path}: final val_loss is {final.val_loss} (diverged run)")
    return Run(
        path=str(path),
        final_step=final.step,
        total_steps=final.total_steps,
        val_loss=final.val_loss,
        train_time_ms=final.train_time_ms,
        source=source,
        val_history=tuple(points),
    )


def parse_log(path) -> Run:
    """Parse one training log. Raises LogError (message names the file) if unusable."""
    return parse_log_text(read_log_text(path), str(path))


def majority_steps(runs: Sequence[Run]) -> Optional[int]:
    """Most common total step count N; ties go to the N seen first."""
    if not runs:
        return None
    counts = collections.Counter(r.total_steps for r in runs)
    best = max(counts.values())
    for r in runs:
        if counts[r.total_steps] == best:
            return r.total_steps
    return None  # unreachable


def load_runs(paths: Iterable, steps: Optional[int] = None):
    """Parse logs, dropping unusable ones. Returns (runs, problems), problems being
    one-line messages that name the file. Logs whose step count N differs from `steps`
    (default: the majority N over the parsable logs) are dropped too."""
    runs, problems = [], []
    for p in paths:
        try:
            runs.append(parse_log(p))
        except LogError as e:
            problems.append(str(e))
    expected = steps if steps is not None else majority_steps(runs)
    kept = []
    for r in runs:
        if expected is not None and r.total_steps != expected:
            why = "requested" if steps is not None else "the majority of the logs"
            problems.append(
                f"{r.path}: step count N={r.total_steps} differs from N={expected} "
                f"({why})"
            )
        else:
            kept.append(r)
    return kept, problems


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------


def one_sided_ttest(values: Sequence[float], target: float):
    """(t, p) of the one-sample t-test with H1: mean < target (scipy, alternative="less").

    With zero spread the t statistic is infinite; scipy returns nan there, so the limit
    is used instead: p = 0 when the mean is below the target and 1 otherwise.
    """
    if len(values) < 2:
        raise ValueError("the t-test needs at least 2 values")
    if statistics.pstdev(values) == 0.0:
        mean = statistics.fmean(values)
        if mean < target:
            return -math.inf, 0.0
        if mean > target:
            return math.inf, 1.0
        return math.nan, 1.0
    import scipy.stats

    res = scipy.stats.ttest_1samp(list(values), target, alternative="less")
    return float(res.statistic), float(res.pvalue)


def summarize_values(losses, times_s, target=DEFAULT_TARGET, alpha=DEFAULT_ALPHA) -> Summary:
    losses = tuple(float(x) for x in losses)
    times_s = tuple(float(x) for x in times_s)
    if not losses or len(losses) != len(times_s):
        raise ValueError("need the same positive number of losses and times")
    n = len(losses)
    if n >= 2:
        loss_std = statistics.stdev(losses)
        time_std = statistics.stdev(times_s)
        t, p = one_sided_ttest(losses, target)
        passed = p < alpha
    else:
        loss_std = time_std = t = p = passed = None
    return Summary(
        n=n,
        losses=losses,
        times_s=times_s,
        loss_mean=statistics.fmean(losses),
        loss_std=loss_std,
        time_mean=statistics.fmean(times_s),
        time_std=time_std,
        target=float(target),
        alpha=float(alpha),
        t_statistic=t,
        pvalue=p,
        passed=passed,
    )


def summarize(runs: Sequence[Run], target=DEFAULT_TARGET, alpha=DEFAULT_ALPHA) -> Summary:
    return summarize_values(
        [r.val_loss for r in runs], [r.train_time_s for r in runs], target, alpha
    )


def source_diff(a, b, context: int = 3) -> str:
    """Unified diff of the train_gpt.py sources embedded in logs `a` and `b`, labelled
    with the log paths. Empty string when the sources are identical."""
    src_a = extract_source(a).splitlines(keepends=True)
    src_b = extract_source(b).splitlines(keepends=True)
    out = []
    for line in difflib.unified_diff(src_a, src_b, fromfile=str(a), tofile=str(b), n=context):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def config_flags(path) -> Optional[dict]:
    """The flags of the log's `config: --a=1 --b=x ...` line (train_gpt.py writes one below
    the separator), as {flag: value}; None if the log has no such line."""
    _, rest = _split_source(read_log_text(path))
    for line in rest.splitlines():
        if line.startswith("config: "):
            flags = {}
            for item in (" " + line[len("config:"):].strip()).split(" --")[1:]:
                name, _, value = item.partition("=")
                flags["--" + name] = value
            return flags
    return None


def config_diff(a, b) -> str:
    """One line per flag whose value differs between the config lines of logs a and b
    (`--flag: A -> B`; a flag only one log has shows `(none)` on the other side)."""
    fa, fb = config_flags(a), config_flags(b)
    if fa is None and fb is None:
        return ""
    if fa is None or fb is None:
        return f"config: only {b if fa is None else a} has a config line\n"
    out = []
    for name in list(fa) + [n for n in fb if n not in fa]:
        va, vb = fa.get(name, "(none)"), fb.get(name, "(none)")
        if va != vb:
            out.append(f"config {name}: {va} -> {vb}\n")
    return "".join(out)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _fmt(x: Optional[float], nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def format_report(runs: Sequence[Run], summary: Summary, skipped: int = 0) -> str:
    lines = []
    lines.append(f"runs: {summary.n} (skipped: {skipped})")
    steps = sorted({r.total_steps for r in runs})
    lines.append("steps: " + ", ".join(str(s) for s in steps))
    width = max(len(r.path) for r in runs)
    lines.append(f"  {'log':<{width}}  {'val_loss':>8}  {'train_time_s':>12}")
    for r in runs:
        lines.append(f"  {r.path:<{width}}  {r.val_loss:8.4f}  {r.train_time_s:12.3f}")
    lines.append("losses = [" + ", ".join(f"{x:.4f}" for x in summary.losses) + "]")
    lines.append("times = [" + ", ".join(f"{x:.3f}" for x in summary.times_s) + "]")
    lines.append(
        f"val loss: mean {_fmt(summary.loss_mean)} std {_fmt(summary.loss_std)}"
        + ("" if summary.loss_std is not None else " (std needs at least 2 runs)")
    )
    lines.append(
        f"train time (s): mean {_fmt(summary.time_mean)} std {_fmt(summary.time_std)}"
    )
    head = f"t-test (one-sided, H1: mean val loss < {summary.target:g}):"
    if summary.pvalue is None:
        lines.append(f"{head} needs at least 2 runs (have {summary.n})")
        lines.append(f"record criterion p < {summary.alpha:g}: not evaluated (needs at least 2 runs)")
    else:
        lines.append(
            f"{head} t={summary.t_statistic:.4f} p={summary.pvalue:.4f} "
            f"(p={summary.pvalue:.6e})"
        )
        verdict = "PASS" if summary.passed else "FAIL"
        lines.append(f"record criterion p < {summary.alpha:g}: {verdict}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def _finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}")
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"not a finite number: {s!r}")
    return v


def _probability(s: str) -> float:
    v = _finite_float(s)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive): {s!r}")
    return v


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=_PROG,
        description="Summarize train_gpt.py logs for a speedrun record claim: final val "
        "loss and train time mean/std, one-sided t-test that the mean loss is below the "
        "target.",
    )
    ap.add_argument("logs", nargs="+", metavar="LOG", help="training log(s) (logs/<run_id>.txt)")
    ap.add_argument("--target", type=_finite_float, default=DEFAULT_TARGET,
                    help="val loss the mean must beat (default: %(default)s)")
    ap.add_argument("--alpha", type=_probability, default=DEFAULT_ALPHA,
                    help="significance level of the record criterion p < alpha (default: %(default)s)")
    ap.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                    help="keep only logs whose step count is N (default: the majority N)")
    ap.add_argument("--diff", metavar="OTHER_LOG", default=None,
                    help="with exactly one LOG: print a unified diff of the source code "
                    "embedded in LOG and OTHER_LOG, then the flags whose values differ in their "
                    "config lines, instead of statistics")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    if args.diff is not None:
        if len(args.logs) != 1:
            ap.error("--diff takes exactly one LOG (the diff goes from LOG to OTHER_LOG)")
        try:
            diff = source_diff(args.logs[0], args.diff)
            flags = config_diff(args.logs[0], args.diff)
        except LogError as e:
            print(f"{_PROG}: {e}", file=sys.stderr)
            return 1
        if diff or flags:
            sys.stdout.write(diff + flags)
        else:
            print(f"{_PROG}: the embedded sources and the config lines are identical", file=sys.stderr)
        return 0

    runs, problems = load_runs(args.logs, steps=args.steps)
    for msg in problems:
        print(f"{_PROG}: skipping {msg}", file=sys.stderr)
    if not runs:
        print(f"{_PROG}: no valid log remains ({len(problems)} skipped)", file=sys.stderr)
        return 1
    summary = summarize(runs, target=args.target, alpha=args.alpha)
    sys.stdout.write(format_report(runs, summary, skipped=len(problems)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
