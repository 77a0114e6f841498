"""End-to-end recipes behind the CLI: prepare a dataset, build a model, train with Trainer + MPO, evaluate."""

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from transformers import EarlyStoppingCallback, TrainingArguments

from .arguments import BuildArguments, TrainArguments
from .atomic_files import folder_written_atomically, write_text_atomically
from .conversion.build import build_speeder, load_backbone
from .conversion.datasets import (
    convert_recbole,
    convert_s3rec,
    convert_unisrec,
    load_canonical,
    movielens_100k_path,
    write_canonical,
)
from .conversion.features import collaborative_features, encode_texts
from .evaluation import (
    NUM_NEGATIVES,
    full_ranking_metrics,
    popularity_baseline,
    ranking_metrics,
    report_for,
    target_ranks,
    training_item_counts,
    training_windows,
)
from .processing.collator import SpeederDataCollator
from .processing.processing_speeder import catalog_fingerprint
from .recommendation import exclude_history
from .training import (
    DEFAULT_MPO_SCHEDULE,
    MPOStage,
    SpeederMPOCallback,
    SpeederTrainer,
    StopOnNonFiniteLoss,
    compute_metrics,
    last_complete_checkpoint,
    unwrap_speeder,
)

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = {"scientific": ("amazon-scientific-mm", "Scientific.item2index"),
                   "beauty": ("amazon-beauty", "Beauty.txt")}
DATASETS = ("ml-100k", "scientific", "beauty")


def find_shared_dataset(name: str) -> Path | None:
    """The folder of a dataset under ../shared/data next to this checkout (or the working directory), if present."""
    folder, marker = SHARED_DATASETS[name]
    for base in (Path.cwd(), REPO_ROOT):
        path = base.parent / "shared" / "data" / folder
        if (path / marker).exists():
            return path
    return None


def prepare_dataset(name: str, output: Path) -> dict:
    """Convert a known dataset into the canonical folder, with features: 'ml-100k' (from the recbole wheel; MiniLM
    text of title, year and genres), 'scientific' (../shared/data; CLIP text + image from the export) or 'beauty'
    (../shared/data, S3Rec split; MiniLM text of the short title and brand / category attributes)."""
    start = time.perf_counter()
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}: expected one of {DATASETS}")
    source = None if name == "ml-100k" else find_shared_dataset(name)
    if name != "ml-100k" and source is None:
        raise FileNotFoundError(f"../shared/data/{SHARED_DATASETS[name][0]} was not found next to this checkout")
    if name == "scientific":
        splits, items, features = convert_unisrec(source, "Scientific", feature_dims={"text": 512, "image": 512})  # CLIP
    else:
        if name == "ml-100k":
            splits, items = convert_recbole(movielens_100k_path(), "ml-100k")
        else:
            splits, items = convert_s3rec(source, "Beauty")
        texts = [f"{title}. {text}" if text else title for title, text in zip(items["title"], items["text"])]
        text, _ = encode_texts(texts if name == "beauty" else items["text"])
        features = {"text": text}
    stats = write_canonical(output, splits, items, features, source=name)
    stats["seconds"] = round(time.perf_counter() - start, 1)
    return stats


def dataset_summary(data_dir: Path, name: str | None = None) -> dict:
    """The dataset's name and size for reports and model cards, from the canonical folder's stats.json: the name is
    `name`, else the converter and its input (`movielens-100k`, `unisrec:amazon-scientific-mm`), else the folder."""
    path = Path(data_dir) / "stats.json"
    stats = json.loads(path.read_text()) if path.exists() else {}
    converter, _, source = str(stats.get("source") or "").partition(":")
    source = Path(source.rstrip("/")).name
    name = name or (f"{converter}:{source}" if source else converter) or Path(data_dir).resolve().name
    return {"name": name, **{k: v for k, v in stats.items() if k not in ("source", "seconds")}}


