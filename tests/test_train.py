"""Training loop: warm-up reset, end-to-end CPU runs, equivalence across process counts,
and the one-line errors for bad input."""
import os
import re
import dataclasses
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:([0-9.]+) train_time:(\d+)ms(?: step_avg:([0-9.]+)ms)?$")
STEP_LINE = re.compile(r"^step:(\d+)/(\d+) mtp_loss:([0-9.]+) ")
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


def start_train(args, nproc=1, prefix=()):
    """train_gpt.py on nproc gloo processes, one thread each, started now (Popen); `prefix`
    goes before the command (conftest.py's early runs: `nice`)."""
    if nproc == 1:
        cmd = [sys.executable, "train_gpt.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "train_gpt.py", *args]
    return subprocess.Popen([*prefix, *cmd], cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish_train(proc):
    """The stdout of a run from start_train, which must succeed."""
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def run_train(args, nproc=1):
    """train_gpt.py on nproc gloo processes, one thread each (up to 4 processes share 2 cores)."""
    return finish_train(start_train(args, nproc))


def parse(stdout):
    vals = [(int(m[1]), float(m[3])) for m in map(VAL_LINE.match, stdout.splitlines()) if m]
    steps = [(int(m[1]), float(m[3])) for m in map(STEP_LINE.match, stdout.splitlines()) if m]
    return vals, steps


def small_args(**kw):
    return tg.parse_args(SHORT + [f"--{k}={v}" for k, v in kw.items()])


# --- equivalence across process counts (gloo) -----------------------------------------
# (first in this file: its runs have been training in the background since the session
# started (conftest.py); the in-process tests below then run without them on the cores)

def two_node_flags(folder: Path) -> list:
    return SHORT + ["--val_loss_every=4", f"--log_dir={folder}", "--run_id=nodes", "--checkpoint_every=5",
                    f"--save_model={folder / 'nodes.pt'}"]


def two_node_env(port: int) -> dict:
    return {**env(1), "PYTHON": sys.executable, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def start_process_runs(tmp_path_factory, prefix=()) -> dict:
    """Short tiny runs on 1, 2 and 4 gloo processes with checkpoints after steps 5 and 7 and
    the final model saved, and the two-node test's two agents (run.sh with NNODES=2), all
    started now: each process has one thread, so on CI's two cores they fill both.
    conftest.py starts them when the session starts, at a lower priority (`prefix`: `nice`),
    so that they use what the tests before this file leave idle."""
    folder, nodes = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("nodes")
    common = SHORT + ["--val_loss_every=4", f"--log_dir={folder}"]
    procs = {n: start_train(common + [f"--save_model={folder / f'p{n}.pt'}", f"--run_id=p{n}",
                                      "--checkpoint_every=5"], nproc=n, prefix=prefix) for n in (1, 2, 4)}
    port = free_port()
    agents = [subprocess.Popen([*prefix, "bash", str(REPO / "run.sh"), *two_node_flags(nodes)], cwd=REPO,
                               env={**two_node_env(port), "NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    return dict(folder=folder, nodes=nodes, port=port, procs=procs, agents=agents)


@pytest.fixture(scope="module")
def process_runs(early_runs, tmp_path_factory):
    """The runs of start_process_runs, finished: {n: stdout} for 1, 2 and 4 processes and
    outs["nodes"] = (the folder, the port, [(returncode, stdout, stderr) of node 0 and node
    1]), and the folder of their logs, checkpoints and models. The equivalence, resume and
    two-node tests below share them."""
    started = early_runs.get("process") or start_process_runs(tmp_path_factory)
    outs = {n: finish_train(proc) for n, proc in started["procs"].items()}
    results = [a.communicate(timeout=1800) for a in started["agents"]]
    outs["nodes"] = (started["nodes"], started["port"], [(a.returncode, *r) for a, r in zip(started["agents"], results)])
    return outs, started["folder"]


def test_same_losses_and_parameters_with_1_2_and_4_processes(process_runs):
    """Short tiny runs covering Adam (odd) and non-Adam (even) steps, all three batch/window
    stages, the extension, the embed split and validation before, during and after training,
    on 1, 2 and 4 gloo processes (8, 4 and 2 micro-batches each).

    With the CPU default --grad_sum_dtype=auto (float64 gradient sums) every split of the 8
    micro-batches sums to the same bits, so the runs must agree exactly: the same parameters
    bit for bit and the same losses. This is a sharp test: a wrong shard, a missing average
    or a misplaced optimizer state would differ by the size of an update, and even a
    last-bit difference grows about 10x per step early in training."""
    outs, tmp_path = process_runs
    vals1, steps1 = parse(outs[1])
    assert [s for s, _ in steps1] == list(range(1, 8)) and [s for s, _ in vals1] == [0, 4, 7]
    assert re.search(r"^  gradient sums +float64 +--grad_sum_dtype=auto, 8 micro-batch\(es\) per rank$", outs[1], re.M)
    assert re.search(r"^  gradient sums +float64 +--grad_sum_dtype=auto, 2 micro-batch\(es\) per rank$", outs[4], re.M)
    for n in (2, 4):
        vals, steps = parse(outs[n])
        assert [s for s, _ in steps] == [s for s, _ in steps1] and [s for s, _ in vals] == [s for s, _ in vals1]
        for (_, a), (_, b) in zip(steps1 + vals1, steps + vals):
            assert b == pytest.approx(a, rel=1e-3), n

    ref = torch.load(tmp_path / "p1.pt")["model"]
    torch.set_num_threads(2)
    init = tg.Trainer(small_args(), 0, 1, torch.device("cpu"), tg.Logger(None)).model.state_dict()
    for k in ("lm_head", "embed", "value_embeds.0", "blocks.0.attn.qkvo", "blocks.10.mlp.c_proj", "scalars"):
        assert not torch.equal(ref[k], init[k]), k  # trained (embed: split off from lm_head)
    for n in (2, 4):
        other = torch.load(tmp_path / f"p{n}.pt")["model"]
        assert other.keys() == ref.keys()
        for k, v in ref.items():
            assert torch.equal(other[k], v), (n, k, (other[k].float() - v.float()).abs().max().item())
    # the saved model reloads to the final validation loss (embed split, windows, YaRN state)
    model = tg.load_model(tmp_path / "p1.pt", attn_backend="sdpa")
    assert model.split_done and model.windows == tg.final_windows(small_args())
    final = tg.evaluate(model, model, model.args)
    assert f"{final:.4f}" == f"{vals1[-1][1]:.4f}"
    # without the YaRN state the loss differs: the check can tell (the split cannot be told
    # apart here: the step after it is even, so Adam has not moved embed from lm_head yet)
    assert torch.equal(model.embed, model.lm_head)
    model.rotary.reset()
    assert tg.evaluate(model, model, model.args) != final


def test_resumed_runs_end_bit_identical_to_uninterrupted_ones(process_runs, tmp_path):
    """--checkpoint_every / --resume on 1 and 2 gloo processes: a run resumed from the
    checkpoint after step 5 (an even step: Adam's gradients are still pending in it) ends
    with the same parameters, bit for bit, the same losses and the same final validation as
    the run that went on; the checkpoint holds the step, data position and optimizer state
    of every rank, and only the last two checkpoints are kept."""
    outs, runs = process_runs
    for n in (1, 2):
        common = SHORT + ["--val_loss_every=4", f"--log_dir={tmp_path}"]
        full = outs[n]
        assert sorted(p.name for p in runs.glob(f"p{n}.step*.pt")) == [f"p{n}.step000005.pt", f"p{n}.step000007.pt"]
        ckpt = torch.load(runs / f"p{n}.step000005.pt")
        assert ckpt["step"] == 5 and ckpt["world_size"] == n and len(ckpt["ranks"]) == n and ckpt["run_id"] == f"p{n}"
        assert all(r["grads"] for r in ckpt["ranks"])  # step 4 was even: Adam's gradients wait
        if n == 1:  # the same flags: the run and its log go on (a log cut off after that checkpoint)
            log = (runs / "p1.txt").read_text()
            cut = log.index(f"checkpoint: {runs / 'p1.step000005.pt'}\n")
            (tmp_path / "p1.txt").write_text(log[:cut + len(f"checkpoint: {runs / 'p1.step000005.pt'}\n")])
            shutil.copy(runs / "p1.step000005.pt", tmp_path / "p1.step000005.pt")
            resumed = run_train(common + [f"--resume={tmp_path / 'p1.step000005.pt'}", "--val_loss_every=0",
                                          f"--save_model={tmp_path / 'res1.pt'}"], nproc=n)
            line = next(l for l in resumed.splitlines() if l.startswith("resumed from "))
            assert line.startswith(f"resumed from {tmp_path / 'p1.step000005.pt'} at step 5; changed: ")
            assert "--val_loss_every=0 (was 4)" in line
            text = (tmp_path / "p1.txt").read_text()
            assert text.count("=" * 100) == 2 and text.startswith(log[:cut])  # one header, appended to
            assert text.splitlines()[-1].startswith("peak memory")
            stats = subprocess.run([sys.executable, str(REPO / "records" / "stats.py"), str(tmp_path / "p1.txt")],
                                   capture_output=True, text=True, timeout=300)
            assert stats.returncode == 0 and re.search(r"^runs: 1 ", stats.stdout, re.M), stats.stdout
            assert f"{parse(full)[0][-1][1]:.4f}" in stats.stdout
        else:  # another run id: a new log that says which run it continues
            resumed = run_train(common + [f"--run_id=res{n}", f"--resume={runs / f'p{n}.step000005.pt'}",
                                          f"--save_model={tmp_path / f'res{n}.pt'}"], nproc=n)
            assert f"continues run p{n} from {runs / f'p{n}.step000005.pt'} at step 5" in resumed
            assert (tmp_path / f"res{n}.txt").read_text().startswith((REPO / "train_gpt.py").read_text())
        vals_a, steps_a = parse(full)
        vals_b, steps_b = parse(resumed)
        assert [s for s, _ in steps_b] == [6, 7] and steps_b == steps_a[-2:]
        assert vals_b == vals_a[-1:]
        a, b = torch.load(runs / f"p{n}.pt")["model"], torch.load(tmp_path / f"res{n}.pt")["model"]
        for k in a:
            assert torch.equal(a[k], b[k]), (n, k)


def test_two_nodes_on_one_machine_train_as_one_process(process_runs):
    """run.sh's multi-node line, started twice as two torchrun agents (--nnodes=2, c10d
    rendezvous on 127.0.0.1, one gloo process each; the process_runs fixture starts them):
    global rank 0 alone writes the log and the checkpoints, rank 1 prints no step, and the
    result equals the one-process run's bit for bit (RANK, not LOCAL_RANK, picks each
    process's data). RUN_SH_DRY_RUN=1 shows the command run.sh starts."""
    outs, runs = process_runs
    folder, port, results = outs["nodes"]
    dry = subprocess.run(["bash", str(REPO / "run.sh"), *two_node_flags(folder)], cwd=REPO, capture_output=True,
                         text=True, env={**two_node_env(port), "NODE_RANK": "0", "RUN_SH_DRY_RUN": "1"}, timeout=300)
    command = dry.stdout.splitlines()[-1]
    assert (f"-m torch.distributed.run --nnodes=2 --node_rank=0 --nproc_per_node=1 --rdzv_backend=c10d "
            f"--rdzv_endpoint=127.0.0.1:{port} train_gpt.py --preset tiny") in command, dry.stdout
    assert [code for code, _, _ in results] == [0, 0], [out[-3000:] + err[-3000:] for _, out, err in results]
    (_, out0, _), (_, out1, _) = results
    assert parse(out0) == parse(outs[1]) and parse(out1) == ([], [])
    assert sorted(p.name for p in folder.iterdir()) == ["nodes.pt", "nodes.step000005.pt", "nodes.step000007.pt",
                                                        "nodes.txt"]
    assert "run nodes: 2 process(es) x 4 micro-batches" in (folder / "nodes.txt").read_text()
    a, b = torch.load(runs / "p1.pt")["model"], torch.load(folder / "nodes.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_flags_or_process_counts(process_runs, tmp_path, capsys, monkeypatch):
    outs, runs = process_runs
    assert "checkpoint: " in outs[1]
    ckpt = runs / "p1.step000007.pt"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for flags, words in ((["--muon_lr=0.03"], ["--muon_lr=0.03 (checkpoint: 0.023)"]),
                         ([], []),
                         (["--preset=tiny"], ["--num_scheduled_iterations=60 (checkpoint: 6)"])):
        argv = (SHORT if flags != ["--preset=tiny"] else []) + flags + [f"--log_dir={tmp_path}/l", f"--resume={ckpt}"]
        if not words:  # the same flags but 2 processes
            monkeypatch.setenv("WORLD_SIZE", "2")
            words = ["made by 1 process(es), this run has 2"]
        with pytest.raises(SystemExit) as exit_info:
            tg.main(argv)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and all(w in err for w in words), err
    with pytest.raises(SystemExit):
        tg.main(SHORT + [f"--log_dir={tmp_path}/l", f"--resume={runs / 'p1.txt'}"])
    err = capsys.readouterr().err
    assert "not a model saved by train_gpt.py" in err and "weights_only" not in err and len(err.splitlines()) == 1


# --- warm-up and reset ----------------------------------------------------------------

def test_warmup_then_reset_is_bit_identical_to_a_fresh_start():
    torch.set_num_threads(2)
    args = small_args(num_scheduled_iterations=3)  # 4 steps: every stage, the split and the extension
    fresh = tg.Trainer(args, 0, 1, torch.device("cpu"), tg.Logger(None))
    primed = tg.Trainer(args, 0, 1, torch.device("cpu"), tg.Logger(None))
    assert set(tg.warmup_steps(args)) >= {0, 1, 2, tg.split_step(args)}
    primed.warmup()
    a, b = fresh.model.state_dict(), primed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not primed.model.split_done and primed.model.windows == fresh.model.windows
    assert primed.model.rotary.attn_scale == fresh.model.rotary.attn_scale == 0.1
    assert torch.equal(primed.model.rotary.freqs, fresh.model.rotary.freqs)
    assert torch.equal(primed.model.rotary.factor1, fresh.model.rotary.factor1)
    assert torch.equal(primed.model.rotary.factor2, fresh.model.rotary.factor2)
    assert all(p.grad is None for p in primed.model.parameters())

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

    sa, sb = flat(fresh.opt.state_dict()), flat(primed.opt.state_dict())
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k
    # and the two then train identically (an even, an odd (Adam) and an even step)
    fresh.restart_data()
    primed.restart_data()
    for step in range(3):
        la, lb = fresh.train_step(step), primed.train_step(step)
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


# --- end to end -------------------------------------------------------------------------

DEMO_FLAGS = ["--num_scheduled_iterations=15", "--num_extension_iterations=1", "--val_loss_every=5"]


def test_run_sh_tiny_demo_learns_and_logs(tmp_path):
    """./run.sh on this GPU-less machine: the tiny demo, its schedule shortened to a quarter
    (run.sh passes the extra flags on), so that the suite stays short; every stage, the split
    and the extension still run, and the loss still falls by 2."""
    if shutil.which("bash") is None:
        pytest.skip("bash missing")
    out = subprocess.run(["bash", str(REPO / "run.sh"), f"--log_dir={tmp_path}", "--run_id=demo", *DEMO_FLAGS],
                         cwd=REPO, env={**env(2), "PYTHON": sys.executable}, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stdout, log = out.stdout, tmp_path / "demo.txt"
    first = stdout.splitlines()[0]
    assert first.startswith("run.sh: no GPU found") and "tiny" in first
    vals, _ = parse(stdout)
    N = tg.total_steps(tg.parse_args(["--preset=tiny", *DEMO_FLAGS]))
    assert N == 16 and [s for s, _ in vals] == [0, 5, 10, 15, 16]
    assert vals[0][1] == pytest.approx(10.83, abs=0.05)
    assert vals[-1][1] <= vals[0][1] - 2.0
    text = log.read_text()
    source = (REPO / "train_gpt.py").read_text()
    assert text.startswith(source)
    assert text[len(source):].startswith("\n" + "=" * 100 + "\n")
    assert f"step:{N}/{N} val_loss:" in text and "peak memory" in text
    # the start-up plan, once, as a table: each choice, its value and why
    assert text.count("start-up plan (rank 0 of 1;") == 1
    for row in ("  attention            sdpa       auto: the reference on cpu",
                "  fused MLP            off        fused MLP needs a CUDA GPU or TRITON_INTERPRET=1 (device is cpu)"):
        assert row in text, row


# --- bad input: one clear line, before step 0 -------------------------------------------

def fail(args, extra_env=None):
    """A real process: exit code 2, no traceback, the last stderr line is the one error."""
    e = {**env(2), **(extra_env or {})}
    out = subprocess.run([sys.executable, "train_gpt.py", *args], cwd=REPO, env=e, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ")
    return lines[-1]


def write_tokens(path, tokens):
    import numpy as np
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


@pytest.fixture
def bad_inputs(tmp_path):
    """Files for the table below; the sample corpus for everything else."""
    sample = sorted((REPO / "data" / "sample").glob("sample_train_*.bin"))
    (tmp_path / "two").mkdir()
    shutil.copy(sample[0], tmp_path / "two" / "t_train_000001.bin")
    (tmp_path / "two" / "t_train_000002.bin").write_bytes(b"\x00" * 600)
    (tmp_path / "zero").mkdir()
    shutil.copy(sample[0], tmp_path / "zero" / "t_train_000001.bin")
    write_tokens(tmp_path / "zero" / "t_train_000002.bin", [])
    write_tokens(tmp_path / "little_train_000001.bin", [50256, 1, 2, 3] * 100)
    val = tg.read_shard(REPO / "data" / "sample" / "sample_val_000000.bin").numpy().astype("int64")
    val[3000] = 60000
    write_tokens(tmp_path / "badid_val_000000.bin", val)
    (tmp_path / "logs_file").write_text("not a folder")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "taken.txt").write_text("an earlier run's log\n")
    return tmp_path


# (flags, words the one error line must contain); {t} is the fixture's folder
BAD_INPUTS = [
    (["--compile=yes"], ["--compile=yes", "auto, on, off"]),
    (["--compile=true"], ["--compile=true"]),
    (["--fp8=maybe"], ["--fp8=maybe"]),
    (["--warmup=yes"], ["--warmup=yes", "true, false"]),
    (["--val_batch_size=0"], ["--val_batch_size=0", "> 0"]),
    (["--val_tokens=0"], ["--val_tokens=0"]),
    (["--num_extension_iterations=-3"], ["--num_extension_iterations=-3", ">= 0"]),
    (["--muon_lr=nan"], ["--muon_lr=nan"]),
    (["--long_windows=3,7"], ["--long_windows=3,7", "3 comma-separated"]),
    (["--no_such_flag=1"], ["--no_such_flag"]),
    (["--fp8=on"], ["--fp8=on", "CUDA"]),
    (["--attn_backend=fa3"], ["--attn_backend=fa3", "Hopper"]),
    (["--attn_backend=flex"], ["--attn_backend=flex"]),
    (["--train_batch_sizes=500,768,1024"], ["train_batch_sizes", "500"]),
    (["--val_tokens=5000"], ["--val_tokens=5000", "val_batch_size"]),
    (["--grad_sum_dtype=half"], ["--grad_sum_dtype=half", "float64"]),
    (["--train_files={t}/nothing_*.bin"], ["{t}/nothing_*.bin", "data/fineweb.py"]),
    (["--train_files={t}/two/t_train_*.bin"], ["{t}/two/t_train_000002.bin", "shorter than the header"]),
    (["--val_files={t}/two/t_train_000002.bin"], ["{t}/two/t_train_000002.bin", "bad token shard"]),
    (["--train_files={t}/zero/t_train_*.bin"], ["{t}/zero/t_train_000002.bin", "no tokens"]),
    (["--train_files={t}/little_train_*.bin"], ["needs at least", "400", "--train_files={t}/little_train_*.bin"]),
    (["--val_tokens=40960", "--val_batch_size=2048"], ["--val_tokens=40960", "40,110"]),
    (["--log_dir={t}/logs_file"], ["{t}/logs_file", "is a file"]),
    (["--log_dir={t}/logs_file/sub"], ["--log_dir={t}/logs_file/sub", "cannot write"]),  # as a read-only folder
    (["--save_model=/nonexistent/dir/m.pt"], ["--save_model=/nonexistent/dir/m.pt", "does not exist"]),
    (["--save_model={t}"], ["--save_model={t}", "folder"]),
    (["--run_id=taken"], ["{t}/logs/taken.txt", "exists"]),
    (["--run_id=a/b"], ["--run_id=a/b"]),
    (["--num_layers=12"], ["--num_layers=12"]),
    (["--num_heads=5"], ["--num_heads=5", "even"]),
    (["--head_dim=18", "--model_dim=108"], ["--head_dim=18", "multiple of 4"]),
    (["--model_dim=100"], ["--model_dim=100", "--num_heads x --head_dim = 6 x 16 = 96"]),
    (["--num_scheduled_iteration=2"], ["--num_scheduled_iteration=2", "did you mean --num_scheduled_iterations?"]),
    (["--resume=README.md"], ["README.md", "not a model saved by train_gpt.py"]),
    (["--resume={t}"], ["is a folder"]),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["--device=cuda"], ["--device=cuda", "no usable CUDA GPU"]))


@pytest.mark.parametrize("flags,words", BAD_INPUTS, ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_input_fails_in_one_line_before_training(flags, words, bad_inputs, capsys, monkeypatch):
    """Run in-process (main()): exit code 2, exactly one stderr line naming the culprit, no
    training step, no log written, and the earlier log untouched."""
    t = str(bad_inputs)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    argv = ["--preset=tiny", f"--log_dir={t}/logs"] + [f.replace("{t}", t) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        tg.main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w.replace("{t}", t) in lines[0], (w, lines[0])
    assert "step:" not in out
    assert "weights_only" not in lines[0]
    assert sorted(p.name for p in (bad_inputs / "logs").iterdir()) == ["taken.txt"]
    assert (bad_inputs / "logs" / "taken.txt").read_text() == "an earlier run's log\n"


def test_world_size_must_divide_8(tmp_path):
    msg = fail(["--preset=tiny", f"--log_dir={tmp_path}"], {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"})
    assert "WORLD_SIZE=3" in msg and "divide" in msg


def test_bad_token_id_names_shard_and_position_in_the_log(bad_inputs):
    """Token ids are checked when a shard is loaded: the error names the shard and the
    first bad position, and is the log's last line."""
    t = bad_inputs
    msg = fail(["--preset=tiny", f"--val_files={t}/badid_val_*.bin", f"--log_dir={t}/logs", "--run_id=ids"])
    assert f"{t}/badid_val_000000.bin" in msg and "60000" in msg and "3,000" in msg and "--vocab_size=50257" in msg
    assert (t / "logs" / "ids.txt").read_text().splitlines()[-1] == msg


def test_resolve_device():
    assert tg.resolve_device("cpu", 3) == torch.device("cpu")
    expected = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    assert tg.resolve_device("auto", 1) == expected


def test_default_data_paths_resolve_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = tg.parse_args(["--preset=tiny"])
    assert args.train_files == str(REPO / "data" / "sample" / "sample_train_*.bin")
    assert tg.list_shards(args.train_files) and tg.list_shards(args.val_files)
    assert tg.parse_args(["--preset=tiny", "--train_files=mine/*.bin"]).train_files == "mine/*.bin"


def test_help_shows_meaning_allowed_values_and_preset_defaults(capsys):
    with pytest.raises(SystemExit):
        tg.parse_args(["--preset=tiny", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--compile V torch.compile(fullgraph=True); auto: on for CUDA [one of auto, on, off; default: auto]" in out
    assert "[> 0; default: 512,768,1024]" in out  # the tiny preset's batch sizes, not the record's
    for f in dataclasses.fields(tg.Hyperparameters):
        assert f"--{f.name} V" in out


def test_nan_loss_names_the_step_and_ends_the_log(tmp_path):
    msg = fail(SHORT + ["--adam_lr=1e30", f"--log_dir={tmp_path}", "--run_id=nan"])
    assert "nan" in msg and re.search(r"at step \d+", msg)
    assert (tmp_path / "nan.txt").read_text().splitlines()[-1] == msg


@pytest.mark.parametrize("value", ["abc", "3", "0", "16"])
def test_run_sh_rejects_a_bad_nproc_per_node(value):
    if shutil.which("bash") is None:
        pytest.skip("bash missing")
    out = subprocess.run(["bash", str(REPO / "run.sh")], cwd=REPO, env={**env(1), "NPROC_PER_NODE": value},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == (f"run.sh: NPROC_PER_NODE={value}: expected 1, 2, 4 or 8 (processes per node; "
                                  f"the world size must divide 8)")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_ends_with_one_line_in_the_log(tmp_path, sig):
    """Ctrl-C or SIGTERM during training: exit code 130, `interrupted at step N` on stderr
    and as the log's last line, no traceback, and a checkpoint when checkpointing is on."""
    import signal
    proc = subprocess.Popen([sys.executable, "train_gpt.py", "--preset=tiny", f"--log_dir={tmp_path}", "--run_id=int",
                             "--checkpoint_every=1000"],
                            cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait for the first training step, however long it takes
            if STEP_LINE.match(line):
                break
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = [l for l in err.splitlines() if l.strip()][-1]
    assert re.fullmatch(r"interrupted at step \d+", last), err
    assert (tmp_path / "int.txt").read_text().splitlines()[-1] == last
    # the step in progress finished, and with checkpointing on the run left a checkpoint there
    step = int(last.split()[-1])
    ckpt = torch.load(tmp_path / f"int.step{step:06d}.pt")
    assert ckpt["step"] == step >= 1


def test_save_model_round_trip_keeps_split_windows_and_yarn(tmp_path):
    """save_model writes what evaluation needs beyond the weights: a model with embed split
    off (and different from lm_head), later windows and a YaRN state reloads to the same
    validation loss; a bad path is one clear error."""
    torch.manual_seed(0)
    args = small_args()
    model = tg.build_model(args, "cpu")
    model.split_embed()
    with torch.no_grad():
        model.embed.mul_(-1)
    model.set_windows(3, 7)
    model.set_windows(6, 13)
    model.set_windows(*tg.final_windows(args), yarn=False)
    expected = tg.evaluate(model, model, args)
    tg.save_model(model, tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left
    loaded = tg.load_model(tmp_path / "m.pt", attn_backend="sdpa")
    assert loaded.split_done and loaded.windows == (6, 20)
    assert loaded.rotary.attn_scale == model.rotary.attn_scale
    assert torch.equal(loaded.rotary.freqs, model.rotary.freqs)
    assert torch.equal(loaded.rotary.factor1, model.rotary.factor1)
    assert tg.evaluate(loaded, loaded, loaded.args) == expected
    with pytest.raises(tg.ConfigError, match="no such model file"):
        tg.load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(tg.ConfigError, match="junk.pt"):
        tg.load_model(tmp_path / "junk.pt")


def test_main_sets_expandable_segments_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    tg.set_allocator_defaults()
    assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")
    tg.set_allocator_defaults()
    assert os.environ["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:64"
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    tg.set_allocator_defaults()
    assert "PYTORCH_ALLOC_CONF" not in os.environ


def test_import_does_not_set_the_allocator():
    out = subprocess.run([sys.executable, "-c", "import os, train_gpt; print(os.environ.get('PYTORCH_ALLOC_CONF'))"],
                         cwd=REPO, env={k: v for k, v in env(1).items() if "ALLOC_CONF" not in k},
                         capture_output=True, text=True, timeout=600)
    assert out.stdout.strip() == "None", out.stderr


def test_cpu_threads_do_not_oversubscribe(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert tg.cpu_threads_per_process(1) == cores
    assert tg.cpu_threads_per_process(2) == max(1, cores // 2)
    assert tg.cpu_threads_per_process(4 * cores) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert tg.cpu_threads_per_process(2) == 3


def test_a_full_disk_is_one_line_naming_the_log(tmp_path):
    log = tg.Logger(tmp_path / "x.txt")
    log.path = Path("/dev/full")  # every write fails with ENOSPC
    if not log.path.exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(tg.ConfigError, match="cannot write the log /dev/full: No space left on device"):
        log("step:1/2 train_time:1ms")


def test_a_failed_log_write_leaves_no_torn_line(tmp_path, monkeypatch):
    log = tg.Logger(tmp_path / "x.txt")
    log("first line")
    real_write = os.write

    def short_write(fd, data):  # the disk fills up in the middle of the line
        real_write(fd, data[:5])
        return 5
    monkeypatch.setattr(tg.os, "write", short_write)
    with pytest.raises(tg.ConfigError, match=f"cannot write the log {tmp_path / 'x.txt'}"):
        log("second line, cut")
    assert (tmp_path / "x.txt").read_text() == "first line\n"


def test_resume_after_the_warm_up_continues_from_the_checkpoint(tmp_path):
    """What main() does on a compiled run with --resume: the warm-up (which ends in the
    initial state), then the checkpoint restored; the next steps equal those of the run
    that wrote the checkpoint (eager here: the warm-up's steps run without compiling)."""
    torch.set_num_threads(2)
    args = small_args(log_dir=tmp_path, num_scheduled_iterations=4)  # 5 steps, all 5 run in the warm-up
    a = tg.Trainer(args, 0, 1, torch.device("cpu"), tg.Logger(None))
    a.restart_data()
    for step in range(3):
        a.train_step(step)
    path = a.checkpoint(3, 0.0, "w")
    b = tg.Trainer(args, 0, 1, torch.device("cpu"), tg.Logger(None))
    b.warmup()
    first, _, position = tg.restore_checkpoint(torch.load(path), b.model, b.opt, 0, b.plan)
    assert first == 3 and b.model.windows == a.model.windows
    b.restart_data(first, position)
    for step in (3, 4):
        assert torch.equal(a.train_step(step), b.train_step(step)), step
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


# --- a process that dies or hangs mid-run ---------------------------------------------

DYING = ["--preset=tiny", "--num_scheduled_iterations=10", "--num_extension_iterations=1", "--val_loss_every=0",
         "--checkpoint_every=2"]


def start_two_ranks(tmp_path, run_id):
    """Two gloo processes of an 11-step tiny run (checkpoints every 2 steps), started as
    torchrun would start them; returns the two Popen objects, rank 0 first."""
    e = env(1)
    e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    args = [*DYING, f"--log_dir={tmp_path}", f"--run_id={run_id}"]
    return [subprocess.Popen([sys.executable, "train_gpt.py", *args], cwd=REPO, env={**e, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]


def wait_for_step(procs, step):
    """Reads rank 0's console until it has logged `step` (however long that takes)."""
    for line in procs[0].stdout:
        if line.startswith(f"step:{step}/"):
            return
    raise AssertionError(f"rank 0 ended before step {step}: {procs[0].stderr.read()[-2000:]}")


def ended_with(proc, timeout=600):
    _, err = proc.communicate(timeout=timeout)
    lines = [l for l in err.splitlines() if l.strip()]
    return proc.returncode, lines[-1] if lines else "", err


@pytest.mark.parametrize("how", ["killed", "hangs"])
def test_a_dead_or_hung_peer_ends_the_survivor_with_one_line_naming_the_checkpoint(tmp_path, how):
    """killed: rank 1 gets SIGKILL after step 5; rank 0's next collective fails and it ends
    with exit code 2 and one `error:` line naming the step and the latest checkpoint, no
    traceback. hangs: rank 1 is stopped (SIGSTOP), so rank 0 blocks in a collective; a
    SIGTERM (what torchrun sends) ends it within STOP_GRACE_S with such a line. The named
    checkpoint then resumes the run on two processes."""
    import signal
    procs = start_two_ranks(tmp_path, how)
    try:
        wait_for_step(procs, 5)
        if how == "killed":
            procs[1].kill()
        else:
            procs[1].send_signal(signal.SIGSTOP)  # rank 0 blocks in its next collective
            procs[0].send_signal(signal.SIGTERM)
        code, last, err = ended_with(procs[0])
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    words = (r"a peer process stopped or its connection closed at step \d+ \(.+\)" if how == "killed" else
             rf"stopped by SIGTERM at step \d+, still waiting for another process {tg.STOP_GRACE_S:.0f}s later "
             r"\(a peer process stopped or hangs\)")
    m = re.fullmatch(rf"error: {words}; resume with --resume=(\S+)", last)
    assert m, last
    assert (tmp_path / f"{how}.txt").read_text().splitlines()[-1] == last
    ckpt = Path(m[1])
    assert int(re.search(r"at step (\d+)", last)[1]) >= 5
    assert ckpt == max(tmp_path.glob(f"{how}.step*.pt"))  # the latest checkpoint
    if how == "killed":
        out = run_train([*DYING, f"--log_dir={tmp_path}", "--run_id=again", f"--resume={ckpt}"], nproc=2)
        assert f"continues run killed from {ckpt}" in out
        vals, _ = parse(out)
        assert vals and vals[-1][0] == 11


# the flags a resumed run may change, as README's "Checkpoints" lists them: where things go
# and which kernels compute them, never what is computed (written out, not read from the code)
RESUMABLE_CHANGES = {"train_files", "val_files", "val_loss_every", "run_id", "log_dir", "device", "attn_backend",
                     "fp8", "compile", "fused_loss", "fused_mlp", "warmup", "save_model", "checkpoint_every",
                     "resume", "preset"}


def test_resume_refuses_exactly_the_flags_that_change_the_math(tmp_path):
    base = tg.parse_args(["--preset=tiny"])
    path = tmp_path / "c.pt"
    torch.save(dict(format=tg.CHECKPOINT_FORMAT, args=dataclasses.asdict(base), world_size=1), path)

    def other(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, tuple):
            return (other(value[0]),) + value[1:]
        return value + "x" if isinstance(value, str) else value * 2 + 1

    for f in dataclasses.fields(tg.Hyperparameters):
        if f.name == "resume":  # another checkpoint file with the same contents
            torch.save(torch.load(path), tmp_path / "d.pt")
        value = str(tmp_path / "d.pt") if f.name == "resume" else other(getattr(base, f.name))
        changed = dataclasses.replace(base, **{"resume": str(path), f.name: value})
        if f.name in RESUMABLE_CHANGES:
            assert tg.check_resume(changed, 1)["world_size"] == 1, f.name
        else:
            with pytest.raises(tg.ConfigError, match=f"other values of --{f.name}="):
                tg.check_resume(changed, 1)
    with pytest.raises(tg.ConfigError, match="made by 1 process"):
        tg.check_resume(dataclasses.replace(base, resume=str(path)), 2)


def test_the_clock_stops_inside_paused_and_waits_for_the_device_at_both_ends(monkeypatch):
    now, events = [100.0], []
    monkeypatch.setattr(tg.time, "perf_counter", lambda: now[0])
    clock = tg.TrainClock(lambda: events.append(("sync", now[0])), ms=250.0)  # resumed after 250 ms
    now[0] = 102.0
    assert clock.elapsed_ms() == 250.0 + 2000.0
    with clock.paused():
        assert clock.ms == 2250.0
        now[0] = 110.0  # 8 s of validation: not counted
    now[0] = 111.5
    assert clock.elapsed_ms() == 2250.0 + 1500.0
    assert events == [("sync", 100.0), ("sync", 102.0), ("sync", 110.0)]
