"""What showing new items more often costs the other users: validation only, on a `bench/new_items.py` work folder.

    python bench/new_item_exposure.py --dataset beauty [--settings 0.5:1 0.5:1.2 0.99:1 1:1] [--json FILE]

Loads the Speeder that `bench/new_items.py --dataset D` trained on the known items (outputs/new-items/D/speeder/model),
adds the held-out items as that script does (`add_items`), and scores every validation user of the protocol (the
users whose target is a new item and the others) over the whole catalog, history excluded, under two ways of lifting
the new items: their per-item bias set to a quantile of the trained ones (`add_items` gives the median), and their
content-affinity term scaled by a factor (the new items' rows of the frozen content the catalog head dots with, in the
model's item cache; 1 is the model as saved). Each setting is QUANTILE:FACTOR. Reports the new-item and known-item
figures, the content kNN's on the same new-item users (its history length as chosen by the work folder's
bench/new_items.py run), and the paired change over all users against the first setting (mean +- standard error of
each user's difference). Prints a markdown table, writes JSON atomically.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="beauty", choices=["scientific", "beauty", "ml-100k"])
    parser.add_argument("--settings", nargs="+", default=["0.5:1", "0.5:1.2", "0.5:1.4", "0.5:1.6", "0.9:1", "0.99:1",
                                                          "1:1"], help="QUANTILE:FACTOR; the first is the reference")
    parser.add_argument("--json", default=None, help="default: bench/results/new_item_exposure_<dataset>.json")
    args = parser.parse_args()
    import numpy as np
    import torch
    from transformers import AutoModel, AutoProcessor

    from modeling_speeder import recipes, register
    from modeling_speeder.atomic_files import write_text_atomically
    from modeling_speeder.conversion.build import add_items
    from modeling_speeder.conversion.datasets import hold_out_items, load_canonical
    from modeling_speeder.evaluation import content_knn_baseline, training_item_counts
    from modeling_speeder.modeling_speeder import content_vectors

    register()
    work = Path(f"outputs/new-items/{args.dataset}")
    protocol_run = json.loads(Path(f"bench/results/new_items_{args.dataset}.json").read_text())
    splits, items, features, presence = load_canonical(work / "data")
    known_splits, known_ids, held_ids, protocol = hold_out_items(splits, items["item_id"], protocol_run["share"],
                                                                 protocol_run["seed"])
    row = {item: r for r, item in enumerate(items["item_id"])}
    order = [row[i] for i in known_ids] + [row[i] for i in held_ids]  # the catalog after add_items
    new_rows = order[len(known_ids):]
    model = AutoModel.from_pretrained(work / "speeder" / "model")
    processor = AutoProcessor.from_pretrained(work / "speeder" / "model")
    add_items(model, processor, held_ids, {m: x[new_rows] for m, x in features.items()},
              {m: p[new_rows] for m, p in presence.items()})
    index = {item: r for r, item in enumerate(processor.item_ids)}
    counts = training_item_counts(known_splits, index)
    validation, held = protocol["validation"], set(held_ids)
    is_new = np.array([t in held for t in validation["target"]])
    new_users = validation.select(np.flatnonzero(is_new))
    vectors = content_vectors({m: x[order] for m, x in features.items()}, {m: p[order] for m, p in presence.items()})
    knn = content_knn_baseline(vectors, [[index[i] for i in h] for h in new_users["history"]],
                               [index[t] for t in new_users["target"]],
                               [[index[c] for c in cs] for cs in new_users["candidates"]], counts, protocol_run["knn_last"])

    inner, known = model.model, len(known_ids)
    encode, factor = inner.cache_item_tokens, {"value": 1.0}

    def cache_with_scaled_new_content(*a, **k):  # the affinity term is weight x content(latest) . content(item)
        cache = encode(*a, **k)
        inner._item_content_cache[known:] *= factor["value"]
        return cache

    inner.cache_item_tokens = cache_with_scaled_new_content
    trained_bias = model.catalog_item_bias.weight[:known, 0].detach().clone()
    rows, reference = [], None
    for setting in args.settings:
        quantile, factor["value"] = map(float, setting.split(":"))
        with torch.no_grad():
            model.catalog_item_bias.weight[known:, 0] = trained_bias.quantile(quantile)
        ranks = np.asarray(recipes.score_split(model, processor, validation)["ranks"])
        per_user = {"full_hr@10": (ranks < 10).astype(float), "full_ndcg@10": np.where(ranks < 10, 1 / np.log2(ranks + 2), 0)}
        reference = reference or per_user
        line = {"bias_quantile": quantile, "content_factor": factor["value"]}
        for metric, x in per_user.items():
            difference = x - reference[metric]
            line |= {f"new {metric}": x[is_new].mean(), f"known {metric}": x[~is_new].mean(), f"all {metric}": x.mean(),
                     f"all {metric} change": difference.mean(),
                     f"all {metric} change se": difference.std(ddof=1) / np.sqrt(len(x))}
        rows.append(line)
        print(json.dumps(line), flush=True)
    summary = {"dataset": args.dataset, "users": {"new items": int(is_new.sum()), "known items": int((~is_new).sum())},
               "content_affinity": model.config.content_affinity, "knn_last": protocol_run["knn_last"],
               "knn_new_items": {k: knn[k] for k in ("hr@1", "ndcg@10", "full_hr@10", "full_ndcg@10")}, "settings": rows}
    path = Path(args.json or f"bench/results/new_item_exposure_{args.dataset}.json")
    write_text_atomically(path, json.dumps(summary, indent=2, default=float) + "\n")
    print(f"\n{args.dataset}, validation: {summary['users']}; content kNN on the new-item users: full HR@10 "
          f"{knn['full_hr@10']:.4f}, full NDCG@10 {knn['full_ndcg@10']:.4f}")
    print("| new items' bias | content factor | new: full HR@10 | new: full NDCG@10 | known: full HR@10 | known: full "
          "NDCG@10 | all: full HR@10 change | all: full NDCG@10 change |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bias_quantile']} | {r['content_factor']} | {r['new full_hr@10']:.4f} | {r['new full_ndcg@10']:.4f} "
              f"| {r['known full_hr@10']:.4f} | {r['known full_ndcg@10']:.4f} | {r['all full_hr@10 change']:+.4f} +- "
              f"{r['all full_hr@10 change se']:.4f} | {r['all full_ndcg@10 change']:+.4f} +- "
              f"{r['all full_ndcg@10 change se']:.4f} |")
    print(f"JSON in {path}")


if __name__ == "__main__":
    main()