def build_for_dataset(data_dir: Path, backbone=None, tokenizer=None, sasrec=None, build: BuildArguments | None = None,
                      seed: int = 0, **config_kwargs):
    """Model and processor for a canonical dataset folder; a tiny random Llama backbone unless one is given. `build`
    (`arguments.BuildArguments`) shapes the model; any of its fields, or another SpeederConfig field, may also be given
    as keywords. sasrec: a SASRec trained on the training split, whose item embeddings become the `id` modality
    (present for items seen in training, and for items with no other feature); without it (and without `id` features
    in the folder) a learned id table of `build.learned_id_dim` plays that role."""
    names = {f.name for f in fields(BuildArguments)}
    build = replace(build or BuildArguments(), **{k: config_kwargs.pop(k) for k in list(config_kwargs) if k in names})
    splits, items, features, presence = load_canonical(data_dir)
    if sasrec is not None:
        index = {item: row for row, item in enumerate(items["item_id"])}
        train_sequences = [[index[i] for i in h] for h in splits["validation"]["history"]]
        # Items never in training get no `id` row, unless they have nothing else (build_speeder keeps theirs then).
        features["id"], presence["id"], _ = collaborative_features(train_sequences, len(index), model=sasrec)
    wanted = set(build.modalities.split(",")) if build.modalities else {"text", "image", "id"}
    features = {m: x for m, x in features.items() if m in wanted}
    presence = {m: x for m, x in presence.items() if m in wanted}
    learned_id_dim = build.learned_id_dim if "id" in wanted and "id" not in features else 0
    if not features and not learned_id_dim:
        raise ValueError(f"{data_dir} has no features of {sorted(wanted)}: run `speeder features` first, or give a "
                         "learned id table (learned_id_dim)")
    if backbone is None:
        backbone, tokenizer = load_backbone("tiny-llama")  # 2 layers, hidden 128, word-level tokenizer
    model, processor = build_speeder(backbone, tokenizer, items["item_id"], features, presence, seed=seed,
                                     learned_id_dim=learned_id_dim, **{**build.config_kwargs(), **config_kwargs})
    return model, processor, splits


def apply_lora(model, r: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """LoRA on the backbone; the MRC experts and gate, SPAE embeddings and heads stay fully trainable."""
    from peft import LoraConfig, get_peft_model

    # Speeder's own modules are fully trained beside the LoRA adapters: the headless model's parts but the backbone,
    # and the heads.
    speeder_parts = [f"model.{name}" for name, _ in model.model.named_children() if name != "backbone"]
    speeder_parts += [name for name, _ in model.named_children() if name != "model"]
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), modules_to_save=speeder_parts)
    return get_peft_model(model, config)


def dense_training_rows(splits, max_history: int, stride: int | None = None):
    """Rows for dense catalog training that cover every training target of every user once per epoch: each user's
    training sequence (the validation history) cut into overlapping windows of at most `max_history` items
    (`training_windows`); `first_labeled` marks where a window's labels start (earlier items are context only), and
    `length` is the history length (for length-grouped batches). Validation and test targets are never in a row."""
    from datasets import Dataset

    rows = {"user_id": [], "history": [], "target": [], "candidates": [], "first_labeled": [], "length": []}
    for user, history in zip(splits["validation"]["user_id"], splits["validation"]["history"]):
        for window, first_labeled in training_windows(history, max_history, stride):
            for key, value in zip(rows, (user, window[:-1], window[-1], [], first_labeled, len(window) - 1)):
                rows[key].append(value)
    return Dataset.from_dict(rows)


def mpo_stages_in_steps(stages: Sequence[MPOStage], stage_steps: int | None) -> list[MPOStage]:
    """MPO stages for a run measured in epochs: every stage but the last lasts `stage_steps`; the last one runs until
    training stops (early stopping), so a ramp there spans its share of the whole epoch budget (with a 30-epoch
    budget, the `id` modality reaches about 70% of the training examples by the usual selected epoch). stage_steps
    None (a fixed `max_steps` budget): the stages keep their shares of it.

    The long ramp measured best: it works as modality dropout on the SASRec `id` features, which the model otherwise
    leans on too hard (they were fitted to the same training targets). On Scientific validation NDCG@10: long ramp
    0.6045, a ramp within one stage 0.5838, that plus explicit `id` dropout 0.3 / 0.5 / 0.7 0.5951 / 0.6005 / 0.6059
    (bench/earlier-runs.md, "Regularisation, the MPO ramp and the `id` modality"; the explicit dropout tied, so it
    was deleted)."""
    if stage_steps is None:
        return list(stages)
    return [replace(stage, steps=stage_steps) for stage in stages[:-1]] + [stages[-1]]


