"""tools/bench.py: its FLOP counting helper, synthetic shards, and a CPU smoke run."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench", REPO / "tools" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_attended_keys_matches_a_naive_count():
    T, w = 50, 7
    cu = torch.tensor([0, 10, 11, 30, T, T, T], dtype=torch.int32)
    doc_start = [max(s for s in (0, 10, 11, 30) if s <= i) for i in range(T)]
    naive = sum(1 for i in range(T) for j in range(T) if doc_start[j] == doc_start[i] and i - w <= j <= i)
    assert bench.attended_keys(cu, T, w) == naive


def test_synthetic_shards_are_valid(tmp_path):
    bench.write_synthetic_shards(tmp_path, 200_000, 50_000)
    train = tg.read_shard(tmp_path / "synth_train_000001.bin")
    val = tg.read_shard(tmp_path / "synth_val_000000.bin")
    assert train.numel() == 200_000 and val.numel() == 50_000
    assert train[0] == tg.BOS_ID and val[0] == tg.BOS_ID
    mean_doc = train.numel() / int((train == tg.BOS_ID).sum())
    assert 300 < mean_doc < 500
    assert int(train.int().max()) < 50257


def test_bench_smoke_on_cpu():
    out = subprocess.run([sys.executable, "tools/bench.py", "--preset=tiny", "--steps=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for stage in ("stage 1", "stage 2", "stage 3", "extension"):
        assert stage in out.stdout
    assert "[PASS] attention sdpa" in out.stdout and "ALL CHECKS PASSED" in out.stdout


def test_bench_rejects_more_steps_than_a_stage_holds():
    # tiny: 60 scheduled steps, stages of 20; 2 settle + 16 timed + 2 profiled steps fill one, 17 do not fit
    out = subprocess.run([sys.executable, "tools/bench.py", "--preset=tiny", "--steps=17"], cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 2 and "--steps=17" in out.stderr and "use 1 to 16" in out.stderr
