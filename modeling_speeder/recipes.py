"""End-to-end recipes behind the CLI: prepare a dataset, build a model, train with Trainer + MPO, evaluate."""

import json
import logging
import time
from pathlib import Path

import torch

from .conversion.build import build_speeder, load_backbone
from .conversion.datasets import convert_recbole, convert_unisrec, load_canonical, movielens_100k_path, write_canonical
from .conversion.features import encode_texts
from .processing.collator import SpeederDataCollator
from .training import SpeederMPOCallback, compute_metrics

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
SCIENTIFIC = "amazon-scientific-mm"


def find_shared_scientific() -> Path | None:
    for base in (Path.cwd(), REPO_ROOT):
        path = base.parent / "shared" / "data" / SCIENTIFIC
        if (path / "Scientific.item2index").exists():
            return path
    return None


def prepare_dataset(name: str, output: Path) -> dict:
    """Convert a known dataset ('ml-100k' from the recbole wheel, or 'scientific' from ../shared/data) into the
    canonical folder, with features: CLIP text + image for Scientific, MiniLM text for MovieLens."""
    start = time.perf_counter()
    if name == "scientific":
        source = find_shared_scientific()
        if source is None:
            raise FileNotFoundError(f"../shared/data/{SCIENTIFIC} was not found next to this checkout")
        splits, items, features = convert_unisrec(source, "Scientific")
    elif name == "ml-100k":
        splits, items = convert_recbole(movielens_100k_path(), "ml-100k")
        text, _ = encode_texts(items["text"])
        features = {"text": text}
    else:
        raise ValueError(f"Unknown dataset {name!r}: expected 'ml-100k' or 'scientific'")
    stats = write_canonical(output, splits, items, features, source=name)
    stats["seconds"] = round(time.perf_counter() - start, 1)
    return stats


def build_for_dataset(data_dir: Path, backbone=None, tokenizer=None, learned_id_dim=64, **config_kwargs):
    """Model and processor for a canonical dataset folder; a tiny random Llama backbone unless one is given."""
    splits, items, features, presence = load_canonical(data_dir)
    if backbone is None:
        backbone, tokenizer = load_backbone("tiny-llama")  # 2 layers, hidden 128, word-level tokenizer
    model, processor = build_speeder(backbone, tokenizer, items["item_id"], features, presence,
                                     item_titles=items["title"], learned_id_dim=learned_id_dim, **config_kwargs)
    return model, processor, splits


HISTORY_BUCKETS = ((1, 5), (6, 10), (11, 20), (21, 50), (51, None))


