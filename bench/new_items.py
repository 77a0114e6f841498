"""The new-item protocol: items no one interacted with before, recommended without retraining.

    python bench/new_items.py --dataset scientific [--share 0.1] [--seed 0] [--output DIR] [--json FILE]
                              [--overrides '{"catalog_id_dropout": 0.5, "train": {...}}']

A seeded 10% of the catalog is held out of training entirely (`conversion.datasets.hold_out_items`: removed from
every training sequence and target; no feature of theirs is fitted: the SASRec that makes Speeder's `id` features
and teaches it never sees them either). SASRec and Speeder are trained on the rest with the demo's recipe and
selected on validation; the held-out items are then added to the trained Speeder with their text and image features
(`conversion.build.add_items`: no `id`, the median per-item bias), and the test split is read once. Test users
whose target is a held-out item form the new-item set; the others, the known-item set. Systems: Speeder; SASRec,
whose rows for the new items keep their initial values (an ID model has nothing else to give them); popularity
(training counts: a new item has none); and content kNN (the cosine between a candidate's frozen text/image features
and the mean of the user's most recent history items', the number of items selected on validation), the standard
cold-start baseline. Each is scored on the 20 stored candidates and on the whole catalog (history excluded).
Speeder's validation new-item and known-item figures are reported too (validation users whose target is held out:
also never trained on), to choose settings by. `--overrides`: SpeederConfig fields, and "train": recipes.train
arguments. Standard errors are binomial, for the hit rates. Prints a markdown table, writes JSON atomically.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KNN_HISTORY = (1, 2, 3, 5, 10, 20, 50)  # how many recent history items the kNN profile averages: selected on validation
COLUMNS = (("HR@1", "hr@1"), ("NDCG@10", "ndcg@10"), ("full HR@10", "full_hr@10"), ("full NDCG@10", "full_ndcg@10"))


def sasrec_with_new_rows(sasrec, num_items: int):
    """The trained SASRec over the whole catalog: the new items' rows (appended) keep their initial values."""
    from modeling_speeder.sasrec import SASRecModel

    config = copy.deepcopy(sasrec.config)
    config.num_items = num_items
    full = SASRecModel(config)
    state = sasrec.state_dict()
    table = full.item_embedding.weight.detach().clone()
    table[: state["item_embedding.weight"].shape[0]] = state["item_embedding.weight"]
    full.load_state_dict({**state, "item_embedding.weight": table})
    return full.eval()


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="scientific", choices=["scientific", "beauty", "ml-100k"])
    parser.add_argument("--share", type=float, default=0.1, help="share of the catalog held out as new items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=40, help="most Speeder epochs (early stopping ends sooner)")
    parser.add_argument("--output", default=None, help="work folder (default: outputs/new-items/<dataset>)")
    parser.add_argument("--json", default=None, help="results file (default: bench/results/new_items_<dataset>.json)")
    parser.add_argument("--bias-quantiles", type=float, nargs="*", default=[],
                        help="also score validation with the new items' bias at these quantiles of the trained ones")
    parser.add_argument("--overrides", type=json.loads, default={}, help="SpeederConfig fields; 'train': train arguments")
    args = parser.parse_args()
    import torch
    from transformers import set_seed

    from modeling_speeder import recipes, register
    from modeling_speeder.arguments import DemoArguments
    from modeling_speeder.atomic_files import write_text_atomically
    from modeling_speeder.cli import DEMO_SELECTION_ROWS
    from modeling_speeder.conversion.build import add_items
    from modeling_speeder.conversion.datasets import hold_out_items, load_canonical, write_canonical
    from modeling_speeder.evaluation import content_knn_baseline, popularity_baseline, training_item_counts
    from modeling_speeder.modeling_speeder import content_vectors
    from modeling_speeder.sasrec import evaluate_sasrec

    register()
    output = Path(args.output or f"outputs/new-items/{args.dataset}")
    started = time.perf_counter()
    if not (output / "data" / "stats.json").exists():
        recipes.prepare_dataset(args.dataset, output / "data")
    splits, items, features, presence = load_canonical(output / "data")
    known_splits, known_ids, held_ids, protocol = hold_out_items(splits, items["item_id"], args.share, args.seed)
    row = {item: r for r, item in enumerate(items["item_id"])}
    known_rows, held_rows = [row[i] for i in known_ids], [row[i] for i in held_ids]
    write_canonical(output / "data-known", known_splits, items.select(known_rows).to_dict(),
                    {m: x[known_rows] for m, x in features.items()}, {m: p[known_rows] for m, p in presence.items()},
                    source=f"{args.dataset} without {len(held_ids)} held-out items", overwrite=True)
    selection_rows = DEMO_SELECTION_ROWS.get(args.dataset)

    set_seed(args.seed)
    sasrec_report, sasrec = recipes.sasrec_baseline(known_splits, known_ids, seed=args.seed, selection_rows=selection_rows)
    set_seed(args.seed)
    overrides = dict(args.overrides)
    train_overrides = overrides.pop("train", {})
    model, processor, _ = recipes.build_for_dataset(output / "data-known", sasrec=sasrec, seed=args.seed, **overrides)
    # The demo's recipe (DemoArguments' defaults), trained on the known items.
    speeder_report = recipes.train(
        model, processor, known_splits, output / "speeder", DemoArguments(), teacher=sasrec, report_splits=("validation",),
        **{"epochs": args.epochs, "seed": args.seed, "selection_rows": selection_rows, **train_overrides})
    add_items(model, processor, held_ids, {m: x[held_rows] for m, x in features.items()},
              {m: p[held_rows] for m, p in presence.items()})

    catalog = processor.item_ids  # the known items, then the new ones
    index = {item: r for r, item in enumerate(catalog)}
    counts = training_item_counts(known_splits, index)
    order = known_rows + held_rows
    vectors = content_vectors({m: x[order] for m, x in features.items()}, {m: p[order] for m, p in presence.items()})
    as_rows = lambda data: ([[index[i] for i in h] for h in data["history"]], [index[t] for t in data["target"]],  # noqa: E731
                            [[index[c] for c in cs] for cs in data["candidates"]])
    validation = recipes.select(known_splits["validation"], selection_rows)
    knn_selection = {last: content_knn_baseline(vectors, *as_rows(validation), counts, last)["full_ndcg@10"]
                     for last in KNN_HISTORY}
    knn_last = max(knn_selection, key=knn_selection.get)
    full_sasrec = sasrec_with_new_rows(sasrec, len(catalog))
    held = set(held_ids)
    split_sets = {split: {"new items": protocol[split].filter(lambda r: r["target"] in held),
                          "known items": protocol[split].filter(lambda r: r["target"] not in held)}
                  for split in ("validation", "test")}
    speeder_validation = {name: {k: v for k, v in recipes.evaluate_split(model, processor, data, counts).items()
                         if isinstance(v, float)} for name, data in split_sets["validation"].items()}
    # What the new items' per-item bias should be (add_items gives the median of the trained ones): validation only.
    bias_validation = {}
    if args.bias_quantiles and model.catalog_item_bias is not None:
        trained = model.catalog_item_bias.weight[: len(known_ids), 0].detach().clone()
        median = model.catalog_item_bias.weight[len(known_ids) :, 0].detach().clone()
        for q in args.bias_quantiles:
            with torch.no_grad():
                model.catalog_item_bias.weight[len(known_ids) :, 0] = trained.quantile(q)
            bias_validation[q] = {name: {k: v for k, v in recipes.evaluate_split(model, processor, data, counts).items()
                                         if k in ("hr@1", "ndcg@10", "full_hr@10", "full_ndcg@10")}
                                  for name, data in split_sets["validation"].items()}
            print(f"new-item bias at quantile {q}: validation {json.dumps(bias_validation[q])}")
        with torch.no_grad():
            model.catalog_item_bias.weight[len(known_ids) :, 0] = median
    sets = split_sets["test"]
    results = {}
    for set_name, data in sets.items():  # the test split, read once per system
        histories, targets, candidates = as_rows(data)
        results[set_name] = {
            "Speeder": recipes.evaluate_split(model, processor, data, counts),
            "SASRec": evaluate_sasrec(full_sasrec, histories, targets, candidates, counts),
            "popularity": popularity_baseline(known_splits, index, data),
            f"content kNN (last {knn_last})": content_knn_baseline(vectors, histories, targets, candidates, counts,
                                                                   knn_last),
        }
    summary = {
        "dataset": args.dataset, "share": args.share, "seed": args.seed, "overrides": args.overrides,
        "held_out_items": len(held_ids), "speeder_validation": speeder_validation,
        "new_item_bias_validation": bias_validation,
        "catalog_items": len(catalog), "users": {k: len(v) for k, v in sets.items()},
        "knn_validation_full_ndcg@10": knn_selection, "knn_last": knn_last,
        "sasrec_training": sasrec_report["training"], "sasrec_train_seconds": sasrec_report["train_seconds"],
        "speeder": {k: speeder_report[k] for k in ("train_seconds", "steps", "epochs", "best_checkpoint",
                                                    "best_validation_metric", "catalog_loss", "content_affinity")},
        "seconds": round(time.perf_counter() - started, 1),
        "results": {s: {system: {k: v for k, v in r.items() if k != "by_history_length"} for system, r in systems.items()}
                    for s, systems in results.items()},
    }
    path = Path(args.json or f"bench/results/new_items_{args.dataset}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(summary, indent=2, default=str) + "\n")
    for set_name, systems in results.items():
        n = len(sets[set_name])
        print(f"\n{args.dataset}, {set_name} ({n} test users); +- binomial standard error of the hit rates")
        print("| system | " + " | ".join(name for name, _ in COLUMNS) + " |")
        print("|---" * (len(COLUMNS) + 1) + "|")
        for system, report in systems.items():
            cells = [f"{report[key]:.4f}" + (f" +- {standard_error(report[key], n):.4f}" if key.endswith(("hr@1", "hr@10"))
                                             else "") for _, key in COLUMNS]
            print(f"| {system} | " + " | ".join(cells) + " |")
    for set_name, metrics in speeder_validation.items():
        print(f"Speeder, validation {set_name} ({len(split_sets['validation'][set_name])} users): "
              + ", ".join(f"{name} {metrics[key]:.4f}" for name, key in COLUMNS))
    print(f"\n{summary['seconds']} s; JSON in {path}")


if __name__ == "__main__":
    main()
