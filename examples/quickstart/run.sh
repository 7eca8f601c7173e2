#!/usr/bin/env bash
# sdtk quickstart: set up .venv (first run only), build the bundled tiny SD1 model, and train a LoRA on the
# sample photos on CPU with kohya-style config files (config.toml + dataset.toml + prompts.txt beside this script).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
bash "$here/setup_env.sh"
export HF_HUB_OFFLINE=1
# A tiny model gains nothing from several CPU threads, and on a busy machine thread synchronisation
# makes each step many times slower. Real models: leave this unset.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
[ -f quickstart_out/tiny-sd1/model_index.json ] || $PY tools/make_tiny_model.py --family sd1 --out quickstart_out/tiny-sd1
rm -rf quickstart_out/lora
$PY train_network.py --config_file examples/quickstart/config.toml "$@"
