"""Download the GPT-2-tokenized FineWeb-10B shards used by the speedrun record.

    python data/cached_fineweb10B.py [N]      # val shard + the first N train shards (default 9)

Files come from the Hugging Face dataset repo kjj0/fineweb10B-gpt2 and land in
data/fineweb10B/ next to this script: fineweb_val_000000.bin (100M tokens) and
fineweb_train_000001.bin .. fineweb_train_{N:06d}.bin (100M tokens each; the record
trains on about 900M tokens, so N = 9). Files already present and valid are skipped.
Needs network access and `pip install huggingface_hub`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ID = "kjj0/fineweb10B-gpt2"
LOCAL_DIR = Path(__file__).resolve().parent / "fineweb10B"


def shard_is_valid(path: Path) -> bool:
    """True if `path` is a complete token shard (header magic, version and length, as
    train_gpt.shard_token_count checks them: the one definition of the format)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from train_gpt import shard_token_count

    try:
        shard_token_count(path)
    except (OSError, ValueError):
        return False
    return True


def shard_names(num_train: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin"
                                         for i in range(1, num_train + 1)]


def check_network() -> None:
    """Fail fast, in one line, when the hub's host name cannot even be resolved
    (otherwise the hub client retries for ~30 s before giving up)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        fail("HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it, or use "
             "`--preset tiny` for the bundled offline sample")
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # behind a proxy the local resolver may not know the host: just try
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:
        host = "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        fail(f"no network: cannot resolve {host} ({e}); FineWeb shards cannot be "
             f"downloaded. Use `--preset tiny` for the bundled offline sample")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Download FineWeb-10B GPT-2 token shards.")
    p.add_argument("num_train_shards", nargs="?", type=int, default=9,
                   help="number of 100M-token train shards to fetch (default 9; max 103)")
    args = p.parse_args(argv)
    if args.num_train_shards < 0:
        fail("the number of train shards must be >= 0")
    names = shard_names(args.num_train_shards)
    todo = [n for n in names if not shard_is_valid(LOCAL_DIR / n)]
    print(f"{len(names) - len(todo)} of {len(names)} shard(s) already in {LOCAL_DIR}")
    if not todo:
        return
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        fail("downloading needs the huggingface_hub package: pip install huggingface_hub")
    check_network()
    try:  # the hub logs every retry; our own one-line errors are enough
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    LOCAL_DIR.mkdir(parents=True, exist_ok=True)
    for name in todo:
        path = LOCAL_DIR / name
        try:
            hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset",
                            local_dir=LOCAL_DIR, force_download=path.exists())
        except KeyboardInterrupt:
            fail("interrupted")
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            fail(f"could not download {name} from the Hugging Face dataset {REPO_ID} "
                 f"({type(e).__name__}: {first}). Check the network connection "
                 f"(HF_HUB_OFFLINE must not be set), or use `--preset tiny` for the "
                 f"bundled offline sample")
        if not shard_is_valid(path):
            fail(f"downloaded {path} but it is not a valid token shard (bad header or size)")
        print(f"ok {path}")


if __name__ == "__main__":
    main()