def apply_lora(model, r: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """LoRA on the backbone; the MRC experts and gate, SPAE embeddings and heads stay fully trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                        modules_to_save=["mrc", "recency_embedding", "candidate_head", "query_proj"])
    return get_peft_model(model, config)


def dense_training_rows(splits):
    """One row per user for dense catalog training: the training sequence (the validation history), its last item
    as the target. The validation and test targets are never seen."""
    from datasets import Dataset

    rows = {"user_id": [], "history": [], "target": [], "candidates": []}
    for user, history in zip(splits["validation"]["user_id"], splits["validation"]["history"]):
        if len(history) >= 2:
            for key, value in zip(rows, (user, history[:-1], history[-1], [])):
                rows[key].append(value)
    return Dataset.from_dict(rows)


def train(model, processor, splits, output: Path, max_steps=300, batch_size=32, learning_rate=1e-3, seed=0,
          eval_rows=None, resume=False, mpo=True, lora_r=0, gradient_accumulation_steps=1, save_steps=None,
          head="candidate", packed=False, **training_kwargs):
    """Train with `transformers.Trainer` (MPO callback, fresh negatives, optional LoRA), save the (merged)
    checkpoint and processor under output/model, evaluate validation and test, write report.json and plots.

    head: "candidate" (cross-entropy over 20 candidates per training prefix) or "catalog-dense" (the catalog
    head, full softmax, every prefix of each user's training sequence in one causal pass).
    packed: with "catalog-dense", padding-free batches with explicit sequence boundaries (for FlashAttention's varlen
    kernel and flex_attention; with eager / sdpa the block-diagonal mask costs more than the padding it saves)."""
    from transformers import Trainer, TrainingArguments

    output = Path(output)
    if head not in ("candidate", "catalog-dense"):
        raise ValueError(f"head must be 'candidate' or 'catalog-dense', got {head!r}")
    dense = head == "catalog-dense"
    if packed and not dense:
        raise ValueError("packed=True needs head='catalog-dense': candidate batches need the padded layout")
    if dense:
        model.config.candidate_loss_weight, model.config.catalog_loss_weight = 0.0, 1.0
    if lora_r:
        model = apply_lora(model, lora_r)
    args = TrainingArguments(
        output_dir=str(output / "trainer"), per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
        max_steps=max_steps, learning_rate=learning_rate, warmup_steps=max(1, max_steps // 20), weight_decay=0.01,
        logging_steps=max(1, max_steps // 20), save_steps=save_steps or max(1, max_steps // 4), save_total_limit=2,
        remove_unused_columns=False, label_names=["labels", "catalog_labels"], report_to=[], seed=seed,
        gradient_accumulation_steps=gradient_accumulation_steps, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=False, **training_kwargs,
    )
    mpo_callback = SpeederMPOCallback() if mpo else None
    trainer = Trainer(
        model=model, args=args, train_dataset=dense_training_rows(splits) if dense else splits["train"],
        data_collator=SpeederDataCollator(processor, seed=seed, dense=dense, packed=packed),
        processing_class=processor, compute_metrics=compute_metrics, callbacks=[mpo_callback] if mpo else [],
    )
    checkpoint = None
    if resume:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(args.output_dir) if Path(args.output_dir).exists() else None
        if checkpoint is None:
            logger.warning("--resume: no checkpoint in %s, starting from step 0", args.output_dir)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - start
    if lora_r:
        model.save_pretrained(output / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(output / "model")
    processor.save_pretrained(output / "model")
    report = {"head": head, "train_seconds": round(train_seconds, 1), "steps": trainer.state.global_step,
              "examples_per_second": round(trainer.state.global_step * batch_size * gradient_accumulation_steps / train_seconds, 1),
              "resumed_from": checkpoint, "mpo_transitions": mpo_callback.transitions if mpo else [],
              "log_history": trainer.state.log_history}
    if args.process_index == 0:
        for split in ("validation", "test"):
            report[split] = evaluate_split(model, processor, select(splits[split], eval_rows))
        write_report(output, report)
    return report


def select(data, rows):
    return data if rows is None else data.select(range(min(rows, len(data))))


@torch.inference_mode()
def evaluate_split(model, processor, data, batch_size: int = 64) -> dict:
    """Protocol P metrics (stored candidates, ranked by the head the model was trained with), by history-length
    bucket, the same for each head separately, and protocol R (catalog head, whole catalog, history excluded)."""
    from .training import ranking_metrics

    model.eval()
    model.cache_item_tokens()  # once, not per batch: every batch's catalog scores need all item representations
    scores, catalog_head_scores, labels, ranks, lengths = [], [], [], [], []
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        inputs = processor(histories=rows["history"], candidates=rows["candidates"], targets=rows["target"]).to(model.device)
        out = model(**inputs, return_catalog_scores=True)
        scores.append(out.candidate_scores.float().cpu())
        labels.append(inputs["labels"].cpu())
        catalog = out.catalog_scores.float()
        catalog_head_scores.append(catalog.gather(1, inputs["candidate_item_index"]).cpu())
        targets = inputs["catalog_labels"]
        target_scores = catalog.gather(1, targets[:, None])
        for b, history in enumerate(rows["history"]):
            catalog[b, [processor.item_index(i) for i in history]] = float("-inf")
        catalog.scatter_(1, targets[:, None], target_scores)
        ranks.append(((catalog >= target_scores).sum(1) - 1).cpu())
        lengths += [len(h) for h in rows["history"]]
    labels, ranks, lengths = torch.cat(labels), torch.cat(ranks), torch.tensor(lengths)
    candidate_head_scores, catalog_head_scores = torch.cat(scores), torch.cat(catalog_head_scores)
    scores = catalog_head_scores if model.ranks_candidates_with_catalog_head else candidate_head_scores
    report = ranking_metrics(scores.numpy(), labels.numpy())
    report["head"] = "catalog" if model.ranks_candidates_with_catalog_head else "candidate"
    report["candidate_head"] = ranking_metrics(candidate_head_scores.numpy(), labels.numpy())
    # The candidate protocol scored by the catalog head: dot products with the candidates, none of them in the prompt.
    report["catalog_head"] = ranking_metrics(catalog_head_scores.numpy(), labels.numpy())
    report["full_hr@10"] = float((ranks < 10).float().mean())
    report["full_ndcg@10"] = float(((ranks < 10) / torch.log2(ranks.float() + 2)).mean())
    report["users"] = len(labels)
    report["by_history_length"] = {}
    for low, high in HISTORY_BUCKETS:
        keep = (lengths >= low) & (lengths <= (high or 10**9))
        if keep.any():
            name = f"{low}-{high}" if high else f"{low}+"
            report["by_history_length"][name] = dict(ranking_metrics(scores[keep].numpy(), labels[keep].numpy()),
                                                     users=int(keep.sum()))
    return report


def write_report(output: Path, report: dict):
    """report.json plus PNG plots: metrics by history-length bucket, and the training curve with MPO stages."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: report.json written, plots skipped")
        return
    split = next((k for k in ("test", "validation") if k in report), None)
    if split and report[split].get("by_history_length"):
        buckets = report[split]["by_history_length"]
        fig, ax = plt.subplots(figsize=(7, 4))
        x = range(len(buckets))
        for offset, metric in ((-0.2, "hr@1"), (0.2, "ndcg@10")):
            ax.bar([i + offset for i in x], [b[metric] for b in buckets.values()], width=0.4, label=metric.upper())
        ax.set_xticks(list(x), [f"{k}\n(n={b['users']})" for k, b in buckets.items()])
        ax.set_xlabel("history length (items)")
        ax.set_title(f"Speeder, {split} split, 20 candidates")
        ax.legend()
        fig.tight_layout()
        fig.savefig(output / "metrics_by_history_length.png", dpi=110)
        plt.close(fig)
    history = [h for h in report.get("log_history", []) if "loss" in h and "step" in h]
    if history:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".", label="training loss")
        previous = None
        for h in history:
            if h.get("mpo_stage") is not None and h["mpo_stage"] != previous:
                ax.axvline(h["step"], color="grey", linestyle="--", linewidth=0.8)
                ax.text(h["step"], ax.get_ylim()[1], f" MPO stage {h['mpo_stage']}", va="top", fontsize=8)
                previous = h["mpo_stage"]
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(output / "training_curve.png", dpi=110)
        plt.close(fig)