def default_catalog_negatives(num_items: int) -> int:
    """The catalog head's loss by catalog size: the full softmax (0) while it is cheap and exact, the sampled softmax
    with SAMPLED_NEGATIVES draws per batch above SAMPLED_SOFTMAX_FROM items (BENCHMARKS.md, "Catalog size")."""
    return 0 if num_items < SAMPLED_SOFTMAX_FROM else SAMPLED_NEGATIVES


SAMPLED_SOFTMAX_FROM = 10_000
SAMPLED_NEGATIVES = 1024


def check_teacher(teacher, processor):
    """Raise unless `teacher` is a SASRec of this catalog: same class, item count and, where it records one, the
    same item ids in the same order (a teacher of another catalog of the same size would distil noise)."""
    from .sasrec import SASRecModel

    if not isinstance(teacher, SASRecModel) or teacher.config.model_type != "speeder_sasrec":
        raise ValueError(f"The distillation teacher must be the package's SASRecModel, got {type(teacher).__name__} "
                         f"(model_type {getattr(teacher.config, 'model_type', None)!r})")
    if teacher.config.num_items != processor.num_items:
        raise ValueError(f"The teacher was trained on a catalog of {teacher.config.num_items} items, the model has "
                         f"{processor.num_items}: train the teacher on this dataset")
    fingerprint = teacher.config.catalog_fingerprint
    if fingerprint is not None and fingerprint != processor.catalog_fingerprint:
        raise ValueError(f"The teacher's catalog (fingerprint {fingerprint}) differs from the model's "
                         f"({processor.catalog_fingerprint}): same size, other item ids or order")


def train(model, processor, splits, output: Path, settings: TrainArguments | None = None, *, teacher=None,
          dataset: dict | None = None, report_splits=("validation", "test"), **overrides) -> dict:
    """Train with `transformers.Trainer` to convergence, selected on validation, then evaluate `report_splits` (the
    test split is read here, once, after selection). `settings` (`arguments.TrainArguments`, which documents each
    setting) says how; any of its fields, or of `transformers.TrainingArguments`, may also be given as keywords. The
    (merged) best model and the processor go to output/model, report.json and plots to output.

    teacher: a `SASRecModel` of this catalog whose next-item distributions the catalog head is also fitted to
    (`SpeederTrainer`), with weight `settings.distillation_weight`; none without one. dataset: a summary of the data
    (`dataset_summary`) for the report and the model card."""
    names = {f.name for f in fields(TrainArguments)}
    settings = replace(settings or TrainArguments(), **{k: v for k, v in overrides.items() if k in names})
    output = Path(output)
    teacher = checked_teacher(model, processor, settings, teacher)
    set_heads(model, settings.head)
    counts = training_item_counts(splits, {item: row for row, item in enumerate(processor.item_ids)})
    trainer, mpo_callback, divergence = make_trainer(model, processor, splits, output, settings, teacher, counts,
                                                     {k: v for k, v in overrides.items() if k not in names})
    checkpoint = None
    if settings.resume:
        checkpoint = last_complete_checkpoint(trainer.args.output_dir) if Path(trainer.args.output_dir).exists() else None
        if checkpoint is None:
            logger.warning("--resume: no checkpoint in %s, starting from step 0", trainer.args.output_dir)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - start
    model = trainer.model
    if settings.lora_r:
        model.save_pretrained(output / "adapter")
        model = model.merge_and_unload()
    affinity = calibrate_content_affinity(model, processor, select(splits["validation"], settings.selection_rows),
                                          settings.selection_metric)
    model.save_pretrained(output / "model")
    processor.save_pretrained(output / "model")
    report = training_report(trainer, settings, mpo_callback, divergence, train_seconds, checkpoint)
    report["content_affinity"] = {"weight": model.config.content_affinity, "validation": affinity}
    report.update({} if dataset is None else {"dataset": dataset})
    if trainer.args.process_index == 0:
        for split in report_splits:
            report[split] = evaluate_split(model, processor, select(splits[split], settings.eval_rows), counts)
        write_report(output, report)
    return report


def checked_teacher(model, processor, settings: TrainArguments, teacher):
    """The teacher to distil from, or None (no teacher, or weight 0); raises where the settings do not fit together."""
    model.check_processor(processor)
    distill = teacher is not None and settings.distillation_weight > 0
    if distill and settings.head != "catalog-dense":
        raise ValueError(f"Distillation needs head='catalog-dense' (dense batches), got head={settings.head!r}")
    if settings.packed and settings.head != "catalog-dense":
        raise ValueError("packed=True needs head='catalog-dense': candidate batches need the padded layout")
    if distill:
        check_teacher(teacher, processor)
        if teacher.config.max_length < model.config.max_history:
            raise ValueError(f"The teacher reads {teacher.config.max_length} items but the model {model.config.max_history}")
    return teacher if distill else None


