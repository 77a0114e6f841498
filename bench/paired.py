"""Speeder against SASRec on the same users, with paired standard errors.

    python bench/paired.py DEMO_DIR [--split test] [--output JSON]

DEMO_DIR: the folder of a `speeder demo` run (its data/, model/ and sasrec/). Both systems score every user of the
split again (the demo's report.json figures are checked against the recomputed means), and for each column and
target-popularity bucket the table gives each system's mean, their difference and the difference's standard error
from the per-user differences (the two systems rank the same users, so their errors are correlated: the independent
standard error that BENCHMARKS.md states alongside overstates the uncertainty).
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = ("hr@1", "ndcg@10", "full_hr@10", "full_ndcg@10")


def per_user(candidate_scores, labels, ranks) -> dict:
    """Each user's HR@1 and NDCG@10 on the stored candidates and HR@10 and NDCG@10 over the whole catalog."""
    from modeling_speeder.evaluation import candidate_ranks

    candidate = candidate_ranks(candidate_scores, labels)
    full = np.asarray(ranks, dtype=np.float64)
    return {"hr@1": (candidate == 0).astype(float), "ndcg@10": (candidate < 10) / np.log2(candidate + 2),
            "full_hr@10": (full < 10).astype(float), "full_ndcg@10": (full < 10) / np.log2(full + 2)}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    difference = a - b
    se = float(difference.std(ddof=1) / math.sqrt(len(difference))) if len(difference) > 1 else float("nan")
    independent = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) if len(a) > 1 else float("nan")
    mean = float(difference.mean())
    return {"speeder": float(a.mean()), "sasrec": float(b.mean()), "difference": mean, "paired_se": se,
            "z": mean / se if se else float("nan"), "independent_se": independent, "users": len(a)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--output", default=None, help="JSON to write (default: DEMO_DIR/paired-SPLIT.json)")
    args = parser.parse_args()

    from transformers import AutoModel, AutoProcessor

    from modeling_speeder.atomic_files import write_text_atomically
    from modeling_speeder.conversion.datasets import load_canonical
    from modeling_speeder.evaluation import popularity_bucket_names, training_item_counts
    from modeling_speeder.recipes import score_split
    from modeling_speeder.sasrec import SASRecModel, score_sasrec

    demo = Path(args.demo)
    splits, _, _, _ = load_canonical(demo / "data")
    model, processor = AutoModel.from_pretrained(demo / "model"), AutoProcessor.from_pretrained(demo / "model")
    sasrec = SASRecModel.from_pretrained(demo / "sasrec", use_safetensors=True).eval()
    data = splits[args.split]
    index = {item: row for row, item in enumerate(processor.item_ids)}
    rows = lambda items: [index[i] for i in items]  # noqa: E731
    speeder = score_split(model, processor, data)
    baseline = score_sasrec(sasrec, [rows(h) for h in data["history"]], rows(data["target"]),
                            [rows(c) for c in data["candidates"]])
    systems = {"speeder": per_user(speeder["candidate_scores"], speeder["labels"], speeder["ranks"].numpy()),
               "sasrec": per_user(baseline["candidate_scores"], baseline["labels"], baseline["ranks"].numpy())}
    report = json.loads((demo / "report.json").read_text())
    for name, metrics in (("speeder", report[args.split]), ("sasrec", report["sasrec"][args.split])):
        for column in COLUMNS:  # the recomputed means are the demo's own figures
            assert abs(systems[name][column].mean() - metrics[column]) < 1e-6, (name, column)
    buckets = np.array(popularity_bucket_names(speeder["targets"], training_item_counts(splits, index)))
    result = {}
    for bucket in ("all", "cold", "warm"):
        keep = np.ones(len(buckets), dtype=bool) if bucket == "all" else buckets == bucket
        result[bucket] = {c: paired(systems["speeder"][c][keep], systems["sasrec"][c][keep]) for c in COLUMNS}
    print(f"{demo} {args.split}: Speeder - SASRec, paired standard errors (independent ones in brackets)")
    for bucket, columns in result.items():
        for column, r in columns.items():
            print(f"{bucket:>5} {column:>13}  {r['speeder']:.4f} {r['sasrec']:.4f}  {r['difference']:+.4f} "
                  f"+- {r['paired_se']:.4f} (z {r['z']:+.2f}; independent {r['independent_se']:.4f})  n={r['users']}")
    output = Path(args.output or demo / f"paired-{args.split}.json")
    write_text_atomically(output, json.dumps({"demo": str(demo), "split": args.split, **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
