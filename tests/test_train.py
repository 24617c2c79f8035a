"""Training loop: warm-up reset, end-to-end CPU runs, equivalence across process counts,
and the one-line errors for bad input."""
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:([0-9.]+) train_time:(\d+)ms step_avg:([0-9.]+)ms$")
STEP_LINE = re.compile(r"^step:(\d+)/(\d+) loss:([0-9.]+) ")
SHORT = ["--preset=tiny", "--num_scheduled_iterations=6", "--num_extension_iterations=1", "--val_loss_every=0"]


def env(threads=1):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    e["OMP_NUM_THREADS"] = str(threads)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args, nproc=1):
    """train_gpt.py on nproc gloo processes, one thread each (up to 4 processes share 2 cores)."""
    if nproc == 1:
        cmd = [sys.executable, "train_gpt.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "train_gpt.py", *args]
    out = subprocess.run(cmd, cwd=REPO, env=env(1), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def parse(stdout):
    vals = [(int(m[1]), float(m[3])) for m in map(VAL_LINE.match, stdout.splitlines()) if m]
    steps = [(int(m[1]), float(m[3])) for m in map(STEP_LINE.match, stdout.splitlines()) if m]
    return vals, steps


# --- warm-up and reset ----------------------------------------------------------------

def small_args(**kw):
    return tg.parse_args(SHORT + [f"--{k}={v}" for k, v in kw.items()])


def test_warmup_then_reset_is_bit_identical_to_a_fresh_start():
    torch.set_num_threads(2)
    args = small_args()
    fresh = tg.Trainer(args, 0, 1, torch.device("cpu"), tg.Logger(None))
    warmed = tg.Trainer(args, 0, 1, torch.device("cpu"), tg.Logger(None))
    assert set(tg.warmup_steps(args)) >= {0, 1, 2, tg.split_step(args)}
    warmed.warmup()
    a, b = fresh.model.state_dict(), warmed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not warmed.model.split_done and warmed.model.windows == fresh.model.windows
    assert warmed.model.rotary.attn_scale == fresh.model.rotary.attn_scale == 0.1
    assert torch.equal(warmed.model.rotary.freqs, fresh.model.rotary.freqs)
    assert torch.equal(warmed.model.rotary.factor1, fresh.model.rotary.factor1)
    assert torch.equal(warmed.model.rotary.factor2, fresh.model.rotary.factor2)
    assert all(p.grad is None for p in warmed.model.parameters())

    def flat(tree, prefix=""):
        if isinstance(tree, torch.Tensor):
            return {prefix: tree}
        if isinstance(tree, dict):
            items = tree.items()
        elif isinstance(tree, (list, tuple)):
            items = enumerate(tree)
        else:
            return {prefix: tree}
        out = {}
        for k, v in items:
            out.update(flat(v, f"{prefix}/{k}"))
        return out

    sa, sb = flat(fresh.opt.state_dict()), flat(warmed.opt.state_dict())
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k
    # and the two then train identically (an even, an odd (Adam) and an even step)
    fresh.restart_data()
    warmed.restart_data()
    for step in range(3):
        la, lb = fresh.train_step(step), warmed.train_step(step)
        assert torch.equal(la, lb), step


def test_yarn_updates_exactly_when_the_long_window_changes(monkeypatch):
    args = small_args()
    model = tg.build_model(args, "meta")
    calls = []
    monkeypatch.setattr(model.rotary, "update_window", lambda old, new: calls.append((old, new)))
    changes = []
    for step in range(tg.total_steps(args)):
        before = len(calls)
        model.set_windows(*tg.windows_at(step, args))
        if len(calls) > before:
            changes.append(step)
    model.set_windows(*tg.final_windows(args), yarn=False)
    # S = 6: long windows 3 (steps 0-1), 7 (2-3), 11 (4-5), 13 (extension step 6)
    assert changes == [2, 4, 6]
    assert calls == [(3, 7), (7, 11), (11, 13)]
    assert model.windows == (6, 20)


# --- equivalence across process counts (gloo) -----------------------------------------

def test_same_losses_and_parameters_with_1_2_and_4_processes(tmp_path):
    """Short tiny runs covering Adam (odd) and non-Adam (even) steps, all three batch/window
    stages, the extension, the embed split and validation before, during and after training,
    on 1, 2 and 4 gloo processes (8, 4 and 2 micro-batches each).

    With the CPU default --grad_sum_dtype=auto (float64 gradient sums) every split of the 8
    micro-batches sums to the same bits, so the runs must agree exactly: the same parameters
    bit for bit and the same losses. This is a sharp test: a wrong shard, a missing average
    or a misplaced optimizer state would differ by the size of an update, and even a
    last-bit difference grows about 10x per step early in training."""
    common = SHORT + ["--val_loss_every=4", f"--log_dir={tmp_path}"]
    outs = {n: run_train(common + [f"--save_model={tmp_path / f'p{n}.pt'}"], nproc=n)
            for n in (1, 2, 4)}
    vals1, steps1 = parse(outs[1])
    assert [s for s, _ in steps1] == list(range(1, 8)) and [s for s, _ in vals1] == [0, 4, 7]
    assert "gradient sums over micro-batches: float64" in outs[1]
    for n in (2, 4):
        vals, steps = parse(outs[n])
        assert [s for s, _ in steps] == [s for s, _ in steps1] and [s for s, _ in vals] == [s for s, _ in vals1]
        for (_, a), (_, b) in zip(steps1 + vals1, steps + vals):
            assert b == pytest.approx(a, rel=1e-3), n

    ref = torch.load(tmp_path / "p1.pt")
    torch.set_num_threads(2)
    init = tg.Trainer(small_args(), 0, 1, torch.device("cpu"), tg.Logger(None)).model.state_dict()
    for k in ("lm_head", "embed", "value_embeds.0", "blocks.0.attn.qkvo", "blocks.10.mlp.c_proj", "scalars"):
        assert not torch.equal(ref[k], init[k]), k  # trained (embed: split off from lm_head)
    for n in (2, 4):
        other = torch.load(tmp_path / f"p{n}.pt")
        assert other.keys() == ref.keys()
        for k, v in ref.items():
            assert torch.equal(other[k], v), (n, k, (other[k].float() - v.float()).abs().max().item())


# --- end to end -------------------------------------------------------------------------

def test_run_sh_tiny_demo_learns_and_logs(tmp_path):
    """./run.sh on this GPU-less machine: the full tiny demo."""
    if shutil.which("bash") is None:
        pytest.skip("bash missing")
    out = subprocess.run(["bash", str(REPO / "run.sh"), f"--log_dir={tmp_path}", "--run_id=demo"], cwd=REPO,
                         env={**env(2), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stdout, log = out.stdout, tmp_path / "demo.txt"
    first = stdout.splitlines()[0]
    assert first.startswith("run.sh: no GPU found") and "tiny" in first
    vals, _ = parse(stdout)
    N = tg.total_steps(tg.parse_args(["--preset=tiny"]))
    assert vals[0][0] == 0 and vals[-1][0] == N
    assert vals[0][1] == pytest.approx(10.83, abs=0.05)
    assert vals[-1][1] <= vals[0][1] - 2.0
    text = log.read_text()
    source = (REPO / "train_gpt.py").read_text()
    assert text.startswith(source)
    assert text[len(source):].startswith("\n" + "=" * 100 + "\n")
    assert f"step:{N}/{N} val_loss:" in text and "peak memory" in text


# --- bad input: one clear line ---------------------------------------------------------

def fail(args, extra_env=None):
    e = {**env(2), **(extra_env or {})}
    out = subprocess.run([sys.executable, "train_gpt.py", *args], cwd=REPO, env=e, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_world_size_must_divide_8(tmp_path):
    msg = fail(["--preset=tiny", f"--log_dir={tmp_path}"], {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"})
    assert "WORLD_SIZE=3" in msg and "divide" in msg


def test_batch_not_divisible(tmp_path):
    msg = fail(["--preset=tiny", "--train_batch_sizes=500,768,1024", f"--log_dir={tmp_path}"])
    assert "train_batch_sizes" in msg and "500" in msg


def test_val_tokens_not_divisible(tmp_path):
    msg = fail(["--preset=tiny", "--val_tokens=5000", f"--log_dir={tmp_path}"])
    assert "--val_tokens=5000" in msg and "val_batch_size" in msg


def test_bad_grad_sum_dtype(tmp_path):
    msg = fail(["--preset=tiny", "--grad_sum_dtype=half", f"--log_dir={tmp_path}"])
    assert "--grad_sum_dtype=half" in msg and "float64" in msg


def test_resolve_device():
    assert tg.resolve_device("cpu", 3) == torch.device("cpu")
    assert tg.resolve_device("cuda", 3) == torch.device("cuda", 3)  # torchrun's LOCAL_RANK
    expected = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    assert tg.resolve_device("auto", 1) == expected


def test_missing_data(tmp_path):
    msg = fail(["--preset=tiny", f"--train_files={tmp_path}/nothing_*.bin", f"--log_dir={tmp_path}"])
    assert f"{tmp_path}/nothing_*.bin" in msg


def test_corrupt_shard_is_named(tmp_path):
    bad = tmp_path / "bad_val_000000.bin"
    bad.write_bytes(b"\x00" * 2048)
    msg = fail(["--preset=tiny", f"--val_files={bad}", f"--log_dir={tmp_path}"])
    assert str(bad) in msg and "magic" in msg


def test_nan_loss_names_the_step(tmp_path):
    msg = fail(["--preset=tiny", "--muon_lr=nan", f"--log_dir={tmp_path}"])
    assert "nan" in msg and re.search(r"at step \d+", msg)
