#!/usr/bin/env bash
# Rebuild the offline sample corpus (data/sample/*.bin) from tinyshakespeare.txt with the
# GPT-2 vocabulary in ../shared/data (next to the repository). Deterministic: the same
# inputs give byte-identical shards.
#   bash data/make_sample.sh [SHARED_DATA_DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
shared="${1:-$here/../../shared/data}"
python "$here/fineweb.py" \
  --input "$shared/tinyshakespeare.txt" \
  --vocab "$shared/gpt2_encoder.json" \
  --min_doc_chars 300 \
  --val_tokens 40000 --shard_size 150000 \
  --out_dir "$here/sample" --prefix sample
