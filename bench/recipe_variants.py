"""Recipe variants of Speeder on one dataset, each trained by the default recipe (`recipes.train`: dense catalog head,
validation every epoch, best checkpoint, early stopping) on the same SASRec `id` features, read once on test.

    python bench/recipe_variants.py DATA_DIR SASREC_DIR OUTPUT_DIR '{"name": {config overrides}, ...}' [SELECTION_ROWS]

DATA_DIR: a canonical dataset folder (e.g. `outputs/demo-ml-100k/data`); SASREC_DIR: a saved SASRec
(`SASRecModel.save_pretrained`, e.g. from `speeder features --collaborative`, which writes DATA_DIR/sasrec); a folder
without one gets the SASRec `speeder demo` trains (`recipes.sasrec_baseline`, seed 0, selected on the first
SELECTION_ROWS validation users, all by default: 5000 reproduces the Beauty demo's), saved there first. A variant's
overrides are SpeederConfig fields, plus "backbone": {tiny config fields}, "train": {recipes.train arguments; a
"distillation_weight" distils from the same SASRec} and
"sasrec": false (no `id` modality).
Prints one RESULT line per variant and writes OUTPUT_DIR/variants.json.
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    from transformers import set_seed

    from modeling_speeder import recipes
    from modeling_speeder.conversion.build import load_backbone
    from modeling_speeder.sasrec import SASRecModel

    data, sasrec_dir, output, variants = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
    if not (sasrec_dir / "config.json").exists():
        from modeling_speeder.conversion.datasets import load_canonical

        splits, items, _, _ = load_canonical(data)
        set_seed(0)  # as `speeder demo` does before training its SASRec
        report, sasrec = recipes.sasrec_baseline(splits, items["item_id"], seed=0,
                                                 selection_rows=int(sys.argv[5]) if len(sys.argv) > 5 else None)
        sasrec.save_pretrained(sasrec_dir)
        print("SASREC", json.dumps({"best_epoch": report["training"]["best_epoch"], "seconds": report["train_seconds"],
                                    "test": {k: report["test"][k] for k in ("hr@1", "full_hr@10", "full_ndcg@10")}}))
    sasrec = SASRecModel.from_pretrained(sasrec_dir).eval()
    results = {}
    for name, overrides in variants.items():
        set_seed(0)
        train_kwargs = {"learning_rate": 1e-3, "epochs": 30, "batch_size": 32, "seed": 0, **overrides.pop("train", {})}
        backbone, tokenizer = load_backbone("tiny-llama")
        for key, value in overrides.pop("backbone", {}).items():
            setattr(backbone, key, value)
        # "sasrec": false builds the model without the `id` modality (text / image only)
        use_sasrec = overrides.pop("sasrec", True)
        model, processor, splits = recipes.build_for_dataset(Path(data), backbone=backbone, tokenizer=tokenizer,
                                                             sasrec=sasrec if use_sasrec else None,
                                                             learned_id_dim=64 if use_sasrec else 0,
                                                             max_history=50, **overrides)
        start = time.perf_counter()
        # "train": {"distillation_weight": w} distils from the same SASRec (`recipes.train(teacher=...)`)
        report = recipes.train(model, processor, splits, output / name, teacher=sasrec, **train_kwargs)
        test = report["test"]
        results[name] = {"overrides": overrides, "train": train_kwargs, "seconds": round(time.perf_counter() - start),
                         "epochs": report["epochs"], "best_validation_metric": report["best_validation_metric"],
                         "validation": {k: report["validation"][k] for k in ("hr@1", "ndcg@10", "full_hr@10", "full_ndcg@10")},
                         "test": {k: test[k] for k in ("hr@1", "ndcg@10", "mrr", "full_hr@10", "full_ndcg@10")},
                         "cold": {k: test["by_target_popularity"]["cold"][k] for k in ("hr@1", "ndcg@10")}}
        print("RESULT", name, json.dumps(results[name]), flush=True)
        (output / "variants.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
