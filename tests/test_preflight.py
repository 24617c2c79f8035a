"""tools/preflight.py at the tiny size: the checks pass on this trainer, and they fail, naming
the problem, on a copy of it with a host-device sync and a recompile put into the step."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def preflight(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, str(REPO / "tools" / "preflight.py"), "--preset=tiny", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    return out.returncode, out.stdout + out.stderr


def test_preflight_passes_on_the_trainer():
    code, out = preflight()
    assert code == 0, out[-3000:]
    for line in ("graph breaks: 0", "recompiles in the timed run: 0", "host-device syncs per training step: 0",
                 "FP8 lm_head op bodies (forward + backward): 0 host-device syncs", "preflight: OK"):
        assert line in out, line
    for k in (3, 2, 1):
        assert f"loss head with {k} prediction(s): backward 1 (bfloat16), forward 0 (none)" in out
    assert "graphs compiled in the warm-up: " in out and "normuon_apply_" in out and "adam_update" in out


def test_preflight_fails_on_a_sync_and_a_recompile(tmp_path):
    src = (REPO / "train_gpt.py").read_text()
    edited = src.replace(
        "        adam_step = step % 2 == 1\n",
        "        adam_step = step % 2 == 1\n"
        "        torch.ones((), device=self.device).sum().item()  # a sync: waits for the GPU\n", 1).replace(
        "            loss = self.forward(inputs, targets, cu_seqlens, args.train_max_seq_len, weights)",
        "            loss = self.forward(inputs, targets, cu_seqlens, args.train_max_seq_len + step, weights)", 1)
    assert edited.count("a sync: waits") == 1 and "train_max_seq_len + step" in edited
    script = tmp_path / "train_gpt.py"
    script.write_text(edited)
    code, out = preflight(f"--script={script}")
    assert code == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("preflight: FAILED") and "recompile(s) in the timed run" in last, last
    assert "host-device sync(s) in training steps" in last, last
