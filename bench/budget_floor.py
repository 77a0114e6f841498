"""How far below a demo's wall time could this machine go? The floor of the full-softmax SASRec baseline, from the
catalog head's cost, and Speeder's measured epochs, against a 10-minute-per-dataset budget.

    python bench/budget_floor.py OUTPUT.json DEMO_DIR [DEMO_DIR ...]

DEMO_DIR: a `speeder demo --output` folder (its data/ and report.json). For each, the script counts SASRec's
training targets (every item of every training sequence but the first), times the catalog head's forward and
backward (logits, cross-entropy, both gradients) at SASRec's shape on this machine, unchunked and in 512-row chunks
(which keeps the logits in cache), and turns the faster one into seconds per epoch for the head alone. SASRec's floor is
that times the epochs early stopping needs (best epoch + patience, from the report); Speeder's is its measured
seconds per epoch in the same report times its best epoch (the epochs before the checkpoint it serves; nothing can
select it sooner). Prints a table and writes OUTPUT.json.
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HIDDEN, ROWS, CHUNK, REPEATS = 64, 4096, 512, 3  # SASRec's hidden size; rows timed per call


def head_seconds(num_items: int, chunk: int | None) -> float:
    """Seconds for ROWS targets of logits -> cross-entropy -> gradients of queries and item table (best of REPEATS)."""
    torch.manual_seed(0)
    queries, items = torch.randn(ROWS, HIDDEN), torch.randn(num_items, HIDDEN, requires_grad=True)
    labels = torch.randint(0, num_items, (ROWS,))
    step, best = chunk or ROWS, float("inf")
    for _ in range(REPEATS + 1):  # the first call warms up
        start = time.perf_counter()
        for rows in range(0, ROWS, step):
            part = queries[rows : rows + step].requires_grad_()
            F.cross_entropy(part @ items.T, labels[rows : rows + step], reduction="sum").backward()
        best = min(best, time.perf_counter() - start)
    return best


def floor(demo: Path) -> dict:
    from modeling_speeder.conversion.datasets import load_canonical

    splits, items, _, _ = load_canonical(demo / "data")
    targets = sum(len(h) - 1 for h in splits["validation"]["history"])  # the training sequences
    report = json.loads((demo / "report.json").read_text())
    sasrec = report["sasrec"]["training"]
    sasrec_epochs = len(sasrec["epochs"])
    gflop = targets * len(items) * HIDDEN * 2 * 3 / 1e9  # logits, and the two gradient products
    unchunked, chunked = head_seconds(len(items), None), head_seconds(len(items), CHUNK)
    per_target = min(unchunked, chunked) / ROWS
    steps_per_epoch = report["steps"] / report["epochs"]
    best_epoch = int(report["best_checkpoint"].rsplit("-", 1)[1]) / steps_per_epoch
    speeder_epoch = report["train_seconds"] / report["epochs"]
    out = {
        "dataset": demo.name, "items": len(items), "sasrec_training_targets": targets,
        "sasrec_head_gflop_per_epoch": round(gflop, 1),
        "head_gflops": {"unchunked": round(ROWS * len(items) * HIDDEN * 6 / unchunked / 1e9, 1),
                        f"chunks_of_{CHUNK}": round(ROWS * len(items) * HIDDEN * 6 / chunked / 1e9, 1)},
        "sasrec_head_floor_s_per_epoch": round(per_target * targets, 1),
        "sasrec_epochs": sasrec_epochs, "sasrec_best_epoch": sasrec["best_epoch"],
        "sasrec_measured_s_per_epoch": round(report["sasrec"]["train_seconds"] / sasrec_epochs, 1),
        "sasrec_floor_minutes": round(per_target * targets * sasrec_epochs / 60, 1),
        "speeder_measured_s_per_epoch": round(speeder_epoch, 1), "speeder_best_epoch": round(best_epoch, 1),
        "speeder_floor_minutes": round(speeder_epoch * best_epoch / 60, 1),
    }
    out["floor_minutes"] = round(out["sasrec_floor_minutes"] + out["speeder_floor_minutes"], 1)
    return out


def main():
    from modeling_speeder.atomic_files import write_text_atomically

    output, demos = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
    rows = [floor(d) for d in demos]
    print("| demo | targets x items | head GFLOP/s (full / chunked) | SASRec head s/epoch floor (measured) | SASRec "
          "epochs | SASRec floor min | Speeder s/epoch x best epoch | Speeder floor min | floor min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = list(r["head_gflops"].values())
        print(f"| {r['dataset']} | {r['sasrec_training_targets']} x {r['items']} | {g[0]} / {g[1]} | "
              f"{r['sasrec_head_floor_s_per_epoch']} ({r['sasrec_measured_s_per_epoch']}) | {r['sasrec_epochs']} | "
              f"{r['sasrec_floor_minutes']} | {r['speeder_measured_s_per_epoch']} x {r['speeder_best_epoch']} | "
              f"{r['speeder_floor_minutes']} | {r['floor_minutes']} |")
    write_text_atomically(output, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
