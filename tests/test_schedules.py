"""Schedule values at hand-computed steps of the record (S = 1735, E = 40, N = 1775)."""
import math

import pytest

import train_gpt as tg

A = tg.Hyperparameters()


def test_totals_and_split():
    assert tg.total_steps(A) == 1775
    # ceil(2/3 * 1735) = ceil(1156.67) = 1157, already odd
    assert tg.split_step(A) == 1157


@pytest.mark.parametrize("step,batch,windows", [
    (0, 131072, (1, 3)), (578, 131072, (1, 3)),
    (579, 262144, (3, 7)), (1156, 262144, (3, 7)),
    (1157, 393216, (5, 11)), (1734, 393216, (5, 11)),
    (1735, 393216, (6, 13)), (1774, 393216, (6, 13)),
])
def test_batch_and_windows(step, batch, windows):
    assert tg.batch_size_at(step, A) == batch
    assert tg.windows_at(step, A) == windows


def test_final_windows():
    assert tg.final_windows(A) == (6, 20)


@pytest.mark.parametrize("step,expected", [
    (0, 1.0), (578, 1.0),          # x <= 1/3
    (579, 1.52), (867, 1.52),      # 1/3 < x < 0.5: no cooldown yet
    # x = 868/1735, w = (1-x)/0.5: 1.52 w + 0.1 (1-w)
    (868, 1.52 * (1 - 868 / 1735) / 0.5 + 0.1 * (1 - (1 - 868 / 1735) / 0.5)),
    (1156, 1.047758), (1157, 1.186040), (1734, 0.101879),
    (1735, 0.1), (1774, 0.1),
])
def test_lr_multiplier(step, expected):
    assert tg.lr_multiplier(step, A) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("step,expected", [
    (0, 0.85), (150, 0.90), (300, 0.95), (1000, 0.95), (1725, 0.95), (1750, 0.90), (1774, 0.852),
])
def test_momentum(step, expected):
    assert tg.muon_momentum(step, A) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step,expected", [
    (0, [1.0, 0.5, 0.25]),
    (289, [1.0, 0.5, 0.25 * (1 - 3 * 289 / 1735)]),
    (578, [1.0, 0.5, 0.25 * (1 - 3 * 578 / 1735)]),
    (579, [1.0, 0.499424]),
    (1156, [1.0, 0.5 * (1 - (3 * 1156 / 1735 - 1))]),
    (1157, [1.0]), (1774, [1.0]),
])
def test_mtp_weights(step, expected):
    assert tg.mtp_weights(step, A) == pytest.approx(expected, abs=1e-6)


def test_warmup_steps():
    assert tg.warmup_steps(A) == [0, 1, 2, 578, 579, 580, 1156, 1157, 1158, 1734, 1735, 1736]


def test_every_schedule_changes_only_at_the_transitions():
    changes = [s for s in range(1, tg.total_steps(A))
               if tg.batch_size_at(s, A) != tg.batch_size_at(s - 1, A) or tg.windows_at(s, A) != tg.windows_at(s - 1, A)]
    assert changes == [579, 1157, 1735]


def test_tiny_preset_schedule_is_consistent():
    tiny = tg.parse_args(["--preset", "tiny"])
    S = tiny.num_scheduled_iterations
    assert tg.stage(math.ceil(S / 3), tiny) == 1 and tg.stage(math.ceil(S / 3) - 1, tiny) == 0
    assert tg.split_step(tiny) % 2 == 1


def test_eta_weighs_the_steps_left_by_their_batch_sizes():
    """The step line's ETA is the time per token so far times the tokens still to train:
    by hand for the tiny preset after its first step (512 tokens in 1 s): 19 more steps of
    512, 20 of 768, 20 of 1024 and 4 extension steps of 1024 tokens, 49,664 tokens, 97 s
    (a per-step average would say 63 s)."""
    tokens = tg.schedule_tokens(tg.parse_args(["--preset=tiny"]))
    assert tokens[:3] == [0, 512, 1024] and tokens[21] == 20 * 512 + 768 and len(tokens) == 65
    assert tokens[-1] == 20 * 512 + 20 * 768 + 24 * 1024
    assert tg.eta_seconds(tokens, 1, 1000.0) == pytest.approx(49_664 / 512)
    assert tg.eta_seconds(tokens, 64, 50_000.0) == 0
