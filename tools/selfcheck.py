"""Shows the start-up plan train_gpt.py would take on this machine: every fast path proven
against its reference path, or dropped and why. Run it before a record attempt.

    python tools/selfcheck.py                          # the record configuration, one process
    python tools/selfcheck.py --preset tiny            # the tiny configuration (any trainer flag works)
    TRITON_INTERPRET=1 python tools/selfcheck.py --preset tiny   # a CPU: the Triton kernels too
    python tools/selfcheck.py --fail=fused_mlp         # a drill: that path computes wrong numbers

It resolves the plan as the trainer does before its clock starts (train_gpt.resolve_plan: the
same checks at the run's shapes, the same tolerances, the same timings, on this process as
rank 0 of 1) and prints the plan's table (each choice, its value and why), then one line per
fast path checked: proven or dropped, its largest error against its tolerance, and its ms
against its reference's where it was timed.

On a CPU the trainer's plan takes no Triton path (the reference paths are the fast ones
there). With TRITON_INTERPRET=1 this tool also proves the Triton kernels under the
interpreter, at small shapes and with the same check functions: the fused loss head in one
pass and in two, the fused MLP in float32 and the symmetric matmuls. Their times under the
interpreter are no GPU figure and are not shown.

--fail=PATH makes that path's kernel return its result times 1.1 (paths: attention,
fp8_head, loss_one_pass, loss_two_passes, fused_mlp, sym), so its check must drop it: the
plan then falls back, and this tool says why and still exits 0.

Exit status: 0 when every path the plan takes is proven (a dropped fast path is a fallback,
not a failure), 1 when a path the plan takes has no passing proof, 2 for a bad flag or a
forced path (--fused_loss=on, ...) whose check failed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

DRILLS = ("attention", "fp8_head", "loss_one_pass", "loss_two_passes", "fused_mlp", "sym")


def wrong_by_ten_percent(fn):
    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(o * 1.1 if torch.is_tensor(o) and o.is_floating_point() else o for o in out) \
            if isinstance(out, tuple) else out * 1.1
    return wrong


def install_drill(name: str) -> None:
    """Makes the kernel behind `name` compute wrong numbers (times 1.1) for this process."""
    if name == "attention":
        for attr in ("attention_varlen", "attention_flex"):
            setattr(tg, attr, wrong_by_ten_percent(getattr(tg, attr)))
        make = tg._make_fa3_attention
        tg._make_fa3_attention = lambda fa3: wrong_by_ten_percent(make(fa3))
    elif name == "fp8_head":
        tg.fp8_mm = wrong_by_ten_percent(tg.fp8_mm)
    elif name in ("loss_one_pass", "loss_two_passes"):
        one_pass, real = name == "loss_one_pass", tg.fused_loss_head
        tg.fused_loss_head = lambda *a, **k: real(*a, **k) * (1.1 if k.get("one_pass", a[5:6] == (True,)) == one_pass
                                                             else 1.0)
    elif name == "fused_mlp":
        tg.fused_mlp = wrong_by_ten_percent(tg.fused_mlp)
    elif name == "sym":
        tg.sym_xxt = wrong_by_ten_percent(tg.sym_xxt)


def interpreter_proofs() -> list:
    """The Triton kernels under the CPU interpreter at small shapes, with the plan's own
    check functions (fp32 MLP and Polar Express; the loss head's FP8 operands as on a GPU)."""
    cpu, T, d, V, K = torch.device("cpu"), 48, 32, 640, 3
    checks = [(f"fused loss head, {path} (interpreter)",
               lambda p=path: tg.check_loss_head(p, T, d, V, K, 1 / tg.VIRTUAL_RANKS, cpu, False))
              for path in tg.FUSED_LOSS_PATHS]
    checks.append(("fused MLP, float32 (interpreter)", lambda: tg.check_mlp(T, d, cpu, torch.float32)))
    checks.append(("symmetric matmuls, float32 (interpreter)", lambda: tg.check_sym(d, 2, cpu, torch.float32)))
    return [tg.prove(path, check, cpu) for path, check in checks]


def proof_lines(plan: tg.RunPlan, extra: list) -> list[str]:
    timed = {}
    for choice, times in plan.timings:
        for name, (ms, failure) in times.items():
            timed[(choice, name)] = (ms, failure)
    references = {"fused loss head": "unfused", "fused MLP": "unfused", "symmetric matmuls": "torch"}
    lines = []
    for proof in list(plan.proofs) + extra:
        choice, _, form = proof.path.partition(", ")
        name = {"fused MLP": "fused", "symmetric matmuls": "triton"}.get(choice, form)
        ms = timed.get((choice, name))
        ref = timed.get((choice, references.get(choice)))
        if ms and ref:
            speed = f"; {ms[0]:.3f} ms vs {references[choice]} {ref[0]:.3f} ms (median of {tg.PLAN_SAMPLES})"
        elif proof.path.endswith("(interpreter)"):
            speed = "; not timed (the interpreter's times are no GPU figure)"
        else:
            speed = ""
        worst = ""
        if proof.errors:
            what, err, tol = proof.worst
            worst = f"largest error: {what} {err:.2e} (tolerance {tol:.0e})"
        verdict = "proven" if proof.ok else "DROPPED"
        reason = "" if proof.ok else f"{proof.why}; "
        lines.append(f"  [{verdict}] {proof.path}: {reason}{worst}{speed}")
    return lines


def taken_paths_unproven(plan: tg.RunPlan) -> list[str]:
    """The fast paths the plan takes that have no passing proof (should be none)."""
    passed = {p.path for p in plan.proofs if p.ok}
    taken = []
    if plan.attn_backend != "sdpa":
        taken.append(f"attention {plan.attn_backend}")
    if plan.fp8:
        taken.append("FP8 lm_head")
    if plan.fused_loss:
        taken.append(f"fused loss head, {plan.fused_loss}")
    if plan.fused_mlp:
        taken.append("fused MLP")
    if plan.sym_triton:
        taken.append("symmetric matmuls")
    return [path for path in taken if path not in passed]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--fail", choices=DRILLS, help="a drill: this path's kernel computes wrong numbers")
    known, rest = ap.parse_known_args(argv)
    try:
        args = tg.parse_args(rest)
        device = tg.resolve_device(args.device)
        if known.fail:
            install_drill(known.fail)
            print(f"drill: {known.fail} computes its result times 1.1")
        print(f"resolving the plan of --preset={args.preset} on {device} (checks and timings at the run's shapes)",
              flush=True)
        plan = tg.resolve_plan(args, device, 0, 1, log=print)
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = []
    if plan.interpret and not plan.cuda:
        print("the Triton kernels under the interpreter (small shapes; the CPU plan does not take them):", flush=True)
        extra = interpreter_proofs()
    print("proofs:")
    for line in proof_lines(plan, extra) or ["  (no fast path to prove on this machine with these flags)"]:
        print(line)
    missing = taken_paths_unproven(plan)
    if missing:
        print(f"selfcheck: FAILED: the plan takes {', '.join(missing)} without a passing proof")
        return 1
    dropped = [p.path for p in list(plan.proofs) + extra if not p.ok]
    print("selfcheck: OK: every path the plan takes is proven"
          + (f"; dropped: {', '.join(dropped)}" if dropped else ""))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
