"""Speeder model configuration.

This file is copied next to saved checkpoints as remote code: it imports only installed libraries.
"""

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

# Order of the modality axis everywhere (gate logits, presence masks, MPO stages).
MODALITIES = ("text", "image", "id")

# Options that lost their experiments and were deleted, with the only value a saved config may still hold.
REMOVED_OPTIONS = {"item_residual_embedding": False, "catalog_item_embedding": False, "feature_normalization": "item"}
# Training settings that configs saved before they moved to the training arguments still hold: read and dropped.
MOVED_TO_TRAINING = ("mpo_stages",)  # training.MPOStage, recipes' TrainArguments.mpo_schedule


@strict
class SpeederConfig(PreTrainedConfig):
    r"""
    Configuration of [`SpeederForSequentialRecommendation`]: any decoder LLM (`text_config`) plus the Speeder parts
    (MRC item compression, SPAE positions, candidate and catalog heads).

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from modeling_speeder import SpeederConfig, SpeederForSequentialRecommendation
    >>> config = SpeederConfig(text_config=LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                        intermediate_size=128, vocab_size=300), num_items=100, modality_dims={"text": 32})
    >>> model = SpeederForSequentialRecommendation(config)
    ```
    """

    model_type = "speeder"
    # Trainer.predict / evaluate keep only the candidate scores as "logits".
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["catalog_scores", "query_hidden_state", "catalog_query",
                                                        "hidden_states"]
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None  # the backbone LLM, built with AutoModel.from_config
    # --- catalog and MRC (Mixture of Modality Experts) ---
    num_items: int = 0  # catalog size N: rows of the feature bank
    modality_dims: dict[str, int] | None = None  # feature size per modality, any subset of text/image/id
    learned_id_dim: int = 0  # >0: a learned ID embedding table plays the "id" modality when no CF features exist
    tokens_per_item: int = 1  # K soft tokens per item
    expert_hidden_size: int = 256  # hidden width h of each modality expert MLP
    item_token_rms: float | None = None  # target RMS of item tokens; None = the backbone's initializer_range
    item_dropout: float = 0.0  # dropout on the item tokens of the prompt while training (SASRec's embedding dropout)
    # Share of the catalog head's item vectors computed without their `id` modality while training, so that the head
    # also learns to score an item from its content alone, as it must for an item added after training (add_items).
    catalog_id_dropout: float = 0.0
    catalog_fingerprint: str | None = None  # hash of the processor's item ids, to catch a mismatched catalog
    # --- SPAE ---
    max_history: int = 20  # most recent items kept; recency index r = 0 (last) .. max_history - 1
    use_recency_embeddings: bool = True  # absolute order: learned recency embedding added to history item tokens
    item_level_position_ids: bool = True  # relative order: all K tokens of an item share one position id
    # --- placeholders (set when the tokenizer gets its special tokens) ---
    item_token_id: int | None = None  # placeholder token replaced by an item's soft tokens
    query_token_id: int | None = None  # token whose hidden state queries the catalog head
    # --- heads and losses ---
    candidate_loss_weight: float = 1.0  # cross-entropy over the candidate scores
    catalog_loss_weight: float = 0.0  # cross-entropy over the whole catalog (full softmax)
    catalog_item_bias: bool = False  # a learned per-item bias on catalog-head scores (popularity prior)
    # Catalog-head scores add this weight x the cosine between the frozen text / image content of the query's latest
    # history item and of the scored item (`SpeederForSequentialRecommendation.catalog_query`); 0: none. Chosen on
    # validation after training (`recipes.calibrate_content_affinity`), as a late fusion with a content kNN.
    content_affinity: float = 0.0
    # Which head ranks a candidate set: "candidate" (candidates in the prompt, the linear head on their last states)
    # or "catalog" (query-state dot products with the candidates' item representations, no candidates in the prompt).
    # None: "catalog" for a model trained on the catalog loss alone, else "candidate" (checkpoints before the field).
    candidate_ranking_head: str | None = None
    build_seed: int | None = None  # the seed `build_speeder` drew the new weights with (a rebuild is the same build)
    # --- versioning of the checkpoint layout ---
    speeder_format_version: int = 1

    def __post_init__(self, **kwargs):
        for name, kept in REMOVED_OPTIONS.items():  # configs saved while these options existed
            value = kwargs.pop(name, kept)
            if value != kept:
                raise ValueError(f"This config sets {name}={value!r}, an option removed after it lost its experiment "
                                 f"(bench/earlier-runs.md); only {name}={kept!r} loads: load this checkpoint with speeder 0.1.0")
        for name in MOVED_TO_TRAINING:
            kwargs.pop(name, None)
        if self.modality_dims is None:
            self.modality_dims = {}
        super().__post_init__(**kwargs)
        self._check_values()
        if self.candidate_ranking_head is None:
            catalog_only = not self.candidate_loss_weight and bool(self.catalog_loss_weight)
            self.candidate_ranking_head = "catalog" if catalog_only else "candidate"
        if self.candidate_ranking_head not in ("candidate", "catalog"):
            raise ValueError(f"candidate_ranking_head must be 'candidate' or 'catalog', got {self.candidate_ranking_head!r}")

    def _check_values(self):
        unknown = set(self.modality_dims) - set(MODALITIES)
        if unknown:
            raise ValueError(f"modality_dims has unknown modalities {sorted(unknown)}; expected any of {MODALITIES}")
        if self.learned_id_dim and "id" in self.modality_dims:
            raise ValueError("Give either modality_dims['id'] (collaborative features) or learned_id_dim, not both")
        if self.tokens_per_item < 1:
            raise ValueError(f"tokens_per_item must be >= 1, got {self.tokens_per_item}")
        if not 0.0 <= self.content_affinity < float("inf"):
            raise ValueError(f"content_affinity must be a finite weight >= 0, got {self.content_affinity}")
        for name in ("item_dropout", "catalog_id_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if self.speeder_format_version > 1:
            raise ValueError(
                f"This checkpoint uses Speeder format version {self.speeder_format_version}, but this code reads "
                "version 1. Upgrade the `speeder` package."
            )

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this model has features for, in canonical order."""
        dims = self.feature_dims
        return tuple(m for m in MODALITIES if m in dims)

    @property
    def feature_dims(self) -> dict[str, int]:
        dims = dict(self.modality_dims)
        if self.learned_id_dim:
            dims["id"] = self.learned_id_dim
        return dims


__all__ = ["SpeederConfig", "MODALITIES"]
