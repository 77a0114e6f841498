"""Cost of Speeder against a LLaRA-style recommender, title-only prompts and the bare-prompt floor, on one backbone.

    python bench/speed.py --backbone tiny-llama --data DATA_DIR [--output bench/results/speed-tiny.json]
    python bench/speed.py --backbone smollm2    --data DATA_DIR

DATA_DIR is a canonical dataset folder (`speeder convert`); item titles come from its items table. Each system
runs in its own worker process (so its peak memory is its own) with the same backbone, batch, history length
and candidate count, and prints: prompt tokens per example, training examples/s (forward + backward),
inference latency per user at batch 1 and batch 32 (p50 / p95), and the peak RSS growth of a training step.
Ratios are against LLaRA-style, measured in the same run. Histories and candidates are random catalog items, as
in ../shared/tools/speed_anchor.py: cost depends on lengths, not on which items.

Systems:
- llara: each item rendered as its title plus one projected collaborative token; training = LM loss on the target
  title; inference = greedy generation of the median title length, matched to a candidate title (LLaRA's code).
- title_only: the same prompts without soft tokens.
- bare: the floor, ../shared/tools/speed_anchor.py's compressed prompt (1 soft token per item, one forward, a
  linear head on the candidate positions).
- speeder: SpeederForSequentialRecommendation, candidate head, one pass with the isolation mask, item tokens cached
  at inference.
- speeder_prefix: the same model scoring candidates as continuations of the shared prompt's KV cache.
- speeder_catalog: the catalog head, candidates scored by dot product, none in the prompt.
- speeder_dense / speeder_dense_packed: catalog-head dense training (every prefix in one causal pass) on histories
  of random lengths 2..L, left-padded or packed padding-free (what FlashAttention varlen and flex skip); inference as
  speeder_catalog.

On a GPU (`--device cuda --dtype bfloat16`), timings synchronise the device and memory is the peak of
torch.cuda.max_memory_allocated during a training step, above the loaded model.
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SYSTEMS = ("llara", "title_only", "bare", "speeder", "speeder_prefix", "speeder_catalog")
ALL_SYSTEMS = SYSTEMS + ("speeder_dense", "speeder_dense_packed")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def worker(args):
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from modeling_speeder.conversion.build import build_speeder, load_backbone

    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    items = pq.read_table(Path(args.data) / "items.parquet", columns=["item_id", "title"]).to_pydict()  # no `datasets` needed
    item_ids, titles = items["item_id"], [t or i for t, i in zip(items["title"], items["item_id"])]
    if args.attn == "flex_attention" and device.type == "cuda":
        # torch 2.11 fails to lower flex_attention compiled for dynamic sequence lengths (NoValidChoicesError,
        # pytorch#134560): recompile statically for each new shape instead.
        torch._dynamo.config.automatic_dynamic_shapes = False
    backbone, tokenizer = load_backbone(args.backbone)
    if not hasattr(backbone, "get_input_embeddings"):  # a config: random weights
        backbone = AutoModelForCausalLM.from_config(backbone)
    if args.worker in ("llara", "title_only", "bare"):
        backbone = backbone.to(device, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    H, B, L, C = backbone.config.hidden_size, args.batch, args.history, args.candidates

    def sample(batch):
        rows = []
        for _ in range(batch):
            chosen = random.sample(range(len(item_ids)), L + C)
            rows.append((chosen[:L], chosen[L:], chosen[L]))
        return rows

    result = {"system": args.worker, "backbone": args.backbone, "batch": B, "history": L, "candidates": C,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "dtype": args.dtype,
              "attn_implementation": args.attn}
    if args.worker in ("llara", "title_only", "bare"):
        model = backbone
        emb = model.get_input_embeddings()
        token = "<|item|>"
        if token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [token]})
            model.resize_token_embeddings(len(tokenizer))
        item_token_id = tokenizer.convert_tokens_to_ids(token)
        cf_features = torch.randn(len(item_ids), 64, device=device, dtype=dtype)
        projector = torch.nn.Linear(64, H).to(device, dtype)  # LLaRA's projected collaborative token
        soft = args.worker != "title_only"
        tag = f" {token}" if soft else ""

        def prompt(h, c):
            if args.worker == "bare":
                return f"This user has bought: {token * len(h)}. Candidates: {token * len(c)}. Next:"
            hist = ", ".join(f"{titles[i]}{tag}" for i in h)
            cands = ", ".join(f"{titles[i]}{tag}" for i in c)
            return f"This user has bought: {hist}. Choose the next item from: {cands}. Answer:"

        def embed(ids, rows_items):
            x = emb(ids)
            if not soft:
                return x
            vectors = projector(cf_features[torch.tensor(rows_items, device=device)])  # (B, L + C, H), in prompt order
            mask = ids == item_token_id
            return x.masked_scatter(mask[..., None], vectors[:, : int(mask.sum(1)[0])].reshape(-1, H))

        tokenizer.padding_side = "left"
        rows = sample(B)
        order = [h + c for h, c, _ in rows]
        if args.worker == "bare":
            enc = tokenizer([prompt(h, c) for h, c, _ in rows], return_tensors="pt", padding=True).to(device)
            head = torch.nn.Linear(H, 1).to(device, dtype)
            labels = torch.tensor([c.index(t) for _, c, t in rows], device=device)

            def train_step():
                hidden = model.model(inputs_embeds=embed(enc.input_ids, order),
                                     attention_mask=enc.attention_mask).last_hidden_state
                scores = head(hidden[:, -C - 3 : -3]).squeeze(-1)
                torch.nn.functional.cross_entropy(scores, labels).backward()
                model.zero_grad(set_to_none=True)

            result["tokens_per_example"] = enc.input_ids.shape[1]
        else:
            answers = [" " + titles[t] for _, _, t in rows]
            full = tokenizer([prompt(h, c) + a for (h, c, _), a in zip(rows, answers)], return_tensors="pt",
                             padding=True).to(device)
            labels = full.input_ids.clone()
            labels[full.attention_mask == 0] = -100
            for i, a in enumerate(answers):
                labels[i, : -len(tokenizer(a, add_special_tokens=False).input_ids)] = -100

            def train_step():
                out = model(inputs_embeds=embed(full.input_ids, order), attention_mask=full.attention_mask, labels=labels)
                out.loss.backward()
                model.zero_grad(set_to_none=True)

            result["tokens_per_example"] = full.input_ids.shape[1]
        n_new = int(statistics.median(len(tokenizer(" " + t, add_special_tokens=False).input_ids) for t in titles))
        title_index = {t.strip().lower(): i for i, t in enumerate(titles)}

        def infer(batch):
            rows_b = sample(batch)
            enc_b = tokenizer([prompt(h, c) for h, c, _ in rows_b], return_tensors="pt", padding=True).to(device)
            order_b = [h + c for h, c, _ in rows_b]
            with torch.inference_mode():
                x = embed(enc_b.input_ids, order_b)
                if args.worker == "bare":
                    model.model(inputs_embeds=x, attention_mask=enc_b.attention_mask)
                    return 1.0
                generated = model.generate(inputs_embeds=x, attention_mask=enc_b.attention_mask, max_new_tokens=n_new,
                                           min_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            # LLaRA matches the generated title to a candidate; an answer that is no candidate is invalid.
            valid = [title_index.get(t.strip().lower()) in set(c) for t, (_, c, _) in zip(texts, rows_b)]
            return sum(valid) / len(valid)
    else:
        features = {"text": torch.randn(len(item_ids), 64)}
        model, processor = build_speeder(backbone, tokenizer, item_ids, features, learned_id_dim=32,
                                         max_history=max(L, 1), expert_hidden_size=128)
        model = model.to(device, dtype)
        model.set_attn_implementation(args.attn)
        scoring = "prefix_cache" if args.worker == "speeder_prefix" else "mask"
        rows = sample(B)
        dense = args.worker.startswith("speeder_dense")
        if dense:  # histories of random lengths, where padding costs and packing saves
            rows = [(h[: random.randint(2, L)], c, t) for h, c, t in rows]

        def inputs_for(rows_b, with_candidates=True, targets=False, **kwargs):
            hist = [[item_ids[i] for i in h] for h, _, _ in rows_b]
            cands = [[item_ids[i] for i in c] for _, c, _ in rows_b] if with_candidates else None
            tgts = [item_ids[t] for _, _, t in rows_b] if targets else None
            return processor(histories=hist, candidates=cands, targets=tgts, **kwargs).to(device)

        catalog = args.worker == "speeder_catalog" or dense
        if catalog:
            model.config.catalog_loss_weight, model.config.candidate_loss_weight = 1.0, 0.0
        if dense:
            train_inputs = inputs_for(rows, with_candidates=False, targets=True, dense=True,
                                      packed=args.worker == "speeder_dense_packed")
        else:
            train_inputs = inputs_for(rows, with_candidates=not catalog, targets=True)
        model.train()

        def train_step():
            model(**train_inputs, candidate_scoring=scoring).loss.backward()
            model.zero_grad(set_to_none=True)

        result["tokens_per_example"] = train_inputs["input_ids"].numel() / B if dense else inputs_for(
            rows, with_candidates=not catalog)["input_ids"].shape[1]

        def infer(batch):
            model.eval()
            if not model.item_cache_is_current():
                model.cache_item_tokens()
            rows_b = sample(batch)
            with torch.inference_mode():
                if catalog:
                    out = model(**inputs_for(rows_b, with_candidates=False), return_catalog_scores=True)
                    out.catalog_scores.gather(1, torch.tensor([c for _, c, _ in rows_b], device=device))
                else:
                    model(**inputs_for(rows_b), candidate_scoring=scoring)
            return 1.0

    base_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_rss = torch.cuda.memory_allocated() / 2**20
    train_times = timed(train_step, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()
    result["peak_train_rss_growth_mb"] = round(peak - base_rss, 1)
    result["train_step_s"] = statistics.median(train_times)
    result["train_examples_per_s"] = B / result["train_step_s"]
    for batch in (1, 32):
        times, valid = [], []
        infer(1)  # warm-up at batch 1: a batch-32 LLaRA generation on a real LLM costs minutes on a CPU
        for _ in range(args.repeats):
            synchronize()
            start = time.perf_counter()
            valid.append(infer(batch))
            synchronize()
            times.append((time.perf_counter() - start) / batch)
        times.sort()
        result[f"infer_b{batch}_p50_s"] = statistics.median(times)
        result[f"infer_b{batch}_p95_s"] = times[min(len(times) - 1, int(0.95 * len(times)))]
        result[f"valid_ratio_b{batch}"] = statistics.mean(valid)
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(system, args, history, candidates):
    command = [sys.executable, __file__, "--worker", system, "--backbone", args.backbone, "--data", args.data,
               "--batch", str(args.batch), "--history", str(history), "--candidates", str(candidates),
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device,
               "--dtype", args.dtype, "--attn", args.attn]
    run = subprocess.run(command, capture_output=True, text=True)
    line = next((out for out in run.stdout.splitlines() if out.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{system} failed:\n{run.stderr[-3000:]}")
    print(f"measured {system} ({history} x {candidates})", file=sys.stderr, flush=True)
    return json.loads(line[len("RESULT "):])


def grid(args):
    """Inference cost over history lengths and candidate counts: it should grow linearly in both."""
    results = []
    for cell in args.grid.split(","):
        history, candidates = map(int, cell.split("x"))
        for system in args.systems.split(","):
            results.append(run_worker(system, args, history, candidates))
    print("| system | history | candidates | tokens/ex | infer b1 p50 ms | b32 p50 ms/user | train ex/s |\n"
          "|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['system']} | {r['history']} | {r['candidates']} | {r['tokens_per_example']} | "
              f"{1e3 * r['infer_b1_p50_s']:.1f} | {1e3 * r['infer_b32_p50_s']:.2f} | {r['train_examples_per_s']:.1f} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny-llama")
    parser.add_argument("--data", required=True)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--history", type=int, default=7)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--attn", default="sdpa", help="Speeder's attn_implementation: sdpa, eager, flex_attention, ...")
    parser.add_argument("--output", default=None)
    parser.add_argument("--grid", default=None,
                        help="scaling table instead: e.g. 10x20,50x20,200x20,10x100,50x100,200x100 (history x candidates)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.grid:
        return grid(args)
    results = {system: run_worker(system, args, args.history, args.candidates) for system in args.systems.split(",")}
    ref = results.get("llara")
    header = ("system", "tokens/ex", "train ex/s", "x LLaRA", "infer b1 p50 ms", "p95", "b32 p50 ms/user", "p95",
              "% of LLaRA b1", "% of LLaRA b32", "train mem +MB", "% of LLaRA")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, r in results.items():
        def ratio(key, pct=True, r=r):
            if not ref:
                return "-"
            return f"{100 * r[key] / ref[key]:.1f}%" if pct else f"{r[key] / ref[key]:.1f}x"
        print(f"| {name} | {r['tokens_per_example']} | {r['train_examples_per_s']:.1f} | "
              f"{ratio('train_examples_per_s', False)} | "
              f"{1e3 * r['infer_b1_p50_s']:.1f} | {1e3 * r['infer_b1_p95_s']:.1f} | {1e3 * r['infer_b32_p50_s']:.2f} | "
              f"{1e3 * r['infer_b32_p95_s']:.2f} | {ratio('infer_b1_p50_s')} | {ratio('infer_b32_p50_s')} | "
              f"{r['peak_train_rss_growth_mb']} | "
              f"{ratio('peak_train_rss_growth_mb') if ref and ref['peak_train_rss_growth_mb'] > 0 else '-'} |")
    if ref:
        print(f"\nLLaRA-style ValidRatio (generated title matches a candidate): batch 1 {ref['valid_ratio_b1']:.2f}, "
              f"batch 32 {ref['valid_ratio_b32']:.2f}; Speeder's is 1 by construction.")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
