#!/usr/bin/env bash
# Create .venv in the repository root with sdtk and its test dependencies (idempotent: reinstalls
# only when pyproject.toml changed). torch is installed first, pinned to the CPU wheel, so that no
# dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.sdtk-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${SDTK_TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