def set_heads(model, head: str):
    """The losses and the candidate-ranking head of `head`, in the config the checkpoint is saved with."""
    if head == "catalog-dense":
        model.config.candidate_loss_weight, model.config.catalog_loss_weight = 0.0, 1.0
        model.config.candidate_ranking_head = "catalog"
    else:  # a checkpoint trained on the catalog head alone has weight 0 here: the candidate head would never learn
        model.config.candidate_ranking_head = "candidate"
        model.config.candidate_loss_weight = model.config.candidate_loss_weight or 1.0


def make_trainer(model, processor, splits, output: Path, settings: TrainArguments, teacher, counts,
                 training_kwargs: dict):
    """(SpeederTrainer, MPO callback or None, divergence callback): the training rows, collator, schedule, selection
    and callbacks of `settings`; `counts`: training interactions per item; `training_kwargs` override any
    `TrainingArguments` field."""
    dense = settings.head == "catalog-dense"
    train_rows = dense_training_rows(splits, model.config.max_history) if dense else splits["train"]
    args, mpo_callback = trainer_arguments(model, output, settings, train_rows, training_kwargs)
    selection = select(splits["validation"], settings.selection_rows)
    if args.train_sampling_strategy == "group_by_length":  # the Trainer then groups evaluation batches too: it needs lengths
        selection = selection.add_column("length", [len(h) for h in selection["history"]])
    divergence = StopOnNonFiniteLoss()
    callbacks = [divergence] + ([mpo_callback] if mpo_callback else []) + (
        [EarlyStoppingCallback(settings.patience, settings.early_stopping_threshold)] if settings.patience else [])
    extra_metrics = None
    if settings.selection_metric.startswith("full_"):
        def extra_metrics(trained):  # candidates and the whole catalog (history excluded), one pass
            metrics = evaluate_split(unwrap_speeder(trained), processor, selection)
            return {k: v for k, v in metrics.items() if isinstance(v, float)}
    min_count = settings.distillation_min_count
    catalog_negatives = settings.catalog_negatives
    if catalog_negatives is None:
        catalog_negatives = default_catalog_negatives(model.config.num_items)
    # Each dense row labels its history items from `first_labeled` on (the last one at the query token).
    labels_per_row = float(np.mean(np.array(train_rows["length"]) - np.array(train_rows["first_labeled"]))) if dense else None
    model = apply_lora(model, settings.lora_r) if settings.lora_r else model
    collator = SpeederDataCollator(
        processor, seed=settings.seed, dense=dense, packed=settings.packed, candidates_in_prompt=not dense,
        dense_labels_per_row=labels_per_row, distillation=teacher is not None,
        catalog_negatives=catalog_negatives if dense else 0, item_counts=counts,
        modality_keep_probabilities=mpo_callback.keep_probabilities if mpo_callback else None)
    trainer = SpeederTrainer(
        model=model, args=args, train_dataset=train_rows, eval_dataset=selection, extra_metrics=extra_metrics,
        teacher=teacher, distillation_weight=settings.distillation_weight if teacher is not None else 0.0,
        distillation_items=torch.from_numpy(counts >= min_count) if teacher is not None and min_count else None,
        data_collator=collator, processing_class=processor, compute_metrics=compute_metrics, callbacks=callbacks)
    return trainer, mpo_callback, divergence


