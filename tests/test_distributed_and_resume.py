"""Multi-process training (torchrun, gloo) and resuming a killed run: both through transformers.Trainer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, sharding):
    """2 processes x batch 8 (gloo; the Trainer's DDP, or FSDP2 full sharding) follow the same loss curve as 1 process x
    batch 16, save a checkpoint that reloads to the trained weights, and reach the same metrics."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(TESTS / "ddp_train.py"), str(tmp_path / "one.json"), "16", "3", sharding],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    port = {"ddp": "29517", "fsdp": "29519"}[sharding]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                          str(TESTS / "ddp_train.py"), str(tmp_path / "two.json"), "8", "3", sharding],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert b["sharded"] == (sharding == "fsdp"), "parameters are sharded (DTensor) exactly under FSDP"
    assert len(a["losses"]) == 3 and a["losses"][-1] < a["losses"][0]
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-4, atol=1e-5)
    # The saved checkpoint holds the trained weights: reloaded, it gives the trained model's loss, in both runs.
    for run in (a, b):
        assert run["reloaded_loss"] == pytest.approx(run["trained_loss"], rel=1e-5)
    assert b["reloaded_loss"] == pytest.approx(a["reloaded_loss"], rel=1e-3)
    for key in ("hr@1", "ndcg@10", "mrr"):
        assert abs(a[key] - b[key]) <= 0.02, (key, a[key], b[key])


def tiny_dataset(path: Path):
    from modeling_speeder.conversion.datasets import leave_one_out, write_canonical

    items = [f"I{i}" for i in range(40)]
    seqs = {f"u{u}": [items[(3 * u + j) % 40] for j in range(8)] for u in range(20)}
    g = torch.Generator().manual_seed(0)
    write_canonical(path, leave_one_out(seqs, items), {"item_id": items, "title": items, "text": items},
                    {"text": torch.randn(40, 12, generator=g)})


def test_killed_run_resumes_and_finishes(tmp_path):
    tiny_dataset(tmp_path / "data")
    command = [sys.executable, "-m", "modeling_speeder", "train", "--data", str(tmp_path / "data"),
               "--output", str(tmp_path / "run"), "--steps", "300", "--save-steps", "20", "--batch-size", "4",
               "--expert-hidden-size", "16", "--learned-id-dim", "8", "--patience", "0"]  # the whole budget
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    checkpoints = tmp_path / "run" / "trainer"
    # Waits on progress (a complete checkpoint, or the process ending), not on a clock a slow machine could miss.
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
        if process.poll() is not None:
            pytest.fail(f"training ended before the first checkpoint: {process.stderr.read()[-2000:]}")
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the crash: no clean-up, mid-run
    process.wait()
    assert not (tmp_path / "run" / "model").exists(), "the run was killed before it finished"
    killed_at = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))
    assert killed_at < 300
    # A later checkpoint killed while being written (weights, no trainer_state.json) must be skipped, not fail forever.
    torn = checkpoints / f"checkpoint-{killed_at + 20}"
    torn.mkdir(exist_ok=True)
    (torn / "model.safetensors").write_bytes(b"")
    (torn / "trainer_state.json").unlink(missing_ok=True)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Not resuming from {torn}: it is incomplete (no trainer_state.json)" in resumed.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 300 and "test" in report
    assert report["resumed_from"].endswith(f"checkpoint-{killed_at}")
    # The resumed process starts at the checkpoint's step, in the MPO stage that step belongs to.
    first_step, first_stage = report["mpo_transitions"][0]
    assert first_step == killed_at and first_stage == (0 if killed_at < 102 else 1)
    stages = [h["mpo_stage"] for h in report["log_history"] if "loss" in h]
    assert stages == sorted(stages) and stages[-1] == 2
