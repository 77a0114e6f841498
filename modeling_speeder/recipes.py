"""End-to-end recipes behind the CLI: prepare a dataset, build a model, train with Trainer + MPO, evaluate."""

import json
import logging
import time
from pathlib import Path

import torch

from .conversion.build import build_speeder, make_word_tokenizer
from .conversion.datasets import convert_recbole, convert_unisrec, load_canonical, movielens_100k_path, write_canonical
from .conversion.features import encode_texts
from .processing.collator import SpeederDataCollator
from .processing.processing_speeder import DEFAULT_PROMPT_BRIDGE, DEFAULT_PROMPT_PREFIX
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


def tiny_backbone_config(hidden_size=128, layers=2, heads=4, vocab_size=128):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab_size,
                       max_position_embeddings=1024)


def build_for_dataset(data_dir: Path, backbone=None, tokenizer=None, learned_id_dim=64, **config_kwargs):
    """Model and processor for a canonical dataset folder; a tiny random Llama backbone unless one is given."""
    splits, items, features, presence = load_canonical(data_dir)
    if backbone is None:
        tokenizer = make_word_tokenizer([DEFAULT_PROMPT_PREFIX, DEFAULT_PROMPT_BRIDGE])
        backbone = tiny_backbone_config()
    model, processor = build_speeder(backbone, tokenizer, items["item_id"], features, presence,
                                     item_titles=items["title"], learned_id_dim=learned_id_dim, **config_kwargs)
    return model, processor, splits


def train(model, processor, splits, output: Path, max_steps=300, batch_size=32, learning_rate=1e-3, seed=0,
          eval_rows=None, resume=False, mpo=True, **training_kwargs):
    """Train with `transformers.Trainer` (MPO callback, fresh negatives), evaluate on validation and test."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output / "trainer"), per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
        max_steps=max_steps, learning_rate=learning_rate, warmup_steps=max(1, max_steps // 20), weight_decay=0.01,
        logging_steps=max(1, max_steps // 20), save_steps=max(1, max_steps // 4), save_total_limit=2,
        remove_unused_columns=False, label_names=["labels", "catalog_labels"], report_to=[], seed=seed,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=False, **training_kwargs,
    )
    evaluation = {s: splits[s] if eval_rows is None else splits[s].select(range(min(eval_rows, len(splits[s]))))
                  for s in ("validation", "test")}
    trainer = Trainer(
        model=model, args=args, train_dataset=splits["train"], eval_dataset=evaluation["validation"],
        data_collator=SpeederDataCollator(processor, seed=seed), processing_class=processor,
        compute_metrics=compute_metrics, callbacks=[SpeederMPOCallback()] if mpo else [],
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume or None)
    train_seconds = time.perf_counter() - start
    model.eval()
    report = {"train_seconds": round(train_seconds, 1), "steps": trainer.state.global_step,
              "examples_per_second": round(trainer.state.global_step * batch_size / train_seconds, 1),
              "log_history": trainer.state.log_history}
    for split, data in evaluation.items():
        metrics = trainer.evaluate(data, metric_key_prefix=split)
        report[split] = {k.removeprefix(f"{split}_"): v for k, v in metrics.items()}
    model.save_pretrained(output / "model")
    processor.save_pretrained(output / "model")
    (output / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


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
