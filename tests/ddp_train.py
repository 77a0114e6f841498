"""Trains a tiny Speeder with transformers.Trainer, as 1 process or under torchrun (gloo), and writes its metrics.

Popular-item task: every target is one of 5 "popular" items, so training moves the metrics within a few steps.
Usage: [torchrun --nproc_per_node 2] ddp_train.py OUT_JSON PER_DEVICE_BATCH STEPS [ddp|fsdp]
ddp: `transformers.Trainer` (DDP under torchrun). fsdp: PyTorch FSDP2 (`fully_shard` on each decoder layer and the
model) in a plain AdamW loop, since accelerate, and so the Trainer, turns FSDP on only for accelerators, never for
CPU processes; one process runs the same loop unsharded. Either way the trained model is saved (a full state dict,
written by rank 0), reloaded with `from_pretrained`, and the loss of one fixed batch is recorded before and after,
so the test can check that the saved weights are the trained ones.
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


def train_fsdp(model, processor, per_device, steps, world_size, rank):
    """Sequential batches: rank r takes rows [r * per_device, (r + 1) * per_device) of each global batch, so two
    processes of 8 see what one process of 16 sees; the loss is a mean over equal halves, so the gradients match."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if world_size > 1:
        for layer in model.model.backbone.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data, collate, losses, global_batch = rows(320, 1), SpeederDataCollator(processor), [], per_device * world_size
    for step in range(steps):
        first = step * global_batch + rank * per_device
        loss = model(**collate([data[i] for i in range(first, first + per_device)])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logged = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(logged)
        losses.append(float(logged) / world_size)
    return losses


if __name__ == "__main__":
    import torch

    out_path, per_device, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sharding = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    model, processor = make_tiny("llama", seed=0)
    model.train()
    saved = os.path.dirname(out_path) + f"/saved-{sharding}-{world_size}"
    fixed = rows(16, 3)
    batch = SpeederDataCollator(processor)([fixed[i] for i in range(16)])
    if sharding == "fsdp":
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if world_size > 1:
            dist.init_process_group("gloo")
        losses = train_fsdp(model, processor, per_device, steps, world_size, rank)
        with torch.no_grad():  # every rank takes part in a sharded forward
            trained_loss = float(model.eval()(**batch).loss)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
        if rank == 0:
            model.save_pretrained(saved, state_dict=state)
        if world_size > 1:
            dist.barrier()
    else:
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(output_dir=os.path.dirname(out_path) + "/trainer", per_device_train_batch_size=per_device,
                                 max_steps=steps, learning_rate=3e-3, report_to=[], remove_unused_columns=False,
                                 label_names=["labels", "catalog_labels"], use_cpu=True,
                                 ddp_backend="gloo" if world_size > 1 else None,
                                 disable_tqdm=True, save_strategy="no", seed=0, logging_steps=1,
                                 # Sequential order: the 2 processes' batches of 8 together are the 1 process's 16.
                                 train_sampling_strategy="sequential")
        trainer = Trainer(model=model, args=args, train_dataset=rows(320, 1),
                          data_collator=SpeederDataCollator(processor), processing_class=processor)
        trainer.train()
        trainer.save_model(saved)  # rank 0 writes
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trained = trainer.accelerator.unwrap_model(trainer.model)
        with torch.no_grad():
            trained_loss = float(trained.eval()(**batch).loss)
        sharded = False
    if rank == 0:
        from modeling_speeder import SpeederForSequentialRecommendation

        reloaded = SpeederForSequentialRecommendation.from_pretrained(saved).eval()
        metrics = evaluate_split(reloaded, processor, rows(200, 2))
        with torch.no_grad():
            metrics["reloaded_loss"] = float(reloaded(**batch).loss)
        metrics.update(trained_loss=trained_loss, world_size=world_size, sharded=sharded, losses=losses)
        with open(out_path, "w") as f:
            json.dump(metrics, f)
