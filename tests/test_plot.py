"""records/plot.py: the validation curves of several logs, read from their val lines."""
import importlib.util
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PLOT_PY = REPO / "records" / "plot.py"
spec = importlib.util.spec_from_file_location("records_plot", PLOT_PY)
plot = importlib.util.module_from_spec(spec)
sys.modules["records_plot"] = plot
spec.loader.exec_module(plot)


def write_log(path, points, source="print('train')\n"):
    """A log as train_gpt.py writes it: source, separator, versions, separator, lines."""
    sep = "=" * 100
    lines = [source, sep, "Python 3.11", sep]
    for step, loss, ms in points:
        lines.append(f"step:{step}/64 mtp_loss:{loss + 7:.4f} train_time:{ms}ms step_avg:1.00ms eta:1s")
        lines.append(f"step:{step}/64 val_loss:{loss:.4f} train_time:{ms}ms" + (f" step_avg:{ms / step:.2f}ms"
                                                                                  if step else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_val_curve_reads_the_val_lines_only(tmp_path):
    log = write_log(tmp_path / "a.txt", [(0, 10.8258, 0), (20, 7.5, 12000), (64, 6.6012, 41000)],
                    source="# step:5/64 val_loss:1.0000 train_time:1ms (in the source: ignored)\n")
    assert plot.val_curve(log) == [(0, 10.8258, 0.0), (20, 7.5, 12.0), (64, 6.6012, 41.0)]


def test_plot_writes_a_picture_of_several_runs(tmp_path):
    a = write_log(tmp_path / "a.txt", [(0, 10.8, 0), (20, 7.5, 12000), (64, 6.6, 41000)])
    b = write_log(tmp_path / "b.txt", [(0, 10.8, 0), (20, 7.2, 15000), (64, 6.4, 50000)])
    empty = tmp_path / "empty.txt"
    empty.write_text("no validation here\n")
    out = tmp_path / "curves.png"
    res = subprocess.run([sys.executable, str(PLOT_PY), str(a), str(b), str(empty), "-o", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "2 run(s)" in res.stdout
    assert res.stderr.strip() == f"plot.py: skipping {empty}: no 'val_loss' line"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    res = subprocess.run([sys.executable, str(PLOT_PY), str(empty), "-o", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and not (tmp_path / "x.png").exists()


def test_labels_tell_same_named_logs_apart():
    assert plot.labels_for(["r1/log.txt", "r2/log.txt", "mine.txt"]) == ["r1/log", "r2/log", "mine"]


def test_a_resumed_log_is_one_curve_whose_repeated_steps_take_the_later_line(tmp_path):
    """A run stopped after validating step 20 but checkpointed at step 10, then resumed into
    the same log: its second step-20 line (after `resumed from ...`) is the curve's."""
    log = write_log(tmp_path / "r.txt", [(0, 10.8, 0), (10, 8.0, 6000), (20, 7.5, 12000)])
    with open(log, "a") as f:
        f.write("resumed from logs/r.step000010.pt at step 10\n"
                "step:20/64 val_loss:7.4000 train_time:12500ms step_avg:625.00ms\n"
                "step:64/64 val_loss:6.6000 train_time:41000ms step_avg:640.62ms\n")
    assert plot.val_curve(log) == [(0, 10.8, 0.0), (10, 8.0, 6.0), (20, 7.4, 12.5), (64, 6.6, 41.0)]
