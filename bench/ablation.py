"""Ablations of Speeder on one dataset, each row a real `speeder train` run with the same budget and seed.

Usage: python bench/ablation.py DATA_DIR OUTPUT_DIR [--steps N] [--set components|heads]
Without --steps every run trains by the default recipe: epochs until validation NDCG@10 stops improving.
DATA_DIR is a canonical dataset folder with text, image and id features (`speeder convert` + `speeder features`).
`components` ablates MPO, SPAE and modalities; `heads` compares the candidate head with the catalog head trained
densely (every prefix of 32 users per step), each scored on the 20-candidate protocol by the head it trained and
on the whole catalog. Prints a Markdown table and writes OUTPUT_DIR/ablation.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

COMPONENTS = {
    "full (text + image + id, MPO, recency, item positions)": [],
    "without MPO (all modalities from step 0)": ["--no-mpo"],
    "without recency embeddings": ["--no-recency"],
    "without item-level position ids": ["--no-item-positions"],
    "text only": ["--modalities", "text"],
    "text + image": ["--modalities", "text,image"],
    "without the per-item catalog bias": ["--no-item-bias"],
    "without item-token dropout": ["--item-dropout", "0"],
}
HEADS = {
    "candidate head (20-candidate cross-entropy, one prefix per example)": ["--head", "candidate"],
    "catalog head, dense (full softmax, every prefix of each user)": ["--head", "catalog-dense"],
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, default=None, help="a fixed budget instead of the default recipe")
    parser.add_argument("--set", default="components", choices=["components", "heads"])
    args = parser.parse_args()
    rows = COMPONENTS if args.set == "components" else HEADS
    results = {}
    for i, (name, flags) in enumerate(rows.items()):
        out = Path(args.output) / f"run{i}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "modeling_speeder", "train", "--data", args.data, "--output", str(out),
                        *(["--steps", str(args.steps)] if args.steps else []), *flags],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.loads((out / "report.json").read_text())
        test = report["test"]  # ranked by the head the run trained
        results[name] = {"flags": flags, "seconds": round(time.perf_counter() - start, 1),
                         "train_seconds": report["train_seconds"], "full_hr@10": report["test"]["full_hr@10"],
                         "full_ndcg@10": report["test"]["full_ndcg@10"], **test}
        print(f"done: {name} ({results[name]['seconds']}s)", flush=True)
    (Path(args.output) / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| variant | HR@1 | NDCG@10 | MRR | HR@10 | full-catalog HR@10 | full-catalog NDCG@10 | train s |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['hr@1']:.4f} | {r['ndcg@10']:.4f} | {r['mrr']:.4f} | {r['hr@10']:.4f} | "
              f"{r['full_hr@10']:.4f} | {r['full_ndcg@10']:.4f} | {r['train_seconds']} |")


if __name__ == "__main__":
    main()
