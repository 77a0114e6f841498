"""Training throughput of Speeder, eager against `torch.compile` (Inductor), on one backbone shape.

    python bench/compile_speed.py --shape tiny    [--output bench/results/compile-tiny-cpu.json]
    python bench/compile_speed.py --shape smollm2 [--layers 30] [--batch 8]

Each mode runs in its own worker process. A training step is the dense catalog-head forward + backward + AdamW step
on histories of `--history` random catalog items (the default recipe's step) and, with `--layout candidates`, the
candidate head with the isolation mask. Prints examples/s per mode, the compiled/eager ratio and the compile time
(the first compiled steps), and writes JSON. Shapes: `tiny` is the demo's backbone (2 layers, hidden 128);
`smollm2` is SmolLM2-135M's architecture (hidden 576, 9 heads, 3 KV heads, 30 layers) with random weights.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def backbone_config(shape: str, layers: int | None):
    from transformers import LlamaConfig

    from modeling_speeder.conversion.build import tiny_config

    if shape == "tiny":
        config = tiny_config("llama")
    else:  # SmolLM2-135M's shape
        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=256, max_position_embeddings=2048, tie_word_embeddings=True)
    if layers:
        config.num_hidden_layers = layers
    return config


def worker(args):
    import torch

    from modeling_speeder.conversion.build import build_speeder, make_word_tokenizer
    from modeling_speeder.processing.processing_speeder import DEFAULT_PROMPT_BRIDGE, DEFAULT_PROMPT_PREFIX

    torch.manual_seed(0)
    item_ids = [f"i{i}" for i in range(args.items)]
    tokenizer = make_word_tokenizer([DEFAULT_PROMPT_PREFIX, DEFAULT_PROMPT_BRIDGE])
    model, processor = build_speeder(backbone_config(args.shape, args.layers), tokenizer, item_ids,
                                     {"text": torch.randn(args.items, 64), "id": torch.randn(args.items, 64)},
                                     max_history=args.history, catalog_loss_weight=1.0,
                                     candidate_loss_weight=0.0 if args.layout == "dense" else 1.0)
    model.train()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, args.items, (args.batch, args.history + 21), generator=generator).tolist()
    histories = [[item_ids[r] for r in row[: args.history]] for row in rows]
    targets = [item_ids[row[args.history]] for row in rows]
    if args.layout == "dense":
        inputs = processor(histories=histories, targets=targets, dense=True, candidates_in_prompt=False)
        kwargs = {}
    else:
        candidates = [list(dict.fromkeys([t] + [item_ids[r] for r in row[args.history + 1 :]]))[:20] for t, row in
                      zip(targets, rows)]
        candidates = [c + [i for i in item_ids if i not in c][: 20 - len(c)] for c in candidates]
        inputs = processor(histories=histories, candidates=candidates, targets=targets)
        kwargs = {"candidate_scoring": "mask"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model, fullgraph=True) if args.mode == "compiled" else model

    def step():
        loss = forward(**inputs, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print("RESULT " + json.dumps({"mode": args.mode, "warmup_s": round(warmup_s, 2), "step_s_p50": round(median, 4),
                                  "examples_per_s": round(args.batch / median, 1), "tokens": inputs["input_ids"].numel(),
                                  "threads": torch.get_num_threads()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--layout", choices=["dense", "candidates"], default="dense")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default=None)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # set for the worker processes
    args = parser.parse_args()
    if args.mode:
        return worker(args)
    results = {}
    for mode in ("eager", "compiled"):
        command = [sys.executable, __file__, "--mode", mode] + [
            f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
            if key not in ("mode", "output") and value is not None]
        run = subprocess.run(command, capture_output=True, text=True)
        line = next((out for out in run.stdout.splitlines() if out.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{mode} failed:\n{run.stderr[-3000:]}")
        results[mode] = json.loads(line.removeprefix("RESULT "))
    ratio = results["compiled"]["examples_per_s"] / results["eager"]["examples_per_s"]
    print("| shape | layout | batch | mode | examples/s | step p50 ms | warm-up s (compile) |\n|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {args.shape}{f' ({args.layers} layers)' if args.layers else ''} | {args.layout} | {args.batch} | {mode} | "
              f"{r['examples_per_s']} | {1e3 * r['step_s_p50']:.1f} | {r['warmup_s']} |")
    print(f"compiled / eager: {ratio:.2f}x")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results, "ratio": ratio}, indent=1) + "\n")


if __name__ == "__main__":
    main()
