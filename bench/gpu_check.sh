#!/usr/bin/env bash
# One prepared GPU check (for tasks lent an H100/H200 through the device tool), meant to finish within ~5 minutes:
# the GPU kernel equivalence tests (FlashAttention 2 / flex_attention against eager, scores and gradients).
# bench/speed.py times on the CPU only for now; GPU timings are future work. Writes logs to $OUT when set.
# NOT YET RUN ON A GPU: no task so far was lent one; expect to fix small things on the first run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/speeder-gpu}"
mkdir -p "$out"
python3 -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
python3 -m pip install -q -e . >/dev/null 2>&1 || true
HF_HUB_OFFLINE=1 timeout 180 python3 -m pytest -q tests/test_attention_backends.py 2>&1 | tee "$out/gpu_tests.log"