def trainer_arguments(model, output: Path, settings: TrainArguments, train_rows, training_kwargs: dict):
    """(TrainingArguments, MPO callback or None) of `settings`: evaluated and checkpointed every epoch (or every
    `save_steps`, or a quarter of a fixed `max_steps` budget), the best checkpoint on `selection_metric` kept."""
    dense = settings.head == "catalog-dense"
    steps_per_epoch = max(1, -(-len(train_rows) // (settings.batch_size * settings.gradient_accumulation_steps)))
    fixed_budget = settings.max_steps is not None
    eval_every = settings.save_steps or (max(1, settings.max_steps // 4) if fixed_budget else steps_per_epoch)
    defaults = dict(
        output_dir=str(output / "trainer"), per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=256, max_steps=settings.max_steps if fixed_budget else -1,
        num_train_epochs=settings.epochs, learning_rate=settings.learning_rate, warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay, logging_steps=max(1, min(eval_every, steps_per_epoch) // 4),
        eval_strategy="steps", eval_steps=eval_every, save_strategy="steps", save_steps=eval_every, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model=settings.selection_metric, greater_is_better=True,
        remove_unused_columns=False, label_names=["labels", "catalog_labels"], report_to=[], seed=settings.seed,
        gradient_accumulation_steps=settings.gradient_accumulation_steps, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
        logging_nan_inf_filter=False,  # a NaN loss must reach the logs (and StopOnNonFiniteLoss), not be averaged away
        # Dense windows vary in length (most Amazon histories are short): batches of similar lengths pad less. Their
        # loss is normalised by a constant (`dense_labels_per_row`), so the objective stays the per-target mean.
        train_sampling_strategy="group_by_length" if dense else "random",
    )
    mpo_callback = None
    if settings.mpo:
        stage_steps = None if fixed_budget else max(1, round(settings.mpo_stage_epochs * steps_per_epoch))
        mpo_callback = SpeederMPOCallback(mpo_stages_in_steps(settings.mpo_schedule or DEFAULT_MPO_SCHEDULE, stage_steps))
        # Select only among checkpoints of the last MPO stage: the served model uses every modality, so a checkpoint
        # trained before a modality was switched on must not win.
        total = settings.max_steps if fixed_budget else int(settings.epochs * steps_per_epoch)
        defaults["eval_delay"] = mpo_callback.plan(model, total)[-1]["start"] + 1
    return TrainingArguments(**{**defaults, **training_kwargs}), mpo_callback


def training_report(trainer, settings: TrainArguments, mpo_callback, divergence, train_seconds: float, resumed_from):
    """What ran: steps, time, selection, the catalog loss, distillation and the MPO schedule as it was applied."""
    state, config = trainer.state, unwrap_speeder(trainer.model).config
    negatives = trainer.data_collator.catalog_negatives
    stages = mpo_callback.plan(trainer.model, state.max_steps) if mpo_callback else []
    return {"head": settings.head, "catalog_items": config.num_items, "train_seconds": round(train_seconds, 1),
            "steps": state.global_step, "epochs": round(state.epoch, 2),
            "training_rows": len(trainer.train_dataset), "best_checkpoint": state.best_model_checkpoint,
            "selection_metric": settings.selection_metric, "best_validation_metric": state.best_metric,
            "examples_per_second": round(state.global_step * settings.batch_size * settings.gradient_accumulation_steps
                                         / train_seconds, 1),
            "catalog_loss": ({"softmax": "sampled", "negatives": negatives} if 0 < negatives < config.num_items
                             else {"softmax": "full"}),
            "early_stopping_threshold": settings.early_stopping_threshold,
            "distillation": {"weight": settings.distillation_weight, "min_count": settings.distillation_min_count}
            if trainer.teacher is not None else None,
            "resumed_from": resumed_from, "mpo_transitions": mpo_callback.transitions if mpo_callback else [],
            "lora_r": settings.lora_r,
            "mpo_schedule": [{"modalities": stage["modalities"], "start": stage["start"],
                              "end": min(stage["end"], state.global_step), "ramp": stage["ramp"],
                              "trainable": stage["trainable"]}
                             for stage in stages if stage["start"] < state.global_step],
            "diverged_at_step": divergence.diverged_at, "log_history": state.log_history}


# The content-affinity weights `calibrate_content_affinity` chooses among (0: none): the demos chose 1.5 (MovieLens-100k)
# and 6 (Scientific); 2 to 3 scored best on Beauty's earlier checkpoint (bench/earlier-runs.md).
CONTENT_AFFINITY_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


@torch.inference_mode()
def calibrate_content_affinity(model, processor, data, metric: str, batch_size: int = 64) -> dict:
    """Choose the trained model's `config.content_affinity` on validation rows `data`: the weight among
    CONTENT_AFFINITY_WEIGHTS whose catalog-head ranking scores best on the selection `metric` (whole catalog with the
    history excluded, or the stored candidates), the smallest on a tie, so 0 unless the affinity helps. Each batch
    is scored once, at weight 1: the affinity is the content half of the query vectors dotted with the items'
    content, and the scores are linear in the weight. Returns {weight: metric value}; a model without text or image
    content keeps 0 and gets {}."""
    model.config.content_affinity = 1.0 if model.mrc.content_modalities else 0.0
    if not model.content_affinity:
        return {}
    model.eval()
    model.model.clear_item_cache()
    model.cache_item_tokens()  # item vectors and content for every batch, once
    content = model.model.item_content().T  # (D, N)
    candidates, ranks, labels = {w: [] for w in CONTENT_AFFINITY_WEIGHTS}, {w: [] for w in CONTENT_AFFINITY_WEIGHTS}, []
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        inputs = processor(histories=rows["history"], candidates=rows["candidates"], targets=rows["target"],
                           candidates_in_prompt=False).to(model.device)
        out = model(**inputs, return_catalog_scores=True)
        affinity = (out.catalog_query[:, -content.shape[0]:] @ content).float()  # (B, N) at weight 1
        histories = [[processor.item_index(i) for i in h] for h in rows["history"]]
        targets, rows_of_candidates = inputs["catalog_labels"], inputs["candidate_item_index"]
        scores = out.catalog_scores.float()  # (B, N)
        excluded = exclude_history(scores.clone(), histories, keep=targets)  # once: -inf stays -inf at every weight
        for weight in CONTENT_AFFINITY_WEIGHTS:
            candidates[weight].append((scores.gather(1, rows_of_candidates)
                                       + (weight - 1.0) * affinity.gather(1, rows_of_candidates)).cpu())
            ranks[weight].append(target_ranks(excluded + (weight - 1.0) * affinity, targets).cpu())
        labels.append(inputs["labels"].cpu())
    measured = {}
    for weight in CONTENT_AFFINITY_WEIGHTS:
        values = {**full_ranking_metrics(torch.cat(ranks[weight])),
                  **ranking_metrics(torch.cat(candidates[weight]).numpy(), torch.cat(labels).numpy())}
        measured[weight] = float(values[metric])
    model.config.content_affinity = max(measured, key=lambda w: (measured[w], -w))
    model.model.clear_item_cache()
    return measured


def select(data, rows):
    return data if rows is None else data.select(range(min(rows, len(data))))


def evaluate_split(model, processor, data, counts=None, batch_size: int = 64) -> dict:
    """Protocol P on the stored candidates, ranked by the model's `candidate_ranking_head`; protocol R (catalog head,
    whole catalog, history excluded, and without exclusion); both by history length and, with training-split item
    `counts`, by target popularity (cold items). A candidate-head model also reports its catalog head on protocol P
    (dot products with the candidates, from the same pass)."""
    scored = score_split(model, processor, data, batch_size)
    if counts is None:
        counts = np.zeros(model.config.num_items, dtype=np.int64)
    report = report_for(scored["candidate_scores"], scored["labels"], scored["ranks"],
                        [len(h) for h in scored["histories"]], scored["targets"], counts, scored["raw_ranks"])
    report["head"] = scored["head"]
    if scored["head"] == "candidate":
        report["catalog_head"] = ranking_metrics(scored["catalog_head_scores"], scored["labels"])
    return report


@torch.inference_mode()
def score_split(model, processor, data, batch_size: int = 64) -> dict:
    """Per user of `data`: the stored candidates' scores (`candidate_scores` (U, C), `labels`), by the model's
    ranking head and by the catalog head, and the target's whole-catalog rank with the history excluded (`ranks`) and
    without (`raw_ranks`), with the users' history and target catalog rows: what `evaluate_split` reports, and what
    a paired comparison of two systems on the same users reads (bench/paired.py)."""
    model.check_processor(processor)
    model.eval()
    model.cache_item_tokens()  # once, not per batch: every batch's catalog scores need all item representations
    in_prompt = not model.ranks_candidates_with_catalog_head
    scores, catalog_head_scores, labels, ranks, raw_ranks, histories, targets = [], [], [], [], [], [], []
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        inputs = processor(histories=rows["history"], candidates=rows["candidates"], targets=rows["target"],
                           candidates_in_prompt=in_prompt).to(model.device)
        out = model(**inputs, return_catalog_scores=True)
        catalog = out.catalog_scores.float()
        scores.append(out.candidate_scores.float().cpu())
        catalog_head_scores.append(catalog.gather(1, inputs["candidate_item_index"]).cpu())
        labels.append(inputs["labels"].cpu())
        history_rows = [[processor.item_index(i) for i in h] for h in rows["history"]]
        raw_ranks.append(target_ranks(catalog, inputs["catalog_labels"]).cpu())
        ranks.append(target_ranks(exclude_history(catalog, history_rows, keep=inputs["catalog_labels"]),
                                  inputs["catalog_labels"]).cpu())
        histories += history_rows
        targets += inputs["catalog_labels"].tolist()
    return {"candidate_scores": torch.cat(scores).numpy(), "labels": torch.cat(labels).numpy(),
            "catalog_head_scores": torch.cat(catalog_head_scores).numpy(), "ranks": torch.cat(ranks),
            "raw_ranks": torch.cat(raw_ranks), "histories": histories, "targets": targets,
            "head": "candidate" if in_prompt else "catalog"}


def write_report(output: Path, report: dict):
    """report.json plus PNG plots: metrics by history-length bucket, and the training curve with MPO stages."""
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: report.json written, plots skipped")
        return
    plot_buckets(plt, output, report)
    plot_training_curve(plt, output, report)


def plot_buckets(plt, output: Path, report: dict):
    """metrics_by_history_length.png: HR@1 by history length and by target popularity, SASRec beside Speeder."""
    split = next((k for k in ("test", "validation") if k in report), None)
    if split and report[split].get("by_history_length"):
        systems = {"Speeder": report[split]}
        if isinstance(report.get("sasrec"), dict) and split in report["sasrec"]:
            systems["SASRec"] = report["sasrec"][split]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [5, 2]})
        for ax, key, xlabel in ((axes[0], "by_history_length", "history length (items)"),
                                (axes[1], "by_target_popularity", "target popularity in training")):
            buckets = report[split].get(key) or {}
            width = 0.8 / len(systems)
            for s_index, (name, metrics) in enumerate(systems.items()):
                values = [metrics.get(key, {}).get(b, {}).get("hr@1", 0.0) for b in buckets]
                ax.bar([i + (s_index - (len(systems) - 1) / 2) * width for i in range(len(buckets))], values, width=width,
                       label=f"{name} HR@1")
            ax.axhline(1 / (1 + NUM_NEGATIVES), color="black", linestyle=":", linewidth=1,
                       label=f"chance (1 of {1 + NUM_NEGATIVES})")
            ax.set_xticks(list(range(len(buckets))), [f"{k}\n(n={b['users']})" for k, b in buckets.items()])
            ax.set_xlabel(xlabel)
        axes[0].set_ylabel("HR@1, 20 candidates")
        axes[0].set_title(f"{split} split")
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
        fig.tight_layout()
        fig.savefig(output / "metrics_by_history_length.png", dpi=110)
        plt.close(fig)


def plot_training_curve(plt, output: Path, report: dict):
    """training_curve.png: the training loss against chance, the MPO transitions and the selection metric."""
    history = [h for h in report.get("log_history", []) if "loss" in h and "step" in h]
    if history:
        fig, ax = plt.subplots(figsize=(8, 4))
        # With distillation the logged loss is the cross-entropy plus weight x KL (>= 0): chance still bounds the former.
        loss_label = "training loss" + (" (cross-entropy + distillation KL)" if report.get("distillation") else "")
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".", label=loss_label)
        # Chance: uniform scores over the catalog (the dense catalog head) or over the 20 candidates.
        choices = report.get("catalog_items") if report.get("head") == "catalog-dense" else 1 + NUM_NEGATIVES
        if choices:
            ax.axhline(np.log(choices), color="black", linestyle=":", linewidth=1, label=f"chance, ln {choices}")
        for step, stage in report.get("mpo_transitions", []):  # the real transitions, not the next logged step
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
            ax.text(step, ax.get_ylim()[1], f" MPO stage {stage}", va="top", ha="right", rotation=90, fontsize=8)
        metric = report.get("selection_metric", "ndcg@10")  # the curve the checkpoint was selected on
        name = f"validation {'full-catalog ' if metric.startswith('full_') else ''}{metric.removeprefix('full_').upper()}"
        evaluations = [h for h in report.get("log_history", []) if f"eval_{metric}" in h]
        if evaluations:
            right = ax.twinx()
            right.plot([h["step"] for h in evaluations], [h[f"eval_{metric}"] for h in evaluations], color="tab:green",
                       marker="o", label=name)
            right.set_ylabel(name)
            right.legend(loc="upper right", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(loc="upper center", fontsize=8)
        fig.tight_layout()
        fig.savefig(output / "training_curve.png", dpi=110)
        plt.close(fig)


def sasrec_baseline(splits, item_ids, epochs: int = 200, eval_rows=None, seed=0, patience: int = 10, selection_rows=None,
                    **sasrec_kwargs):
    """Train the package's SASRec on every training target of every user, select the epoch on validation (full-catalog
    NDCG@10, early stopping), and evaluate both splits on the same stored candidates and buckets as Speeder.
    Returns (report, model): the model's item embeddings can serve as Speeder's collaborative (`id`) features."""
    from .sasrec import evaluate_sasrec, train_sasrec

    index = {item: row for row, item in enumerate(item_ids)}
    rows = lambda seq: [index[i] for i in seq]  # noqa: E731
    counts = training_item_counts(splits, index)
    data = {split: select(splits[split], eval_rows) for split in ("validation", "test")}
    start = time.perf_counter()
    # The validation history of a user is exactly their training sequence (everything before the last two items).
    selection = select(splits["validation"], selection_rows)  # the users scored after every epoch (all by default)
    validation = ([rows(h) for h in selection["history"]], rows(selection["target"]))
    model = train_sasrec([rows(h) for h in splits["validation"]["history"]], len(item_ids), epochs=epochs, seed=seed,
                         validation=validation, patience=patience, **sasrec_kwargs)
    model.config.catalog_fingerprint = catalog_fingerprint(item_ids)
    report = {"train_seconds": round(time.perf_counter() - start, 1), "training": model.training_record}
    for split in ("validation", "test"):
        report[split] = evaluate_sasrec(model, [rows(h) for h in data[split]["history"]], rows(data[split]["target"]),
                                        [rows(c) for c in data[split]["candidates"]], counts=counts)
    return report, model


def cached_sasrec_baseline(cache: Path, key: dict, splits, item_ids, **kwargs):
    """`sasrec_baseline`, trained once per `key` (the data and settings it depends on) and kept in the folder `cache`
    (weights, report and key, written atomically): a rerun with the same key loads it instead of training again.
    Returns (report, model, cached)."""
    from .sasrec import SASRecModel

    cache = Path(cache)
    saved_key = cache / "cache_key.json"
    if saved_key.exists() and json.loads(saved_key.read_text(encoding="utf-8")) == key:
        report = json.loads((cache / "report.json").read_text(encoding="utf-8"))
        return report, SASRecModel.from_pretrained(cache, use_safetensors=True).eval(), True
    report, model = sasrec_baseline(splits, item_ids, **kwargs)
    with folder_written_atomically(cache) as tmp:
        model.save_pretrained(tmp)
        (tmp / "report.json").write_text(json.dumps(report, default=str) + "\n", encoding="utf-8")
        (tmp / "cache_key.json").write_text(json.dumps(key) + "\n", encoding="utf-8")
    return report, model, False


def popularity_report(splits, item_ids, eval_rows=None) -> dict:
    """The popularity baseline (training-split counts) on both splits, same candidates and buckets."""
    index = {item: row for row, item in enumerate(item_ids)}
    return {split: popularity_baseline(splits, index, select(splits[split], eval_rows)) for split in ("validation", "test")}


def print_metrics_table(rows: dict[str, dict]):
    """One line per system: protocol P (20 candidates), protocol R (full catalog, history excluded) and the cold-item
    bucket (targets with at most 5 training interactions), where the report has them."""
    columns = [("HR@1", ("hr@1",)), ("NDCG@10", ("ndcg@10",)), ("MRR", ("mrr",)), ("full HR@10", ("full_hr@10",)),
               ("full NDCG@10", ("full_ndcg@10",)), ("cold HR@1", ("by_target_popularity", "cold", "hr@1")),
               ("cold NDCG@10", ("by_target_popularity", "cold", "ndcg@10"))]
    print(f"{'system':<24}" + "".join(f"{name:>14}" for name, _ in columns))
    for name, metrics in rows.items():
        values = []
        for _, path in columns:
            value = metrics
            for key in path:
                value = value.get(key, {}) if isinstance(value, dict) else {}
            values.append(f"{value:>14.4f}" if isinstance(value, float) else f"{'-':>14}")
        print(f"{name:<24}" + "".join(values))
