"""Killed writes lose nothing: SIGKILL in the middle of a model save, a processor save, a conversion and a feature
extraction (each in a subprocess, stopped at a known point that it announces, so the test waits on progress, never on
a clock). Afterwards the previous output loads, and the next run completes and leaves no temporary behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent

# Runs in the child: `stall(module, name)` replaces a function with one that announces the point reached (the marker
# file) and waits to be killed there.
PRELUDE = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS)!r})
os.environ["HF_HUB_OFFLINE"] = "1"
MARKER = sys.argv[1]

def stall(module, name):
    def stalled(*args, **kwargs):
        open(MARKER, "w").close()
        while True:
            time.sleep(1)
    setattr(module, name, stalled)
"""


def kill_at_marker(script: str, marker: Path):
    """Run `script` after PRELUDE in a new process group; SIGKILL it once it has written `marker`."""
    process = subprocess.Popen([sys.executable, "-c", PRELUDE + script, str(marker)], stderr=subprocess.PIPE,
                               start_new_session=True)
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the child ended before the kill point: {process.stderr.read().decode()[-3000:]}")
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def leftovers(folder: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def test_a_model_save_killed_before_its_folder_is_swapped_leaves_the_old_checkpoint(tmp_path):
    from transformers import AutoModel

    from conftest import make_tiny

    model, _ = make_tiny("llama")
    model.save_pretrained(tmp_path / "ckpt")
    before = {k: v.clone() for k, v in AutoModel.from_pretrained(tmp_path / "ckpt").state_dict().items()}
    kill_at_marker(f"""
import torch
from conftest import make_tiny
import modeling_speeder.atomic_files as io
model, _ = make_tiny("llama", seed=1)
with torch.no_grad():
    model.query_proj.weight.add_(1.0)
stall(io, "replace_directory")
model.save_pretrained({str(tmp_path / "ckpt")!r})
""", tmp_path / "marker")
    assert leftovers(tmp_path, ".ckpt.saving-*"), "the kill left the new folder half-way, as a crash would"
    after = AutoModel.from_pretrained(tmp_path / "ckpt").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.save_pretrained(tmp_path / "ckpt")  # the next save completes and clears what the killed one left
    assert not leftovers(tmp_path, ".ckpt.*")


def test_a_processor_save_killed_mid_way_keeps_every_earlier_file_whole(tmp_path):
    from transformers import AutoProcessor

    from conftest import make_tiny

    _, processor = make_tiny("llama")
    processor.save_pretrained(tmp_path / "ckpt")
    kill_at_marker(f"""
from conftest import make_tiny
from modeling_speeder.processing import processing_speeder
_, processor = make_tiny("llama")
processor.item_ids[0] = "renamed"
stall(processing_speeder.os, "replace")  # after the new files are written beside, before the first one moves in
processor.save_pretrained({str(tmp_path / "ckpt")!r})
""", tmp_path / "marker")
    assert leftovers(tmp_path / "ckpt", ".processor-saving-*")
    assert AutoProcessor.from_pretrained(tmp_path / "ckpt").item_ids == processor.item_ids
    processor.save_pretrained(tmp_path / "ckpt")
    assert not leftovers(tmp_path / "ckpt", ".processor-saving-*")


def test_a_conversion_killed_before_its_folder_is_swapped_leaves_the_old_dataset(tmp_path):
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.conversion.datasets import load_canonical

    tiny_dataset(tmp_path / "data")
    stats = (tmp_path / "data" / "stats.json").read_text()
    kill_at_marker(f"""
from pathlib import Path
import modeling_speeder.atomic_files as io
from test_distributed_and_resume import tiny_dataset
stall(io, "replace_directory")
tiny_dataset(Path({str(tmp_path / "data")!r}))
""", tmp_path / "marker")
    assert leftovers(tmp_path, ".data.saving-*")
    assert (tmp_path / "data" / "stats.json").read_text() == stats and load_canonical(tmp_path / "data")
    tiny_dataset(tmp_path / "data")
    assert not leftovers(tmp_path, ".data.*")


def test_feature_extraction_killed_after_a_batch_resumes_from_its_cache(tmp_path):
    """Killed while encoding the second batch: the first batch's cache file is whole, and the rerun encodes only
    what is left."""
    import torch

    from modeling_speeder.conversion.features import run_in_batches

    kill_at_marker(f"""
import torch
from modeling_speeder.conversion.features import run_in_batches

def encode(start, end):
    if start > 0:
        stall_here()
    return torch.full((end - start, 3), float(start)), torch.ones(end - start, dtype=torch.bool)

def stall_here():
    open(MARKER, "w").close()
    while True:
        time.sleep(1)

run_in_batches(4, 2, encode, {str(tmp_path / "cache")!r})
""", tmp_path / "marker")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    calls = []

    def encode(start, end):
        calls.append(start)
        return torch.full((end - start, 3), float(start)), torch.ones(end - start, dtype=torch.bool)

    features, _ = run_in_batches(4, 2, encode, tmp_path / "cache")
    assert calls == [2] and features[:, 0].tolist() == [0.0, 0.0, 2.0, 2.0]
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
