"""The value of a pretrained LLM backbone: Speeder on Amazon Scientific with SmolLM2-135M
weights against the same architecture with random weights, the tiny random backbone and SASRec, every system trained
by the default recipe (dense catalog head, SASRec `id` features, selected on validation, early stopping) and read
once on test, overall and on cold items.

SmolLM2 is cut to its first `--layers` decoder layers and to the prompt's word vocabulary (`shrink_backbone`): items
are soft tokens, so only the prompt's few words reach the model, and the full checkpoint is too large to carry to a
GPU machine that has no network. The "random" system has exactly that architecture and tokenizer.

    python bench/pretrained_value.py prepare --dir .gpu/pv --layers 4     # here: data, SASRec, shrunk SmolLM2
    python bench/pretrained_value.py run --dir .gpu/pv --output OUT.json  # there (GPU) or here (CPU)
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def prepare(args):
    from modeling_speeder import recipes
    from modeling_speeder.conversion.build import load_backbone, shrink_backbone
    from modeling_speeder.conversion.datasets import load_canonical
    from modeling_speeder.processing.processing_speeder import DEFAULT_PROMPT_BRIDGE, DEFAULT_PROMPT_PREFIX

    root = Path(args.dir)
    stats = recipes.prepare_dataset("scientific", root / "sci")
    splits, items, _, _ = load_canonical(root / "sci")
    report, sasrec = recipes.sasrec_baseline(splits, items["item_id"], seed=0)
    sasrec.save_pretrained(root / "sasrec")
    (root / "sasrec_report.json").write_text(json.dumps(report, default=str) + "\n")
    model, tokenizer = load_backbone("smollm2")
    small, words = shrink_backbone(model, tokenizer, [DEFAULT_PROMPT_PREFIX, DEFAULT_PROMPT_BRIDGE], args.layers)
    small.to(torch.bfloat16).save_pretrained(root / "smollm2")  # bf16 to carry; trained in fp32 + bf16 autocast
    words.save_pretrained(root / "smollm2")
    print(json.dumps({"dataset": stats, "sasrec_test": {k: report["test"][k] for k in ("hr@1", "ndcg@10")},
                      "smollm2_layers": args.layers, "parameters": sum(p.numel() for p in small.parameters())}))


def run(args):
    from transformers import AutoConfig, AutoModel, AutoTokenizer, set_seed

    from modeling_speeder import recipes
    from modeling_speeder.conversion.build import load_backbone
    from modeling_speeder.sasrec import SASRecModel

    root = Path(args.dir)
    sasrec = SASRecModel.from_pretrained(root / "sasrec").eval()
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "sasrec": json.loads((root / "sasrec_report.json").read_text())}
    tokenizer = AutoTokenizer.from_pretrained(root / "smollm2")
    backbones = {
        "smollm2_pretrained": lambda: AutoModel.from_pretrained(root / "smollm2", dtype=torch.float32),
        "smollm2_random": lambda: AutoConfig.from_pretrained(root / "smollm2"),
        "tiny_random": lambda: load_backbone("tiny-llama")[0],
    }
    systems = []
    for spec in args.systems.split(","):  # name[:learning rate[:head]]
        name, lr, head = (spec.split(":") + [None, None])[:3]
        systems.append((spec, name, float(lr) if lr else (1e-3 if name == "tiny_random" else args.lr),
                        head or "catalog-dense"))
    for spec, name, lr, head in systems:
        set_seed(0)
        backbone = backbones[name]()
        tok = load_backbone("tiny-llama")[1] if name == "tiny_random" else tokenizer
        model, processor, splits = recipes.build_for_dataset(root / "sci", backbone=backbone, tokenizer=tok,
                                                             sasrec=sasrec, max_history=50)
        model.float()
        start = time.perf_counter()
        report = recipes.train(model, processor, splits, Path(args.work) / spec.replace(":", "_"), epochs=args.epochs,
                               batch_size=args.batch, learning_rate=lr, seed=0, bf16=torch.cuda.is_available(),
                               patience=args.patience, head=head)
        name = spec
        results[name] = {"seconds": round(time.perf_counter() - start, 1), "lr": lr, "head": head,
                         "parameters": sum(p.numel() for p in model.parameters()),
                         **{k: report[k] for k in ("steps", "epochs", "train_seconds", "best_validation_metric")},
                         "validation": report["validation"], "test": report["test"]}
        print(name, json.dumps({k: results[name]["test"][k] for k in ("hr@1", "ndcg@10", "full_hr@10", "full_ndcg@10")},
                               default=str), flush=True)
        Path(args.output).write_text(json.dumps(results, indent=1, default=str) + "\n")
    rows = {spec: results[spec]["test"] for spec, *_ in systems}
    rows["SASRec"] = results["sasrec"]["test"]
    recipes.print_metrics_table(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--dir", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.set_defaults(run=prepare)
    p = commands.add_parser("run")
    p.add_argument("--dir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--work", default="/tmp/speeder-pretrained-value")
    p.add_argument("--systems", default="smollm2_pretrained,smollm2_random,tiny_random")
    p.add_argument("--epochs", type=float, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--patience", type=int, default=3)
    p.set_defaults(run=run)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