def sasrec_baseline(splits, item_ids, epochs: int, eval_rows=None, seed=0) -> dict:
    """Train the package's SASRec on each user's training sequence; evaluate on the same stored candidates."""
    from .sasrec import evaluate_sasrec, train_sasrec

    index = {item: row for row, item in enumerate(item_ids)}
    rows = lambda seq: [index[i] for i in seq]  # noqa: E731
    start = time.perf_counter()
    # The validation history of a user is exactly their training sequence (everything before the last two items).
    model = train_sasrec([rows(h) for h in splits["validation"]["history"]], len(item_ids), epochs=epochs, seed=seed)
    seconds = time.perf_counter() - start
    report = {"train_seconds": round(seconds, 1)}
    for split in ("validation", "test"):
        data = splits[split] if eval_rows is None else splits[split].select(range(min(eval_rows, len(splits[split]))))
        report[split] = evaluate_sasrec(model, [rows(h) for h in data["history"]], [index[t] for t in data["target"]],
                                        [rows(c) for c in data["candidates"]])
    return report


def print_metrics_table(rows: dict[str, dict]):
    keys = ["hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr", "valid_ratio"]
    print(f"{'system':<28}" + "".join(f"{k:>10}" for k in keys))
    for name, metrics in rows.items():
        print(f"{name:<28}" + "".join(f"{metrics.get(k, float('nan')):>10.4f}" for k in keys))
