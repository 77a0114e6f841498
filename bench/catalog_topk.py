"""Full-catalog top-k over a synthetic catalog (default 1,000,000 items) with bounded extra memory.

    python bench/catalog_topk.py [--items 1000000] [--batch 32] [--chunk 65536] [--output bench/results/topk.json]

Builds a tiny Speeder over random text features, caches every item's tokens once, then recommends the top 10
for a batch of users through the catalog head, excluding their histories. Reports the item cache's size, the
peak RSS growth of the top-k call beyond it (the memory the chunking bounds: about batch x chunk scores), and
the latency per batch. The top-k's peak is sampled from /proc/self/status while it runs (Linux).
"""

import argparse
import json
import os
import resource
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class RssSampler(threading.Thread):
    """Samples the current RSS every few milliseconds: the peak of one call, whatever came before it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_mb(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    import torch

    from modeling_speeder.conversion.build import build_speeder, make_word_tokenizer, tiny_config
    from modeling_speeder.processing.processing_speeder import DEFAULT_PROMPT_BRIDGE, DEFAULT_PROMPT_PREFIX

    torch.manual_seed(0)
    item_ids = [f"i{n}" for n in range(args.items)]
    tokenizer = make_word_tokenizer([DEFAULT_PROMPT_PREFIX, DEFAULT_PROMPT_BRIDGE])
    start = time.perf_counter()
    model, processor = build_speeder(tiny_config("llama", hidden_size=args.hidden), tokenizer, item_ids,
                                     {"text": torch.randn(args.items, 16)}, expert_hidden_size=32, max_history=20)
    model.eval()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    cache = model.cache_item_tokens(chunk_size=args.chunk)
    cache_s = time.perf_counter() - start
    cache_mb = cache.numel() * cache.element_size() / 2**20
    histories = [[item_ids[(7919 * u + j) % args.items] for j in range(20)] for u in range(args.batch)]
    model.recommend(histories[:2], top_k=10, processor=processor, batch_size=args.batch, chunk_size=args.chunk)  # warm-up
    before = rss_mb()
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    recs = model.recommend(histories, top_k=10, processor=processor, batch_size=args.batch, chunk_size=args.chunk)
    topk_s = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    growth = sampler.peak - before
    assert all(len(r["item_ids"]) == 10 and not set(r["item_ids"]) & set(h) for r, h in zip(recs, histories))
    result = {"items": args.items, "batch": args.batch, "chunk": args.chunk, "hidden": args.hidden,
              "build_s": round(build_s, 1), "cache_s": round(cache_s, 1), "item_cache_mb": round(cache_mb, 1),
              "topk_batch_s": round(topk_s, 3), "topk_per_user_ms": round(1e3 * topk_s / args.batch, 2),
              "topk_peak_rss_growth_mb": round(growth, 1),
              "chunk_scores_mb": round(args.batch * args.chunk * 4 / 2**20, 1), "process_peak_rss_mb": round(peak_mb(), 1)}
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
