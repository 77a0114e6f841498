"""Trains a tiny Speeder with transformers.Trainer, as 1 process or under torchrun (gloo), and writes its metrics.

Popular-item task: every target is one of 5 "popular" items, so training moves the metrics within a few steps.
Usage: [torchrun --nproc_per_node 2] ddp_train.py OUT_JSON PER_DEVICE_BATCH STEPS [ddp|fsdp]
With fsdp, the model is sharded with FSDP (full shard, transformers' TrainingArguments.fsdp through accelerate). Rank 0
then saves the trained model (`Trainer.save_model`, a full state dict), reloads it with `from_pretrained` and records
the loss of one fixed batch before and after, so the test can check that the saved weights are the trained ones.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from conftest import ITEM_IDS, make_tiny  # noqa: E402
from modeling_speeder.processing.collator import SpeederDataCollator  # noqa: E402
from modeling_speeder.recipes import evaluate_split  # noqa: E402


def rows(n, seed):
    rng = np.random.default_rng(seed)
    out = {"user_id": [], "history": [], "target": [], "candidates": []}
    for u in range(n):
        history = [ITEM_IDS[i] for i in rng.choice(np.arange(5, 40), size=4, replace=False)]
        target = ITEM_IDS[int(rng.integers(0, 5))]
        negatives = [i for i in ITEM_IDS[5:] if i not in history][:9]
        cands = [target] + negatives
        rng.shuffle(cands)
        for key, value in zip(out, (str(u), history, target, cands)):
            out[key].append(value)
    return Dataset.from_dict(out)


if __name__ == "__main__":
    import torch

    out_path, per_device = sys.argv[1], int(sys.argv[2])
    sharding = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    model, processor = make_tiny("llama", seed=0)
    model.train()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    fsdp = {} if sharding == "ddp" else {
        "fsdp": "full_shard", "fsdp_config": {"state_dict_type": "FULL_STATE_DICT", "use_orig_params": True}}
    args = TrainingArguments(output_dir=os.path.dirname(out_path) + "/trainer", per_device_train_batch_size=per_device,
                             max_steps=int(sys.argv[3]), learning_rate=3e-3, report_to=[], remove_unused_columns=False,
                             label_names=["labels", "catalog_labels"], use_cpu=True,
                             ddp_backend="gloo" if distributed else None,
                             disable_tqdm=True, save_strategy="no", seed=0, logging_steps=1,
                             # Sequential order: the 2 processes' batches of 8 together are the 1 process's batch of 16.
                             train_sampling_strategy="sequential", **(fsdp if distributed else {}))
    trainer = Trainer(model=model, args=args, train_dataset=rows(320, 1),
                      data_collator=SpeederDataCollator(processor), processing_class=processor)
    trainer.train()
    saved = os.path.dirname(out_path) + f"/saved-{sharding}-{args.world_size}"
    trainer.save_model(saved)  # every rank takes part (FSDP gathers the full state dict); rank 0 writes
    if args.process_index == 0:
        from modeling_speeder import SpeederForSequentialRecommendation

        fixed = rows(16, 3)
        batch = SpeederDataCollator(processor)([fixed[i] for i in range(16)])
        trained = trainer.accelerator.unwrap_model(trainer.model) if not fsdp else None
        reloaded = SpeederForSequentialRecommendation.from_pretrained(saved).eval()
        metrics = evaluate_split(reloaded, processor, rows(200, 2))
        with torch.no_grad():
            metrics["reloaded_loss"] = float(reloaded(**batch).loss)
            if trained is not None:
                metrics["trained_loss"] = float(trained.eval()(**batch).loss)
        metrics["world_size"] = args.world_size
        metrics["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        with open(out_path, "w") as f:
            json.dump(metrics, f)
