"""tools/sample.py on a tiny trained model: deterministic for a seed, tokens that decode, one
clear line for a bad checkpoint path."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model trained for 3 steps, saved with save_model, and a checkpoint of it."""
    folder = tmp_path_factory.mktemp("sample")
    torch.set_num_threads(2)
    args = tg.parse_args(["--preset=tiny", "--num_scheduled_iterations=6", "--num_extension_iterations=0",
                          f"--log_dir={folder}"])
    trainer = tg.Trainer(args, 0, 1, torch.device("cpu"), tg.Logger(None))
    trainer.restart_data()
    for step in range(3):
        trainer.train_step(step)
    trainer.model.set_windows(*tg.final_windows(args), yarn=False)
    tg.save_model(trainer.model, folder / "model.pt")
    checkpoint = trainer.checkpoint(3, 0.0, "run")
    return folder / "model.pt", checkpoint


def sample(*args):
    """tools/sample.py run as a program."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "tools" / "sample.py"), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)


def load_tool():
    spec = importlib.util.spec_from_file_location("sample_tool", REPO / "tools" / "sample.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_sampling_is_deterministic_for_a_seed_and_decodes(tiny_checkpoint, capsys):
    """One run as a program; the others call its main() in this process (what a program
    run prints, without a Python start and a model load each)."""
    model_file, checkpoint = tiny_checkpoint
    tool = load_tool()

    def main(*args):
        capsys.readouterr()
        assert tool.main([str(a) for a in args]) == 0
        return capsys.readouterr().out

    common = ["--prompt", "ROMEO:", "--max_tokens", 12]  # the installed vocabulary, no --vocab
    a = sample(model_file, *common, "--seed", 1)
    assert a.returncode == 0, a.stderr
    b, c = main(model_file, *common, "--seed", 1), main(model_file, *common, "--seed", 2)
    assert a.stdout == b and a.stdout.startswith("ROMEO:") and len(a.stdout.strip()) > len("ROMEO:")
    assert c != a.stdout
    # the checkpoint holds the same model: the same text
    assert main(checkpoint, *common, "--seed", 1) == a.stdout
    # greedy decoding: the most likely token each time, the same for every seed
    g1 = main(model_file, *common, "--temperature", 0, "--seed", 1)
    g2 = main(model_file, *common, "--temperature", 0, "--seed", 5)
    assert g1 == g2


def test_generate_follows_the_models_logits(tiny_checkpoint):
    """Greedy generation picks argmax of next_token_logits, which equals the softcapped
    logits of the last position of an eval forward (checked against the loss it gives)."""
    tool = load_tool()
    model = tg.load_model(tiny_checkpoint[0], attn_backend="sdpa")
    prompt = [464, 2068, 7586]
    ids = tool.generate(model, prompt, 4, temperature=0.0, top_k=0, seed=0)
    tokens = torch.tensor([tg.BOS_ID] + prompt)
    for nxt in ids:
        logits = model.next_token_logits(tokens)
        assert nxt == int(logits.argmax())
        # the eval loss of predicting nxt from this prefix is -log softmax(logits)[nxt]
        T = tokens.numel()
        inp = torch.cat([tokens, torch.tensor([nxt])])
        loss_sum = model(inp[:-1].to(torch.int32), inp[1:], torch.tensor([0, T], dtype=torch.int32), T) * T
        prev = model(tokens[:-1].to(torch.int32), tokens[1:], torch.tensor([0, T - 1], dtype=torch.int32), T - 1) * (T - 1)
        assert (loss_sum - prev).item() == pytest.approx(-torch.log_softmax(logits, -1)[nxt].item(), rel=1e-4, abs=1e-4)
        tokens = inp


def test_bad_checkpoint_path_is_one_line(tmp_path):
    r = sample(tmp_path / "missing.pt", "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # what it loads, then one error line
    assert r.stderr.strip().splitlines() == [f"loading {tmp_path / 'missing.pt'} on cpu ...",
                                             f"error: {tmp_path / 'missing.pt'}: no such model file"]
