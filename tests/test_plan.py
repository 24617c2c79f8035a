"""The start-up plan (train_gpt section 2f): every fast path proven against its reference
before it is taken, dropped with its reason when it raises or computes wrong numbers, the
same choice on every rank, a forced path that fails its check a one-line error, and the
preflight's GPU plan equal to what a proven CUDA rank builds.

On this CPU the real kernels cannot run as on a GPU, so a pretended Hopper machine
(tg.Machine) stands over the CPU device: the checks then run their real reference math on
the CPU, the Triton kernels fail there for real (no driver), and the tests replace a kernel
by a correct stand-in, a raising one or a wrong one where they need it."""
import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
HOPPER = tg.Machine(torch.device("cpu"), cuda=True, capability=(9, 0), triton=True)
# small shapes keep every check to a fraction of a second; no compile on the CPU
SMALL = ["--preset=tiny", "--compile=off", "--train_batch_sizes=128,128,256"]


def args_of(*flags):
    return tg.parse_args([*SMALL, *flags])


def unfused_head(x, w, targets, weights, grad_scale, one_pass=True, compiled=False):
    """A correct stand-in for the fused loss head: the unfused FP8 head's loss (the fused
    op's backward expects grad_scale as its incoming gradient; this one needs nothing)."""
    logits = tg.fp8_mm(x, w, tg.FP8_X_SCALE, tg.FP8_W_SCALE, tg.FP8_GRAD_SCALE)[0]
    return tg.mtp_loss(logits, targets, weights)


def fake_times(ms: dict):
    """time_paths' stand-in: fixed ms per path name, and a record of what was timed."""
    timed = []

    def time_paths(fns, sync, samples=tg.PLAN_SAMPLES, iters=tg.PLAN_ITERS):
        timed.append(sorted(fns))
        return {name: (ms[name], "") for name in fns}
    return time_paths, timed


def rows(plan):
    return {choice: (value, why) for choice, value, why in plan.rows}


def test_a_raising_and_a_wrong_kernel_are_dropped_and_the_next_paths_taken(monkeypatch):
    """One pass raises (as an OutOfResources would), two passes is right and faster than the
    unfused head: two passes is taken. The fused MLP returns wrong values: dropped, with the
    error and its tolerance. Only paths that passed are timed."""
    def fused_head(*a, **k):
        if k.get("one_pass", a[5] if len(a) > 5 else True):
            raise RuntimeError("OutOfResources: out of resource: shared memory, Required: 262144\nmore")
        return unfused_head(*a, **k)

    monkeypatch.setattr(tg, "fused_loss_head", fused_head)
    monkeypatch.setattr(tg, "fused_mlp", lambda x, c_fc, c_proj: 1.5 * tg.unfused_mlp(x, c_fc, c_proj))
    time_paths, timed = fake_times({"two passes": 3.0, "unfused": 4.0})
    monkeypatch.setattr(tg, "time_paths", time_paths)
    plan = tg.resolve_plan(args_of(), "cpu", machine=HOPPER)
    table = rows(plan)
    assert plan.fp8 and plan.fused_loss == "two passes" and not plan.fused_mlp and not plan.sym_triton
    value, why = table["fused loss head"]
    assert value == "two passes" and "25% faster" in why
    assert "one pass dropped: RuntimeError: OutOfResources: out of resource: shared memory, Required: 262144" in why
    assert "\n" not in why
    assert table["fused MLP"][0] == "off"
    # the output and each gradient are 1.5x: a relative error of 0.5 (the largest names one of them)
    assert re.fullmatch(r"auto: dropped: (out|grad_x|grad c_fc|grad c_proj) error 5\.0e-01 > tolerance 2e-02",
                        table["fused MLP"][1]), table["fused MLP"]
    # the Triton symmetric matmuls really fail on this CPU (no driver): dropped, Polar Express in torch
    assert table["symmetric matmuls"][0] == "torch" and "triton dropped: RuntimeError" in table["symmetric matmuls"][1]
    assert timed == [["two passes", "unfused"]]  # neither one pass nor the MLP was timed


