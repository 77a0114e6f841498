"""The `speeder` command line (also `python -m modeling_speeder`)."""

import argparse
import json
import os
import sys
import time


def quickstart(args):
    """Build a tiny Speeder over a synthetic catalog, save it, reload it through AutoModel, recommend."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoProcessor, LlamaConfig

    from .conversion.build import build_speeder, make_word_tokenizer
    from .processing.processing_speeder import DEFAULT_PROMPT_BRIDGE, DEFAULT_PROMPT_PREFIX

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    n = args.num_items
    item_ids = [f"item-{i:04d}" for i in range(n)]
    # Synthetic catalog: items in 8 "genres"; text/image features carry the genre, half the items lack an image.
    genre = torch.arange(n) % 8
    centers = torch.randn(8, 32)
    features = {"text": centers[genre] + 0.3 * torch.randn(n, 32), "image": centers[genre][:, :16] + 0.5 * torch.randn(n, 16)}
    presence = {"image": torch.rand(n) > 0.5}
    tokenizer = make_word_tokenizer([DEFAULT_PROMPT_PREFIX, DEFAULT_PROMPT_BRIDGE])
    backbone = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64)
    model, processor = build_speeder(backbone, tokenizer, item_ids, features, presence, learned_id_dim=16,
                                     expert_hidden_size=64, max_history=10)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"built and saved a tiny Speeder ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{n} items) to {args.output}")

    loaded = AutoModel.from_pretrained(args.output)
    loaded_processor = AutoProcessor.from_pretrained(args.output)
    print(f"reloaded through AutoModel: {type(loaded).__name__}, AutoProcessor: {type(loaded_processor).__name__}")
    histories = [[item_ids[i] for i in range(g, 40, 8)] for g in range(3)]
    candidates = [[item_ids[(7 * u + j) % n] for j in range(20)] for u in range(3)]
    for user, (hist, recs, cand_recs) in enumerate(
        zip(histories, loaded.recommend(histories, top_k=5), loaded.recommend(histories, candidates, top_k=3))
    ):
        print(f"user {user}: history {hist}")
        print("  catalog top-5:   " + ", ".join(f"{i} ({s:.3f})" for i, s in zip(recs["item_ids"], recs["scores"])))
        print("  candidate top-3: " + ", ".join(f"{i} ({s:.3f})" for i, s in zip(cand_recs["item_ids"], cand_recs["scores"])))
    print(f"done in {time.perf_counter() - start:.1f}s (random weights: the rankings show the API, not quality)")


def demo(args):
    """The main job: convert a real dataset, build a small model, train through the MPO stages, evaluate."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pathlib import Path

    from . import recipes

    output = Path(args.output)
    dataset = args.dataset
    if dataset == "auto":
        dataset = "scientific" if recipes.find_shared_scientific() else "ml-100k"
    print(f"[1/3] converting {dataset} to the canonical form")
    stats = recipes.prepare_dataset(dataset, output / "data")
    print(json.dumps({k: v for k, v in stats.items() if k != "source"}))
    print("[2/3] building a small Speeder and training it with transformers.Trainer through the MPO stages")
    model, processor, splits = recipes.build_for_dataset(output / "data", max_history=args.max_history)
    report = recipes.train(model, processor, splits, output, max_steps=args.steps, batch_size=args.batch_size,
                           eval_rows=args.eval_rows, seed=args.seed)
    print(f"[3/3] trained {report['steps']} steps in {report['train_seconds']}s "
          f"({report['examples_per_second']} examples/s); training SASRec on the same split for comparison")
    sasrec = recipes.sasrec_baseline(splits, processor.item_ids, epochs=args.sasrec_epochs, eval_rows=args.eval_rows,
                                     seed=args.seed)
    report["sasrec"] = sasrec
    (output / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"SASRec trained in {sasrec['train_seconds']}s. Metrics with 20 candidates (target + 19 seeded negatives):")
    recipes.print_metrics_table({"Speeder, validation": report["validation"], "Speeder, test": report["test"],
                                 "SASRec, validation": sasrec["validation"], "SASRec, test": sasrec["test"]})
    print(f"SASRec full-catalog (history excluded) test HR@10 {sasrec['test']['full_hr@10']:.4f}, "
          f"NDCG@10 {sasrec['test']['full_ndcg@10']:.4f}")
    print(f"checkpoint, processor and report.json in {output}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="speeder", description="Speeder: fast multimodal-LLM sequential recommendation")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("quickstart", help="build a tiny model, save, reload with AutoModel, and recommend")
    p.add_argument("--output", default="outputs/quickstart")
    p.add_argument("--num-items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=quickstart)
    p = commands.add_parser("demo", help="convert a real dataset, train through MPO, evaluate (no network)")
    p.add_argument("--dataset", default="auto", choices=["auto", "ml-100k", "scientific"])
    p.add_argument("--output", default="outputs/demo")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--sasrec-epochs", type=int, default=30)
    p.add_argument("--eval-rows", type=int, default=None, help="evaluate on the first N users only")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
