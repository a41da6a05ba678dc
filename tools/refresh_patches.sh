#!/usr/bin/env bash
# Regenerate patches/ from a llama.cpp git checkout whose history is
#   <base: pristine 0c1e57098 tree> -> one commit per patch.
# Usage: tools/refresh_patches.sh LLAMA_CHECKOUT [BASE_REF]
# Make such a checkout with: tools/refresh_patches.sh --init DIR  (pristine tree + series applied as commits)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [[ "${1:-}" == "--init" ]]; then
    dir=${2:?usage: $0 --init DIR}
    sdist=$(python3 "$here/native/prepare_source.py" --sdist)
    mkdir -p "$dir"
    python3 - "$sdist" "$dir" "$here/native/prepare_source.py" <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.spec_from_file_location("p", sys.argv[3]); p = importlib.util.module_from_spec(spec)
spec.loader.exec_module(p); p.extract(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
PY
    cd "$dir"
    git init -q && git add -A && git commit -qm "llama.cpp 0c1e57098 (llama-cpp-python 0.3.36)" && git tag -f razor-base
    for p in "$here"/patches/[0-9][0-9][0-9][0-9]-*.patch; do git am -q "$p"; done
    echo "$dir: base tagged razor-base, $(git rev-list --count razor-base..HEAD) patch commit(s)"
    exit 0
fi
src=${1:?usage: $0 LLAMA_CHECKOUT [BASE_REF]}
base=${2:-razor-base}
rm -f "$here"/patches/[0-9][0-9][0-9][0-9]-*.patch
git -C "$src" format-patch -q --no-signature --zero-commit -N -o "$here/patches" "$base"..HEAD
ls "$here/patches"
