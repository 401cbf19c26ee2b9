#!/usr/bin/env bash
# Build one virtual environment per peer tool, beside (never inside) our own venv:
#   benchmarks/.venvs/saelens   sae-lens==6.54.12     (pins transformer-lens < 4, so it cannot share ours)
#   benchmarks/.venvs/sparsify  eai-sparsify==1.3.3
# torch==2.13.0 goes in FIRST: this machine keeps a CPU wheel of it locally (pip's find-links), and a bare
# torch requirement pulled in by a peer would otherwise fetch a multi-GB CUDA build. The peer is then
# installed with torch held at that version by a constraints file, so pip cannot swap it.
#
# Usage: bash benchmarks/setup_peers.sh [saelens|sparsify ...]     (default: both)
# Env:   PYTHON (default python3.11 or python3), TORCH_VERSION (2.13.0), SAELENS_VERSION, SPARSIFY_VERSION
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$HERE/.venvs"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SAELENS_VERSION="${SAELENS_VERSION:-6.54.12}"
SPARSIFY_VERSION="${SPARSIFY_VERSION:-1.3.3}"
NICE="nice -n 19"
mkdir -p "$VENVS"

pipq() {  # pip, quiet, without the warnings about this machine's absent local index folders
  local py="$1"; shift
  $NICE "$py" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

make_env() {  # name, package spec
  local name="$1" spec="$2" env="$VENVS/$1"
  echo "== $name: $spec (torch==$TORCH_VERSION) in $env"
  [ -x "$env/bin/python" ] || $NICE "$PY" -m venv "$env"
  pipq "$env/bin/python" install -q --upgrade pip
  pipq "$env/bin/python" install -q "torch==$TORCH_VERSION"
  local have
  have="$("$env/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  echo "   torch $have (cuda: $("$env/bin/python" -c 'import torch; print(torch.version.cuda)' 2>/dev/null))"
  local cons="$env/torch-constraint.txt"
  echo "torch==$have" >"$cons"
  pipq "$env/bin/python" install -q -c "$cons" "$spec"
  "$env/bin/python" - "$spec" <<'PY'
import importlib.metadata as md, sys, torch
name = sys.argv[1].split("==")[0]
print(f"   {name} {md.version(name)}; torch {torch.__version__}")
bad = [d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-")]
if bad:
    print(f"   WARNING: CUDA packages were pulled in: {bad}")
PY
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(saelens sparsify)
for t in "${targets[@]}"; do
  case "$t" in
    saelens) make_env saelens "sae-lens==$SAELENS_VERSION" ;;
    sparsify) make_env sparsify "eai-sparsify==$SPARSIFY_VERSION" ;;
    *) echo "unknown peer $t (saelens|sparsify)" >&2; exit 2 ;;
  esac
done
echo "done: $(ls "$VENVS" | tr "\n" " ")"