def test_a_fused_path_must_beat_its_reference_by_the_margin(monkeypatch):
    monkeypatch.setattr(tg, "fused_loss_head", unfused_head)
    for ms, taken in (({"one pass": 3.0, "two passes": 3.5, "unfused": 4.0}, "one pass"),
                      ({"one pass": 3.6, "two passes": 3.5, "unfused": 4.0}, "two passes"),
                      ({"one pass": 3.95, "two passes": 3.96, "unfused": 4.0}, None),  # ~1%: within noise
                      ({"one pass": 5.0, "two passes": 4.5, "unfused": 4.0}, None)):
        monkeypatch.setattr(tg, "time_paths", fake_times(ms)[0])
        plan = tg.resolve_plan(args_of("--fused_mlp=off"), "cpu", machine=HOPPER)
        assert plan.fused_loss == taken, ms
        assert f"needs {tg.PLAN_MARGIN:.0%}" in rows(plan)["fused loss head"][1]


def test_a_dropped_path_leaves_the_reference_run_bitwise(monkeypatch):
    """The plan with the fused MLP dropped (it returned wrong values) is the plan of
    --fused_mlp=off, and two training steps built from it equal those of --fused_mlp=off."""
    monkeypatch.setattr(tg, "fused_mlp", lambda x, c_fc, c_proj: 1.1 * tg.unfused_mlp(x, c_fc, c_proj))
    flags = ["--fp8=off", "--attn_backend=sdpa", "--train_batch_sizes=64,64,64", "--grad_sum_dtype=float64",
             "--num_scheduled_iterations=6", "--num_extension_iterations=0", "--val_loss_every=0"]
    auto, off = args_of(*flags), args_of(*flags, "--fused_mlp=off")
    dropped = tg.resolve_plan(auto, "cpu", machine=HOPPER)
    reference = tg.resolve_plan(off, "cpu", machine=HOPPER)
    assert rows(dropped)["fused MLP"][1].startswith("auto: dropped: ") and "error 1.0e-01 > tolerance" in rows(dropped)["fused MLP"][1]
    assert dropped == reference and not dropped.fused_mlp
    losses = []
    for args, plan in ((auto, dropped), (off, reference)):
        trainer = tg.Trainer(args, 0, 1, plan, tg.Logger(None))
        trainer.restart_data()
        losses.append(([trainer.train_step(s) for s in range(2)], trainer.model.state_dict()))
    (la, sa), (lb, sb) = losses
    assert all(torch.equal(a, b) for a, b in zip(la, lb))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_forced_path_whose_check_fails_is_one_error_line_before_compile(monkeypatch, tmp_path, capsys):
    """--fused_mlp=on on a machine where the fused MLP computes wrong numbers: main() ends
    with one `error:` line naming the flag and the failed check, exit 2, and never compiles."""
    monkeypatch.setattr(tg.Machine, "of", staticmethod(lambda device: HOPPER))
    monkeypatch.setattr(tg, "fused_mlp", lambda x, c_fc, c_proj: 2 * tg.unfused_mlp(x, c_fc, c_proj))
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled before the plan's error"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_:
        tg.main([*SMALL, "--fp8=off", "--attn_backend=sdpa", "--fused_mlp=on", f"--log_dir={tmp_path}",
                 "--run_id=forced"])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and re.fullmatch(r"error: --fused_mlp=on: its start-up check failed: fused MLP: "
                                          r"(out|grad_x|grad c_fc|grad c_proj) error 1\.0e\+00 > tolerance 2e-02",
                                          err[0]), err
    log = (tmp_path / "forced.txt").read_text().splitlines()
    assert log[-1] == err[0] and "start-up plan (rank 0 of 1;" in "\n".join(log)


