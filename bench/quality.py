"""Quality at equal training budget: Speeder against a LLaRA-style recommender, same backbone, data and test users.

    python bench/quality.py --data DATA_DIR --backbone smollm2 --examples 256 --eval-users 200 \
        --output bench/results/quality-smollm2.json

DATA_DIR is a canonical dataset folder with an `id` feature (`speeder features --collaborative`): LLaRA's
collaborative token is that SASRec embedding, projected. Both systems train with LoRA (rank 8, attention
projections) on the backbone, or the whole backbone with `--full-finetune` (for random-weight backbones), batch 4,
histories of at most `--history` items, 20 candidates (target + 19 drawn outside the history), and are tested on
the first `--eval-users` test users with their stored candidates.

- LLaRA-style: each item is its title (first `--title-words` words) followed by its projected collaborative token;
  the LM loss is on the target's title; at test time the greedy answer is matched to a candidate title (exact,
  case-insensitive). HR@1 = the match is the target; ValidRatio = the answer is some candidate (LLaRA's code).
- Speeder: `speeder train` (candidate head, MPO), with the same number of training examples ("equal examples"), and
  again with as many examples as it trains in LLaRA-style's training time ("equal time").
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_and_test_llara(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from modeling_speeder.conversion.build import load_backbone
    from modeling_speeder.conversion.datasets import load_canonical

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    splits, items, features, _ = load_canonical(args.data)
    if "id" not in features:
        raise SystemExit(f"{args.data} has no 'id' feature: run `speeder features --collaborative` first")
    item_ids = list(items["item_id"])
    row_of = {item: i for i, item in enumerate(item_ids)}
    titles = [" ".join((t or i).split()[: args.title_words]) for t, i in zip(items["title"], item_ids)]
    backbone, tokenizer = load_backbone(args.backbone)
    if not hasattr(backbone, "get_input_embeddings"):
        backbone = AutoModelForCausalLM.from_config(backbone)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|cf|>"]})
    backbone.resize_token_embeddings(len(tokenizer))
    cf_token = tokenizer.convert_tokens_to_ids("<|cf|>")
    cf = torch.as_tensor(features["id"], dtype=torch.float32)  # (N, d) SASRec item embeddings
    projector = torch.nn.Linear(cf.shape[1], backbone.config.hidden_size)
    model = backbone if args.full_finetune else get_peft_model(
        backbone, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))

    def prompt(history, candidates):
        hist = ", ".join(f"{titles[i]} <|cf|>" for i in history)
        cands = ", ".join(f"{titles[i]} <|cf|>" for i in candidates)
        return f"This user has bought: {hist}. Choose the next item from: {cands}. Answer:"

    def embed(input_ids, rows_items):
        x = model.get_input_embeddings()(input_ids)
        vectors = projector(cf[torch.tensor([i for row in rows_items for i in row])])
        return x.masked_scatter((input_ids == cf_token)[..., None], vectors.to(x.dtype))

    def draw_candidates(history, target):
        seen = set(history) | {target}
        negatives = rng.sample([i for i in range(len(item_ids)) if i not in seen], 19)
        cands = negatives + [target]
        rng.shuffle(cands)
        return cands

    train_rows = list(splits["train"])
    rng.shuffle(train_rows)
    train_rows = train_rows[: args.examples]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params, "lr": args.lr}, {"params": projector.parameters(), "lr": args.lr}])
    model.train()
    start = time.perf_counter()
    for step in range(0, len(train_rows), args.batch):
        batch = train_rows[step : step + args.batch]
        hists = [[row_of[i] for i in r["history"]][-args.history :] for r in batch]
        targets = [row_of[r["target"]] for r in batch]
        cands = [draw_candidates(h, t) for h, t in zip(hists, targets)]
        answers = [" " + titles[t] + tokenizer.eos_token for t in targets]
        enc = tokenizer([prompt(h, c) + a for h, c, a in zip(hists, cands, answers)], return_tensors="pt", padding=True)
        labels = enc.input_ids.clone()
        labels[enc.attention_mask == 0] = -100
        for b, a in enumerate(answers):
            labels[b, : -len(tokenizer(a, add_special_tokens=False).input_ids)] = -100
        loss = model(inputs_embeds=embed(enc.input_ids, [h + c for h, c in zip(hists, cands)]),
                     attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step // args.batch % 16 == 0:
            print(f"llara step {step // args.batch}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    train_seconds = time.perf_counter() - start

    model.eval()
    test_rows = list(splits["test"])[: args.eval_users]
    hits, valid, start = 0, 0, time.perf_counter()
    max_new = max(len(tokenizer(" " + t, add_special_tokens=False).input_ids) for t in titles) + 1
    index_of_title = {}
    for i, t in enumerate(titles):
        index_of_title.setdefault(t.strip().lower(), i)
    for s in range(0, len(test_rows), args.eval_batch):
        batch = test_rows[s : s + args.eval_batch]
        hists = [[row_of[i] for i in r["history"]][-args.history :] for r in batch]
        cands = [[row_of[i] for i in r["candidates"]] for r in batch]
        enc = tokenizer([prompt(h, c) for h, c in zip(hists, cands)], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(inputs_embeds=embed(enc.input_ids, [h + c for h, c in zip(hists, cands)]),
                                 attention_mask=enc.attention_mask, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for text, r, c in zip(tokenizer.batch_decode(out, skip_special_tokens=True), batch, cands):
            answer = index_of_title.get(text.strip().split("\n")[0].strip().lower())
            valid += answer in c
            hits += answer == row_of[r["target"]]
    n = len(test_rows)
    return {"system": "llara", "examples": len(train_rows), "train_seconds": round(train_seconds, 1),
            "examples_per_second": round(len(train_rows) / train_seconds, 3), "hr@1": hits / n, "valid_ratio": valid / n,
            "eval_users": n, "eval_seconds": round(time.perf_counter() - start, 1)}


def train_and_test_speeder(args, examples, name):
    steps = max(1, math.ceil(examples / args.batch))
    out = Path(args.workdir) / name
    command = [sys.executable, "-m", "modeling_speeder", "train", "--data", args.data, "--backbone", args.backbone,
               "--output", str(out), "--steps", str(steps), "--batch-size", str(args.batch),
               "--lora-r", "0" if args.full_finetune else "8",
               "--max-history", str(args.history), "--eval-rows", str(args.eval_users), "--seed", str(args.seed),
               "--lr", str(args.speeder_lr)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    test = report["test"]
    return {"system": f"speeder ({name})", "examples": steps * args.batch, "train_seconds": report["train_seconds"],
            "examples_per_second": report["examples_per_second"], "hr@1": test["hr@1"], "ndcg@10": test["ndcg@10"],
            "valid_ratio": 1.0, "eval_users": args.eval_users}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--examples", type=int, default=256, help="LLaRA-style's training budget, in examples")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--title-words", type=int, default=10)
    parser.add_argument("--eval-users", type=int, default=200)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="LLaRA-style: LoRA and projector learning rate")
    parser.add_argument("--speeder-lr", type=float, default=1e-3)
    parser.add_argument("--max-speeder-examples", type=int, default=20000, help="cap on the equal-time run")
    parser.add_argument("--full-finetune", action="store_true", help="train the whole backbone instead of LoRA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="outputs/quality")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    results = [train_and_test_llara(args)]
    print(f"measured llara: {results[0]}", file=sys.stderr, flush=True)
    equal = train_and_test_speeder(args, args.examples, "equal-examples")
    results.append(equal)
    in_llara_time = int(equal["examples_per_second"] * results[0]["train_seconds"])
    capped = in_llara_time > args.max_speeder_examples
    results.append(train_and_test_speeder(args, min(in_llara_time, args.max_speeder_examples),
                                          "capped-below-equal-time" if capped else "equal-time"))
    print(f"| system ({args.backbone}) | training examples | train s | examples/s | HR@1 | NDCG@10 | ValidRatio |\n"
          "|---|---|---|---|---|---|---|")
    for r in results:
        ndcg = f"{r['ndcg@10']:.4f}" if "ndcg@10" in r else "-"
        print(f"| {r['system']} | {r['examples']} | {r['train_seconds']} | {r['examples_per_second']} | {r['hr@1']:.4f} | "
              f"{ndcg} | {r['valid_ratio']:.2f} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
