"""Every attention backend gives the reference (eager) results on CPU: sdpa, flex_attention, packed batches.
GPU kernels (FlashAttention, GPU flex) are compared in test_gpu_kernels.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent

FLEX_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import BACKBONES, CANDIDATES, HISTORIES, TARGETS, make_tiny
result = {}
for family in BACKBONES:
    model, proc = make_tiny(family, attn_implementation="eager")
    inputs = proc(histories=HISTORIES, candidates=CANDIDATES)
    dense = proc(histories=HISTORIES, targets=TARGETS, dense=True)
    packed = proc(histories=HISTORIES, targets=TARGETS, dense=True, packed=True)
    with torch.no_grad():
        eager = model(**inputs).candidate_scores
        eager_dense = model(**dense)
        model.set_attn_implementation("flex_attention")
        flex = model(**inputs).candidate_scores
        flex_packed = model(**packed)
    result[family] = max((flex - eager).abs().max().item(),
                         (flex_packed.query_hidden_state - eager_dense.query_hidden_state).abs().max().item(),
                         (flex_packed.loss - eager_dense.loss).abs().item())
print(json.dumps(result))
"""


def test_flex_attention_equals_eager_with_padding_and_packing():
    # CPU flex has no backward, and once died in native code after a run (DESIGN.md section 5): own process.
    run = subprocess.run([sys.executable, "-c", FLEX_SCRIPT, str(TESTS)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    diffs = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(diffs) == {"llama", "qwen3", "mistral", "gemma3"}
    assert all(d < 1e-5 for d in diffs.values()), diffs


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_batch_equals_padded_batch(family, impl):
    from conftest import packed_and_padded_runs

    (loss, query, grads), (packed_loss, packed_query, packed_grads) = packed_and_padded_runs(family, impl)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_query, query, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed_grads, grads, rtol=1e-4, atol=1e-6)


def test_packed_layout_and_its_errors():
    from conftest import HISTORIES, TARGETS, make_tiny

    model, proc = make_tiny("llama", tokens_per_item=2)
    inputs = proc(histories=HISTORIES, targets=TARGETS, dense=True, packed=True)
    lengths = [len(proc(histories=[h], targets=[t], dense=True).input_ids[0]) for h, t in zip(HISTORIES, TARGETS)]
    assert inputs.input_ids.shape == (1, sum(lengths))
    assert inputs.cu_seq_lens_q.tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert inputs.cu_seq_lens_q.dtype == torch.int32 and inputs.max_length_q == max(lengths)
    # Why explicit boundaries: K tokens of an item share a position id, so position-id diffs are not all 1.
    assert (inputs.position_ids.diff() == 0).any()
    from modeling_speeder.processing.collator import SpeederDataCollator

    with pytest.raises(ValueError, match="packed=True needs dense=True"):
        SpeederDataCollator(proc, packed=True)
    with pytest.raises(ValueError, match="packed=True builds catalog-head inputs only"):
        proc(histories=HISTORIES, candidates=[["item20", "item21"]] * 3, packed=True)
    with pytest.raises(ValueError, match="cu_seq_lens_q has 3 boundaries for 3 packed sequences"):
        bad = dict(inputs, cu_seq_lens_q=inputs.cu_seq_lens_q[:-1])
        model(**bad)