def test_preflight_plan_is_what_a_proven_cuda_rank_builds(monkeypatch):
    """tools/preflight.py traces tg.assumed_gpu_plan: the plan resolve_plan makes on an sm90
    rank where every check passes and every fused path is faster (FA3 from the hub, the
    fused head in one pass), for the record's flags and with paths turned off."""
    class Hub:  # a `kernels` module whose FA3 loads
        @staticmethod
        def get_kernel(repo, **kwargs):
            return type("Kernel", (), {"flash_attn_interface": object()})()

    monkeypatch.setitem(sys.modules, "kernels", Hub)
    monkeypatch.setattr(tg, "prove", lambda path, check, machine: tg.Proof(path, (("out", 1e-3, 1e-2),)))
    monkeypatch.setattr(tg, "time_paths", fake_times({"one pass": 1.0, "two passes": 2.0, "unfused": 3.0,
                                                      "fused": 1.0, "triton": 1.0, "torch": 2.0})[0])
    meta = dataclasses.replace(HOPPER, device=torch.device("meta"))
    for flags in ([], ["--fused_mlp=off"], ["--fused_loss=off", "--attn_backend=varlen"], ["--fp8=off"]):
        args = tg.parse_args(flags)
        proven = tg.resolve_plan(args, "meta", machine=meta)
        assumed = tg.assumed_gpu_plan(args, 1, tg.attention_sdpa, machine=meta)
        assert proven == assumed, (flags, proven, assumed)
    record = tg.assumed_gpu_plan(tg.parse_args([]), 8, tg.attention_sdpa)
    assert (record.attn_backend, record.fp8, record.fused_loss, record.fused_mlp, record.sym_triton, record.compile,
            record.act_dtype, record.ortho_dtype, record.grad_sum_dtype, record.loss_every) == (
        "fa3", True, "one pass", True, True, True, torch.bfloat16, torch.bfloat16, None, 25)


RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {repo!r})
    import train_gpt as tg
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    hopper = tg.Machine(torch.device("cpu"), cuda=True, capability=(9, 0), triton=True)
    if rank == 1:  # only rank 1's kernel fails
        def broken(*a):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        tg.fused_mlp = broken
    else:
        tg.fused_mlp = lambda x, c_fc, c_proj: tg.unfused_mlp(x, c_fc, c_proj)
    lines = []
    args = tg.parse_args({flags!r})
    plan = tg.resolve_plan(args, "cpu", rank, 2, log=lines.append if rank == 0 else None, machine=hopper)
    print(repr((plan.fused_mlp, lines)))
    dist.destroy_process_group()
""")


def test_ranks_agree_when_only_one_rank_fails(tmp_path):
    """Two gloo processes, the fused MLP failing on rank 1 only: both drop it, rank 0's
    table says so once, naming rank 1 and its error; neither waits on the other."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), port=port,
                                         flags=[*SMALL, "--fp8=off", "--attn_backend=sdpa"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    (on0, lines0), (on1, lines1) = (eval(o[0].strip().splitlines()[-1]) for o in outs)
    assert on0 is False and on1 is False and lines1 == []
    table = "\n".join(lines0)
    assert table.count("fused MLP") == 1
    assert ("auto: dropped: failed on rank 1: RuntimeError: CUDA error: an illegal memory access was encountered"
            in table), table


def test_selfcheck_proves_the_triton_kernels_under_the_interpreter_and_reports_a_drill():
    """tools/selfcheck.py on this CPU with TRITON_INTERPRET=1: the plan's table, the Triton
    kernels proven under the interpreter, exit 0; with --fail=fused_mlp that path is
    dropped with its error and the exit stays 0 (the plan falls back)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    for drill in ([], ["--fail=fused_mlp"]):
        out = subprocess.run([sys.executable, "tools/selfcheck.py", "--preset=tiny", *drill], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        text = out.stdout
        assert "start-up plan (rank 0 of 1;" in text and "Triton interpreter   on" in text
        for path in ("fused loss head, one pass", "fused loss head, two passes", "symmetric matmuls, float32"):
            assert f"[proven] {path} (interpreter): largest error:" in text, path
        if drill:
            assert re.search(r"\[DROPPED\] fused MLP, float32 \(interpreter\): (out|grad_x|grad c_fc|grad c_proj) "
                             r"error 1\.0e-01 > tolerance 2e-02", text), text
            assert "dropped: fused MLP, float32 (interpreter)" in text.splitlines()[-1]
        else:
            assert "[proven] fused MLP, float32 (interpreter)" in text
            assert text.splitlines()[-1] == "selfcheck: OK: every path the plan takes is proven"
