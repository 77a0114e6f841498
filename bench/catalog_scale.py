"""Cost of the default training step against catalog size: full softmax against the sampled softmax.

    python bench/catalog_scale.py [--items 1000 10000 100000 1000000] [--negatives 1024] [--output FILE.json]

One worker process per (catalog size, loss) point, one thread each. A step is what `speeder train` runs for the
default recipe: the collator turns 32 training windows of 50 history items into a dense batch (with the sampled
softmax it also draws the negatives and their log q), then the dense catalog-head forward, backward and AdamW step
of the demo's model (tiny Llama backbone, text 512 + image 512 + id 64 features: the Scientific demo's widths,
per-item bias). Reported: step time (median), examples/s, and the peak RSS of the steps above the RSS they start
from (Linux VmHWM, reset after the build: the feature bank, weights and data excluded). The full softmax is not run
where its estimated memory (catalog x hidden x 4 bytes x the tensors a step keeps) passes --max-full-gb; the table
says so. Prints a markdown table, writes JSON (atomically) and, with matplotlib, a log-log PNG beside it.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTHS = {"text": 512, "image": 512, "id": 64}


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Start VmHWM again from the current RSS (Linux), so the steps' peak excludes the build's transient peak."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(args):
    import numpy as np
    import torch

    from modeling_speeder.conversion.build import build_speeder, load_backbone, make_word_tokenizer
    from modeling_speeder.processing.collator import SpeederDataCollator
    from modeling_speeder.processing.processing_speeder import DEFAULT_PROMPT_BRIDGE, DEFAULT_PROMPT_PREFIX

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = args.items
    item_ids = [f"i{i}" for i in range(n)]
    features = {m: torch.randn(n, d) for m, d in WIDTHS.items()}
    backbone, _ = load_backbone("tiny-llama")
    tokenizer = make_word_tokenizer([DEFAULT_PROMPT_PREFIX, DEFAULT_PROMPT_BRIDGE])
    model, processor = build_speeder(backbone, tokenizer, item_ids, features, max_history=args.history,
                                     catalog_loss_weight=1.0, candidate_loss_weight=0.0, catalog_item_bias=True,
                                     item_dropout=0.2)
    del features
    model.train()
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.5, n).clip(max=10**6).astype(np.float64)  # a long-tailed popularity, as real catalogs have
    collator = SpeederDataCollator(processor, dense=True, candidates_in_prompt=False, dense_labels_per_row=args.history,
                                   catalog_negatives=args.negatives if args.loss == "sampled" else 0, item_counts=counts)
    batches = []
    for _ in range(4):
        rows = rng.integers(0, n, (args.batch, args.history + 1))
        batches.append([{"history": [item_ids[r] for r in row[:-1]], "target": item_ids[row[-1]], "candidates": [],
                         "first_labeled": 0} for row in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    import gc

    gc.collect()
    reset_peak_rss()
    base_rss = rss_mb("VmRSS")  # weights, feature bank, data: what the steps start from

    def step(i):
        batch = collator(batches[i % len(batches)])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch

    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        batch = step(i)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print("RESULT " + json.dumps({
        "items": n, "loss": args.loss, "negatives": args.negatives if args.loss == "sampled" else None,
        "scored_items": int(batch["catalog_item_rows"].numel()) if "catalog_item_rows" in batch else n,
        "step_s_p50": round(median, 4), "examples_per_s": round(args.batch / median, 1),
        "rss_after_build_mb": round(base_rss), "step_peak_rss_growth_mb": round(rss_mb("VmHWM") - base_rss),
        "threads": torch.get_num_threads()}))


def estimated_full_gb(items: int, args) -> float:
    # Per step the full softmax holds the item representations, their gradient and the expert activations over
    # the catalog (about 8 tensors of items x hidden 128, plus the (labels x items) logits and their gradient).
    return (items * 128 * 4 * 8 + 2 * args.batch * args.history * items * 4) / 1e9


def plot(results, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for loss in ("full", "sampled"):
        points = [r for r in results if r["loss"] == loss and "step_s_p50" in r]
        label = "full softmax" if loss == "full" else f"sampled softmax ({points[0]['negatives'] if points else ''} negatives)"
        axes[0].plot([r["items"] for r in points], [r["step_s_p50"] for r in points], marker="o", label=label)
        axes[1].plot([r["items"] for r in points], [max(r["step_peak_rss_growth_mb"], 1) for r in points], marker="o",
                     label=label)
    for ax, ylabel in ((axes[0], "training step, s (median)"), (axes[1], "peak RSS growth in steps, MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalog items")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    parser.add_argument("--negatives", type=int, default=1024, help="sampled negatives per step")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-full-gb", type=float, default=16.0, help="skip full-softmax points estimated above this")
    parser.add_argument("--output", default="bench/results/catalog_scale.json")
    parser.add_argument("--loss", default=None, help=argparse.SUPPRESS)  # set for the worker processes
    args = parser.parse_args()
    if args.loss:
        args.items = args.items[0]
        return worker(args)
    from modeling_speeder.atomic_files import write_text_atomically

    results = []
    for items in args.items:
        for loss in ("full", "sampled"):
            if loss == "full" and estimated_full_gb(items, args) > args.max_full_gb:
                results.append({"items": items, "loss": loss, "skipped": f"estimated {estimated_full_gb(items, args):.0f} "
                                f"GB per step, above --max-full-gb {args.max_full_gb:g} (this machine has 24 GB)"})
                continue
            command = [sys.executable, __file__, "--loss", loss, "--items", str(items)] + [
                f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                if key not in ("loss", "items", "output", "max_full_gb")]
            run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            line = next((out for out in run.stdout.splitlines() if out.startswith("RESULT ")), None)
            results.append(json.loads(line.removeprefix("RESULT ")) if line else
                           {"items": items, "loss": loss, "failed": run.stderr.strip().splitlines()[-1:]})
            print(json.dumps(results[-1]), flush=True)
    print("\n| items | loss | items scored per step | step s (p50) | examples/s | RSS after build MB | peak RSS growth MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "step_s_p50" in r:
            print(f"| {r['items']:,} | {r['loss']} | {r['scored_items']:,} | {r['step_s_p50']} | {r['examples_per_s']} | "
                  f"{r['rss_after_build_mb']:,} | {r['step_peak_rss_growth_mb']:,} |")
        else:
            print(f"| {r['items']:,} | {r['loss']} | not run: {r.get('skipped') or r.get('failed')} | | | | |")
    sampled = {r["items"]: r for r in results if r["loss"] == "sampled" and "step_s_p50" in r}
    if len(sampled) > 1:
        low, high = sampled[min(sampled)], sampled[max(sampled)]
        print(f"sampled softmax, {high['items']:,} vs {low['items']:,} items: step time x"
              f"{high['step_s_p50'] / low['step_s_p50']:.2f}, peak RSS growth x"
              f"{max(high['step_peak_rss_growth_mb'], 1) / max(low['step_peak_rss_growth_mb'], 1):.2f}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output, json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    picture = plot(results, output.with_suffix(".png"))
    print(f"wrote {output}" + (f" and {picture}" if picture else ""))


if __name__ == "__main__":
    main()
