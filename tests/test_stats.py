"""Tests for records/stats.py (record statistics over train_gpt.py logs).

The expected numbers are the published ones from the two seed record write-ups
("Timing and Validation" blocks), not outputs of the code under test.
"""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STATS_PY = REPO / "records" / "stats.py"
SEP = "=" * 100


def _load_module():
    spec = importlib.util.spec_from_file_location("records_stats", STATS_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up while the class is built
    spec.loader.exec_module(mod)
    return mod


stats = _load_module()

# Published test vectors: (losses, times in s, p, loss mean, loss std, time mean, time std)
PARTIAL_KEY_OFFSET = (
    [3.2788, 3.2774, 3.2786, 3.2792, 3.2762, 3.2769, 3.2781, 3.2778, 3.2761, 3.2783, 3.2809],
    [128.892, 128.907, 128.912, 128.844, 128.822, 128.869, 128.818, 128.882, 128.886, 128.95, 128.946],
    "0.0004", "3.2780", "0.0014", "128.8844", "0.0443",
)
PAIRED_HEAD = (
    [3.2793, 3.2796, 3.2783, 3.2782, 3.2784],
    [108.695, 108.844, 108.775, 108.795, 108.87],
    "0.0063", "3.2788", "0.0006", "108.7958", "0.0679",
)

FAKE_SOURCE = '''"""Fake trainer. Its docstring quotes a val line that must not be parsed:
step:1775/1775 val_loss:9.9999 train_time:1ms step_avg:0.00ms
"""
import torch

# =====================================================================================
# 1. Config
# =====================================================================================
lr = 0.023
num_steps = 1775


def main():
    print(f"step:{step}/{num_steps} val_loss:{loss:.4f} train_time:{ms}ms step_avg:{avg:.2f}ms")
'''


def make_log(path, loss, time_s, total=1775, final=True, source=FAKE_SOURCE, separator=True):
    """Write a log in train_gpt.py's layout; returns the path."""
    ms = int(round(time_s * 1000))
    parts = [source]
    if separator:
        parts.append(SEP + "\n")
    parts.append("Running Python 3.12.3\nRunning PyTorch 2.9.0 compiled for CUDA 12.8\n"
                 "Running Triton 3.5.0\n")
    parts.append("| NVIDIA-SMI 570.00   Driver Version: 570.00   CUDA Version: 12.8 |\n")
    if separator:
        parts.append(SEP + "\n")
    parts.append(f"step:0/{total} val_loss:10.8258 train_time:0ms step_avg:0.03ms\n")
    parts.append(f"step:1/{total} train_time:95ms step_avg:95.00ms\n")
    parts.append(f"step:17/{total} train_time:1034ms step_avg:60.82ms eta:107s\n")
    mid = total // 2
    parts.append(f"step:{mid}/{total} val_loss:3.9012 train_time:{ms // 2}ms "
                 f"step_avg:{ms / 2 / mid:.2f}ms\n")
    parts.append(f"step:{total - 1}/{total} train_time:{ms - 60}ms step_avg:61.00ms eta:0s\n")
    if final:
        parts.append(f"step:{total}/{total} val_loss:{loss:.4f} train_time:{ms}ms "
                     f"step_avg:{ms / total:.2f}ms\n")
    parts.append("peak memory allocated: 29000 MiB reserved: 31000 MiB\n")
    Path(path).write_text("".join(parts))
    return path


def write_logs(dirpath, losses, times, **kw):
    return [make_log(dirpath / f"run{i:02d}.txt", l, t, **kw)
            for i, (l, t) in enumerate(zip(losses, times))]


def run_cli(*args):
    return subprocess.run([sys.executable, str(STATS_PY), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def field(out, pattern):
    m = re.search(pattern, out, re.MULTILINE)
    assert m, f"pattern {pattern!r} not in output:\n{out}"
    return m.groups()


# --- the published test vectors ---------------------------------------------------------


@pytest.mark.parametrize("vec", [PARTIAL_KEY_OFFSET, PAIRED_HEAD], ids=["partial_key_offset", "paired_head"])
def test_seed_vectors_cli(tmp_path, vec):
    losses, times, p, lmean, lstd, tmean, tstd = vec
    logs = write_logs(tmp_path, losses, times)
    res = run_cli(*logs)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert field(out, r"^runs: (\d+) \(skipped: (\d+)\)$") == (str(len(losses)), "0")
    assert field(out, r"^val loss: mean (\S+) std (\S+)$") == (lmean, lstd)
    assert field(out, r"^train time \(s\): mean (\S+) std (\S+)$") == (tmean, tstd)
    assert field(out, r" p=(\d\.\d{4}) ") == (p,)
    assert field(out, r"^record criterion p < 0\.01: (\w+)$") == ("PASS",)
    # every final loss and time printed as logged
    assert field(out, r"^losses = \[(.*)\]$") == (", ".join(f"{x:.4f}" for x in losses),)
    assert field(out, r"^times = \[(.*)\]$") == (", ".join(f"{x:.3f}" for x in times),)
    assert res.stderr == ""


@pytest.mark.parametrize("vec", [PARTIAL_KEY_OFFSET, PAIRED_HEAD], ids=["partial_key_offset", "paired_head"])
def test_seed_vectors_api(tmp_path, vec):
    losses, times, p, lmean, lstd, tmean, tstd = vec
    logs = write_logs(tmp_path, losses, times)
    runs = [stats.parse_log(path) for path in logs]
    assert [r.val_loss for r in runs] == losses
    assert [r.train_time_ms for r in runs] == [int(round(t * 1000)) for t in times]
    assert all(r.final_step == r.total_steps == 1775 for r in runs)
    s = stats.summarize(runs)
    assert (f"{s.loss_mean:.4f}", f"{s.loss_std:.4f}") == (lmean, lstd)
    assert (f"{s.time_mean:.4f}", f"{s.time_std:.4f}") == (tmean, tstd)
    assert f"{s.pvalue:.4f}" == p
    assert s.passed is True and s.n == len(losses)


def test_parse_log_fields(tmp_path):
    path = make_log(tmp_path / "a.txt", 3.2788, 108.795, total=1775)
    run = stats.parse_log(path)
    assert run.final_step == 1775 and run.total_steps == 1775
    assert run.val_loss == 3.2788  # not the 9.9999 quoted in the source's docstring
    assert run.train_time_ms == 108795 and run.train_time_s == 108.795
    assert run.source == FAKE_SOURCE
    assert [(p.step, p.val_loss) for p in run.val_history] == [(0, 10.8258), (887, 3.9012), (1775, 3.2788)]


def test_losses_above_target_fail(tmp_path, capsys):
    logs = write_logs(tmp_path, [3.2810, 3.2830, 3.2805], [110.0, 110.5, 111.0])
    assert stats.main([str(p) for p in logs]) == 0
    out = capsys.readouterr().out
    assert field(out, r"^record criterion p < 0\.01: (\w+)$") == ("FAIL",)
    assert float(field(out, r" p=(\d\.\d{4}) ")[0]) > 0.5  # mean above target


def test_alpha_and_target_options(tmp_path, capsys):
    losses, times = PAIRED_HEAD[:2]
    logs = [str(p) for p in write_logs(tmp_path, losses, times)]
    # p = 0.0063 passes at 0.01 but not at 0.005
    assert stats.main(logs + ["--alpha", "0.005"]) == 0
    out = capsys.readouterr().out
    assert field(out, r"^record criterion p < 0\.005: (\w+)$") == ("FAIL",)
    # mean 3.27876 is not significantly below 3.279
    assert stats.main(logs + ["--target", "3.279"]) == 0
    out = capsys.readouterr().out
    assert "mean val loss < 3.279" in out
    assert field(out, r"^record criterion p < 0\.01: (\w+)$") == ("FAIL",)


def test_zero_spread_ttest():
    assert stats.one_sided_ttest([3.27, 3.27, 3.27], 3.28)[1] == 0.0
    assert stats.one_sided_ttest([3.29, 3.29], 3.28)[1] == 1.0


def test_single_run_needs_two_for_ttest(tmp_path, capsys):
    log = make_log(tmp_path / "only.txt", 3.2790, 108.7)
    assert stats.main([str(log)]) == 0
    out = capsys.readouterr().out
    assert field(out, r"^runs: (\d+)") == ("1",)
    assert field(out, r"^val loss: mean (\S+) std (\S+)") == ("3.2790", "n/a")
    assert "needs at least 2 runs" in out
    assert "PASS" not in out and "FAIL" not in out


# --- diff of the embedded sources -----------------------------------------------------


def test_source_diff_shows_changed_lines(tmp_path):
    a = make_log(tmp_path / "old.txt", 3.2788, 108.8)
    new_source = (FAKE_SOURCE.replace("lr = 0.023\n", "lr = 0.025\n")
                  .replace("import torch\n", "import torch\nimport math\n")
                  .replace("num_steps = 1775\n", ""))
    b = make_log(tmp_path / "new.txt", 3.2780, 108.0, source=new_source)
    diff = stats.source_diff(a, b)
    lines = diff.splitlines()
    assert lines[0] == f"--- {a}" and lines[1] == f"+++ {b}"
    body = lines[2:]
    assert {l for l in body if l.startswith("-")} == {"-lr = 0.023", "-num_steps = 1775"}
    assert {l for l in body if l.startswith("+")} == {"+lr = 0.025", "+import math"}
    # nothing below the separator (versions, val lines) leaks into the diff
    assert "val_loss:3.2780" not in diff and "Running" not in diff
    # the CLI prints the same diff
    res = run_cli(a, "--diff", b)
    assert res.returncode == 0 and res.stdout == diff
    # identical sources: empty diff
    assert stats.source_diff(a, a) == ""


def test_diff_shows_differing_config_flags(tmp_path):
    """Same source, different flags: --diff lists each flag that differs, from the logs'
    `config:` lines (train_gpt.py writes one below the separator)."""
    a = make_log(tmp_path / "a.txt", 3.2788, 108.8)
    b = make_log(tmp_path / "b.txt", 3.2790, 108.9)
    for path, cfg in ((a, "--muon_lr=0.023 --seed=0 --run_id=a"), (b, "--muon_lr=0.025 --seed=0 --run_id=b --x=1")):
        text = path.read_text()
        path.write_text(text + f"config: {cfg}\n")
    assert stats.source_diff(a, b) == ""
    assert stats.config_diff(a, b).splitlines() == [
        "config --muon_lr: 0.023 -> 0.025", "config --run_id: a -> b", "config --x: (none) -> 1"]
    res = run_cli(a, "--diff", b)
    assert res.returncode == 0 and "config --muon_lr: 0.023 -> 0.025" in res.stdout
    res = run_cli(a, "--diff", a)
    assert res.returncode == 0 and res.stdout == "" and "identical" in res.stderr


def test_diff_without_separator(tmp_path):
    a = make_log(tmp_path / "good.txt", 3.2788, 108.8)
    b = make_log(tmp_path / "nosep.txt", 3.2788, 108.8, separator=False)
    with pytest.raises(stats.LogError, match="nosep.txt"):
        stats.source_diff(a, b)
    res = run_cli(a, "--diff", b)
    assert res.returncode == 1 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "nosep.txt" in res.stderr
    assert "separator" in res.stderr


# --- bad inputs -------------------------------------------------------------------------


def test_bad_logs_skipped_rest_summarized(tmp_path):
    losses, times = PAIRED_HEAD[:2]
    good = write_logs(tmp_path, losses, times)
    unfinished = make_log(tmp_path / "unfinished.txt", 3.5, 50.0, final=False)
    other_n = make_log(tmp_path / "other_steps.txt", 3.2700, 100.0, total=1700)
    missing = tmp_path / "missing.txt"
    a_dir = tmp_path / "a_directory.txt"
    a_dir.mkdir()
    res = run_cli(good[0], unfinished, good[1], other_n, missing, *good[2:], a_dir)
    assert res.returncode == 0, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 4
    named = {name: [l for l in err if name in l] for name in
             ("unfinished.txt", "other_steps.txt", "missing.txt", "a_directory.txt")}
    assert all(len(v) == 1 for v in named.values()), err
    assert "final validation" in named["unfinished.txt"][0]
    assert "1700" in named["other_steps.txt"][0] and "1775" in named["other_steps.txt"][0]
    assert "read" in named["missing.txt"][0]
    # the five good logs give exactly the published paired-head numbers
    out = res.stdout
    assert field(out, r"^runs: (\d+) \(skipped: (\d+)\)$") == ("5", "4")
    assert field(out, r"^val loss: mean (\S+) std (\S+)$") == ("3.2788", "0.0006")
    assert field(out, r"^train time \(s\): mean (\S+) std (\S+)$") == ("108.7958", "0.0679")
    assert field(out, r" p=(\d\.\d{4}) ") == ("0.0063",)
    for name in named:
        assert name not in out


def test_majority_step_count(tmp_path):
    a = make_log(tmp_path / "a.txt", 3.27, 100.0, total=1700)
    b = make_log(tmp_path / "b.txt", 3.28, 100.0, total=1775)
    c = make_log(tmp_path / "c.txt", 3.28, 100.0, total=1775)
    runs, problems = stats.load_runs([a, b, c])
    assert [Path(r.path).name for r in runs] == ["b.txt", "c.txt"]
    assert len(problems) == 1 and "a.txt" in problems[0]
    runs, problems = stats.load_runs([a, b, c], steps=1700)
    assert [Path(r.path).name for r in runs] == ["a.txt"]
    assert len(problems) == 2


def test_diverged_run_rejected(tmp_path):
    path = make_log(tmp_path / "nan.txt", float("nan"), 100.0)
    with pytest.raises(stats.LogError, match="nan.txt"):
        stats.parse_log(path)


def test_all_bad_exit_1(tmp_path):
    unfinished = make_log(tmp_path / "unfinished.txt", 3.5, 50.0, final=False)
    res = run_cli(unfinished, tmp_path / "missing.txt")
    assert res.returncode == 1
    assert res.stdout == ""
    assert "unfinished.txt" in res.stderr and "missing.txt" in res.stderr
    assert "no valid log" in res.stderr


@pytest.mark.parametrize("args", [
    [],
    ["a.txt", "b.txt", "--diff", "c.txt"],
    ["a.txt", "--alpha", "1.5"],
    ["a.txt", "--target", "abc"],
])
def test_usage_errors_exit_2(args):
    with pytest.raises(SystemExit) as exc:
        stats.main(args)
    assert exc.value.code == 2


def test_usage_error_cli_exit_2():
    res = run_cli("a.txt", "b.txt", "--diff", "c.txt")
    assert res.returncode == 2 and "--diff" in res.stderr
