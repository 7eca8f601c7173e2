#!/usr/bin/env bash
# sdtk quickstart: set up .venv (first run only), build the tiny bundled model and run the main job on CPU.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bash "$here/setup_env.sh"
cd "$root"
out=${1:-quickstart_out}
mkdir -p "$out"
PY=.venv/bin/python
export HF_HUB_OFFLINE=1
$PY tools/make_tiny_model.py --family sd1 --format diffusers --out "$out/tiny-sd1"
$PY tools/convert_diffusers20_original_sd.py "$out/tiny-sd1" "$out/tiny-sd1.safetensors"
$PY tools/show_metadata.py "$out/tiny-sd1.safetensors" > /dev/null
echo "quickstart: tiny model in $out/tiny-sd1 (diffusers) and $out/tiny-sd1.safetensors (single file)"
