"""A saved checkpoint loads with plain transformers + trust_remote_code, in a process that cannot import us."""

import json
import subprocess
import sys

import torch

from conftest import CANDIDATES, HISTORIES, make_tiny

REMOTE_SCRIPT = r"""
import importlib.abc, json, os, sys
class BlockSpeeder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_speeder" or name.startswith("modeling_speeder."):
            raise ImportError(f"{name} is blocked: this process must not use the installed package")
sys.meta_path.insert(0, BlockSpeeder())
import torch
from transformers import AutoModel, AutoProcessor
path = sys.argv[1]
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
assert "modeling_speeder" not in sys.modules
histories, candidates = json.loads(sys.argv[2]), json.loads(sys.argv[3])
with torch.no_grad():
    scores = model(**processor(histories=histories, candidates=candidates)).candidate_scores
print(json.dumps({"module": type(model).__module__, "processor": type(processor).__module__,
                  "scores": scores.tolist(), "recommend": model.recommend(histories, top_k=3)}))
"""


def test_remote_code_load_in_clean_process(tmp_path):
    model, processor = make_tiny("qwen3")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    saved = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"configuration_speeder.py", "modeling_speeder.py", "recommendation.py", "atomic_files.py",
            "processing_speeder.py", "model.safetensors"} <= saved
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_speeder.SpeederForSequentialRecommendation"
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "ckpt"), json.dumps(HISTORIES), json.dumps(CANDIDATES)],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.") and result["processor"].startswith("transformers_modules.")
    with torch.no_grad():
        expected = model(**processor(histories=HISTORIES, candidates=CANDIDATES)).candidate_scores
    torch.testing.assert_close(torch.tensor(result["scores"]), expected, rtol=0, atol=1e-6)
    assert result["recommend"] == model.recommend(HISTORIES, processor=processor, top_k=3)
