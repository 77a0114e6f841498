"""Speeder: a fast multimodal-LLM sequential recommender (arXiv 2511.05885, our reconstruction: DESIGN.md).

One model in one file. The backbone is an unmodified `AutoModel.from_config(config.text_config)`; the new neural
code is the MRC module (Mixture of Modality Experts), the SPAE recency embedding and two small heads. Masks,
caches and attention kernels come from Transformers. This file is copied next to saved checkpoints as remote
code: it imports only installed libraries and its siblings `.configuration_speeder`, `.recommendation` (ranking for
`recommend`) and `.atomic_files` (the atomic save), which travel with it.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.core_model_loading import WeightRenaming
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    causal_mask_function,
    or_masks,
    packed_sequence_mask_function,
    padding_mask_function,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs

from .atomic_files import copy_entry, folder_written_atomically
from .configuration_speeder import SpeederConfig
from .recommendation import check_processor, recommend


def candidate_isolation_mask_function(segment_ids: torch.Tensor):
    """Mask rule: a token sees the shared prompt (segment 0) and its own candidate's tokens, never other candidates.

    segment_ids: (B, T), 0 for the shared prompt, c + 1 for the tokens of candidate c. Combined with the causal rule
    by `create_causal_mask`, so it works for every mask format (eager float, sdpa bool, flex BlockMask).
    """

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        kv_segment = segment_ids[batch_idx, kv_idx]
        return (kv_segment == 0) | (kv_segment == segment_ids[batch_idx, q_idx])

    return inner_mask


def diagonal_mask_function(batch_idx, head_idx, q_idx, kv_idx):
    """Mask rule: every token sees itself."""
    return q_idx == kv_idx


def candidate_sliding_window_mask_function(virtual_index: torch.Tensor, sliding_window: int):
    """Sliding-window rule measured as if every candidate sat right after the query token.

    virtual_index: (B, T), the token index for the shared prompt and query index + 1 + offset for candidate tokens.
    Measuring on real indices would show later candidates less of the prompt and break the set semantics (and the
    equality with the prefix-cache path, where each candidate is a continuation of the same cache).
    """

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return virtual_index[batch_idx, kv_idx] > virtual_index[batch_idx, q_idx] - sliding_window

    return inner_mask


def zero_at_build(table: nn.Embedding) -> nn.Embedding:
    """Mark a table that must start at zero (an additive correction such as a bias). `_init_weights` zeroes it
    when it visits the table itself: a parent's zeroing would come too late, since transformers initialises each
    parameter once and visits children before their parent."""
    table.zero_at_build = True
    return table


def append_rows(table: nn.Embedding, rows: torch.Tensor):
    """Grow an embedding table by `rows` (n, d), in place, keeping its device, dtype and trainability."""
    weight = table.weight
    table.weight = nn.Parameter(torch.cat([weight.detach(), rows.to(weight.device, weight.dtype)]),
                                requires_grad=weight.requires_grad)
    table.num_embeddings = table.weight.shape[0]


def check_feature_bank(features: dict[str, torch.Tensor], presence: torch.Tensor, modalities: Sequence[str],
                       absent_rows_too: bool = False):
    """Raise unless every present feature row is finite and every item has a modality present: a NaN row, or an
    item with nothing present, would make that item everyone's top recommendation or a NaN score. With
    `absent_rows_too` (a stored bank, whose absent rows are zero), every row: NaN times a zero presence is NaN.
    features[m]: (N, d_m); presence: (N, M) bool in `modalities` order."""
    for m, x in features.items():
        checked = True if absent_rows_too else presence[:, modalities.index(m)]
        bad = (~torch.isfinite(x).all(-1) & checked).nonzero().flatten()
        if len(bad):
            raise ValueError(f"Features '{m}' hold NaN or inf in rows {bad[:10].tolist()} (of {len(bad)} rows)")
    empty = (~presence.any(-1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"Items {empty[:10].tolist()} have no modality present; every item needs at least one")


def content_vectors(features: dict[str, torch.Tensor], presence: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, D) each item's frozen content: every modality's features L2-normalised (zero where absent), concatenated and
    normalised again, so the dot product of two items is the cosine of their content, every modality weighing alike."""
    parts = [F.normalize(x.float(), dim=-1) * presence.get(m, torch.ones(len(x), dtype=torch.bool, device=x.device))[:, None]
             for m, x in sorted(features.items())]
    return F.normalize(torch.cat(parts, dim=-1), dim=-1)


# The files save_pretrained writes for the weights: a previous save's are not carried over (a user's other files are).
WEIGHTS_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


@dataclass
class SpeederModelOutput(ModelOutput):
    """
    last_hidden_state: (B, T, H) backbone output over the prompt (None on the prefix-cache candidate path).
    query_hidden_state: (B, H) the query token's state; (S, H), one per sequence, when packed.
    candidate_hidden_states: (B, C, H) each candidate's last token's state, when candidates are in the prompt.
    hidden_states: backbone hidden states (embeddings, then each layer), when asked for.
    attentions: backbone attention weights per layer, when asked for (eager attention computes them).
    """

    last_hidden_state: torch.FloatTensor | None = None
    query_hidden_state: torch.FloatTensor | None = None
    candidate_hidden_states: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SpeederRecommendationOutput(ModelOutput):
    """
    loss: weighted sum of the candidate and catalog cross-entropies, when labels are given.
    candidate_scores: (B, C) one score per candidate, from one forward pass.
    catalog_scores: (B, N) query-to-item scores over the whole catalog, when asked for.
    query_hidden_state: (B, H) hidden state of the query token (input of the catalog head).
    catalog_query: (B, H [+ D]) the catalog head's query vectors (`catalog_query`): with `catalog_item_vectors` and
        the per-item bias, what an approximate-nearest-neighbour index of the catalog serves.
    hidden_states: backbone hidden states (embeddings, then each layer), when asked for.
    attentions: backbone attention weights per layer, when asked for (eager attention computes them).
    dense_catalog_scores: (n_labelled, N) with `dense_catalog_labels`, the catalog scores of the labelled positions in
        row-major order (under torch.compile every position's, (B * T, N)); a distillation loss reads them.
    """

    loss: torch.FloatTensor | None = None
    candidate_scores: torch.FloatTensor | None = None
    catalog_scores: torch.FloatTensor | None = None
    query_hidden_state: torch.FloatTensor | None = None
    catalog_query: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    dense_catalog_scores: torch.FloatTensor | None = None


class SpeederModalityExperts(nn.Module):
    """MRC: compresses each item's text / image / id features into K soft tokens in the LLM embedding space.

    Holds the catalog's feature bank as persistent buffers, so a checkpoint alone can recommend.
    """

    def __init__(self, config: SpeederConfig):
        super().__init__()
        hidden_size, k = config.text_config.hidden_size, config.tokens_per_item
        dims = config.feature_dims
        self.modalities = config.modalities
        self.content_modalities = [m for m in self.modalities if m != "id"]  # what the content affinity compares
        self.tokens_per_item, self.hidden_size = k, hidden_size
        self.experts = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.LayerNorm(dims[m]),  # features come unnormalised from frozen encoders
                    nn.Linear(dims[m], config.expert_hidden_size),
                    nn.GELU(),
                    nn.Linear(config.expert_hidden_size, k * hidden_size),
                )
                for m in self.modalities
            }
        )
        self.gate = nn.Linear(sum(dims[m] for m in self.modalities), len(self.modalities))
        # Soft tokens far off the scale of real token embeddings destabilise training: RMS-normalise them with a
        # gain initialised to the embeddings' typical RMS (see _init_weights).
        self.token_gain = nn.Parameter(torch.ones(hidden_size))
        for m in self.modalities:
            if m == "id" and config.learned_id_dim:
                continue
            self.register_buffer(f"features_{m}", torch.zeros(config.num_items, dims[m]))
        self.id_embedding = nn.Embedding(config.num_items, config.learned_id_dim) if config.learned_id_dim else None
        self.register_buffer("presence", torch.ones(config.num_items, len(self.modalities), dtype=torch.bool))

    def features(self, modality: str, rows: torch.Tensor) -> torch.Tensor:
        if modality == "id" and self.id_embedding is not None:
            return self.id_embedding(rows)
        return getattr(self, f"features_{modality}")[rows]

    def content(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, D) the frozen text / image content of catalog `rows` (`content_vectors`), as the bank stores it."""
        return content_vectors({m: self.features(m, rows) for m in self.content_modalities},
                               {m: self.presence[rows, self.modalities.index(m)] for m in self.content_modalities})

    def forward(self, rows: torch.Tensor, active: torch.Tensor, hidden: torch.Tensor | None = None):
        """rows: (n,) catalog indices; active: (n, M) or (M,) bool, the modalities MPO lets through; hidden: (n, M)
        bool, modalities treated as absent for these rows (as for an item that has no such features).
        Returns tokens (n, K, H) and gate weights (n, M)."""
        present = self.presence[rows] if hidden is None else self.presence[rows] & ~hidden  # (n, M)
        normed = [
            self.experts[m][0](self.features(m, rows)) * present[:, j, None] for j, m in enumerate(self.modalities)
        ]  # M x (n, d_m); absent features are zeroed so they cannot leak through the gate
        allowed = present & active
        # An item with none of the active modalities (say, no text during the text stage) falls back to what it has.
        allowed = torch.where(allowed.any(-1, keepdim=True), allowed, present)
        logits = self.gate(torch.cat(normed, dim=-1)).masked_fill(~allowed, float("-inf"))
        weights = logits.softmax(-1)  # (n, M)
        expert_out = torch.stack(
            [self.experts[m][1:](x) for m, x in zip(self.modalities, normed)], dim=1
        )  # (n, M, K*H)
        tokens = (weights.unsqueeze(-1) * expert_out).sum(1).view(-1, self.tokens_per_item, self.hidden_size)
        tokens = F.rms_norm(tokens, (self.hidden_size,), self.token_gain, eps=1e-6)
        return tokens, weights


class SpeederPreTrainedModel(PreTrainedModel):
    config: SpeederConfig
    config_class = SpeederConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The loss is a per-batch mean cross-entropy: the Trainer scales it for gradient accumulation itself.
    accepts_loss_kwargs = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """PreTrainedModel.from_pretrained, safetensors only (a pickle-based `.bin` is refused, never unpickled), and
        refusing a folder that holds no Speeder config instead of building a default multi-billion-parameter
        backbone. Checkpoints saved before the headless `SpeederModel` existed (weights `backbone.*`, `mrc.*`,
        `recency_embedding.*` at the top level) load through `LEGACY_KEY_MAPPING`."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("Speeder loads safetensors weights only: use_safetensors=False is not supported")
        kwargs["use_safetensors"] = True
        local = Path(pretrained_model_name_or_path) if pretrained_model_name_or_path is not None else None
        config_file = local / "config.json" if local is not None else None
        # Also when AutoModel passes the config it already loaded: one without text_config would build a default
        # backbone and fail after a long table of mismatched weights.
        if local is not None and local.is_dir():
            if not config_file.exists():
                raise OSError(f"{str(pretrained_model_name_or_path)!r} is not a Speeder checkpoint: it has no config.json")
            import json

            found = json.loads(config_file.read_text(encoding="utf-8"))
            if found.get("model_type") != "speeder" or not found.get("text_config"):
                raise ValueError(
                    f"{config_file} is not a Speeder config (model_type {found.get('model_type')!r}"
                    f"{', no text_config' if not found.get('text_config') else ''}): build a Speeder checkpoint from this "
                    "backbone with `speeder build` (or conversion.build.build_speeder) first"
                )
        kwargs.setdefault("key_mapping", LEGACY_KEY_MAPPING)  # renames nothing in a checkpoint of today's names
        wants_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except SafetensorError as err:
            raise OSError(
                f"Cannot load the Speeder checkpoint {str(pretrained_model_name_or_path)!r}: a safetensors weights file is "
                f"corrupt or truncated ({err}). Re-download it or save the model again."
            ) from err
        # Saved again, the model writes today's names (save_pretrained would otherwise undo a legacy renaming).
        model._weight_conversions = [t for t in getattr(model, "_weight_conversions", None) or []
                                     if not (isinstance(t, WeightRenaming) and t.source_patterns[0] in LEGACY_KEY_MAPPING)]
        # The feature bank is the catalog: a missing tensor would be uninitialised memory, not a default.
        missing_bank = [k for k in info["missing_keys"] if "mrc.features_" in k or k.endswith("mrc.presence")]
        if missing_bank:
            raise OSError(f"The Speeder checkpoint {str(pretrained_model_name_or_path)!r} lacks its feature bank tensors "
                          f"{sorted(missing_bank)}: the weights file is incomplete. Save the model again.")
        mrc = model.mrc
        stored = {m: getattr(mrc, f"features_{m}") for m in mrc.modalities if hasattr(mrc, f"features_{m}")}
        try:
            check_feature_bank(stored, mrc.presence, mrc.modalities, absent_rows_too=True)
        except ValueError as err:
            raise ValueError(f"The Speeder checkpoint {str(pretrained_model_name_or_path)!r} has a corrupt feature "
                             f"bank: {err}") from err
        return (model, info) if wants_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Like PreTrainedModel.save_pretrained, but atomic: the files are written to a sibling temporary folder that
        then replaces `save_directory`, so an interrupted save leaves the previous checkpoint loadable. Files the
        model does not write (processor, tokenizer, model card) are carried over from the previous folder."""
        final = Path(save_directory)
        if final.is_symlink():  # save into the folder the link points to; the link stays
            final = final.resolve()
        if kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, *args, **kwargs)
        if final.exists() and not final.is_dir():
            raise FileExistsError(f"{final} exists and is not a folder: cannot save a checkpoint there")
        with folder_written_atomically(final) as tmp:
            super().save_pretrained(tmp, *args, **kwargs)
            for old_file in final.iterdir() if final.exists() else []:
                if not (tmp / old_file.name).exists() and not WEIGHTS_FILE.fullmatch(old_file.name):
                    copy_entry(old_file, tmp / old_file.name)

    def _init_weights(self, module):
        if getattr(module, "zero_at_build", False):
            init.zeros_(module.weight)
            return
        super()._init_weights(module)
        if isinstance(module, SpeederModalityExperts):
            rms = self.config.item_token_rms or self.config.text_config.initializer_range
            init.constant_(module.token_gain, rms)
            for name, buffer in module.named_buffers(recurse=False):
                if name.startswith("features_"):  # the bank is filled by set_item_features
                    init.zeros_(buffer)
                elif name == "presence":
                    init.ones_(buffer)
        elif isinstance(module, SpeederModel):
            # Not saved, so from_pretrained (which builds on the meta device) only gets it from here.
            init.ones_(module.modality_keep_prob)
            if module.recency_embedding is not None:
                # Small, so a pretrained backbone first sees item tokens almost unperturbed.
                init.normal_(module.recency_embedding.weight, std=self.config.text_config.initializer_range)


# Weight names of checkpoints saved before the headless SpeederModel split (commit 8b1321b and earlier).
LEGACY_KEY_MAPPING = {r"^backbone\.": "model.backbone.", r"^mrc\.": "model.mrc.",
                      r"^recency_embedding\.": "model.recency_embedding."}
# The backbone keyword arguments a caller may add (FlashAttention's varlen boundaries, ...); anything else is a typo.
BACKBONE_KWARGS = (TransformersKwargs.__required_keys__ | TransformersKwargs.__optional_keys__) - {
    "position_ids", "output_attentions", "output_hidden_states"}
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
CANDIDATE_TOKEN_TYPE = 2  # in the processor's `mm_token_type_ids` (its TOKEN_TYPES: text, history item, candidate)


def _check_layout(input_ids, attention_mask, position_ids, item_token_index, recency_index, mm_token_type_ids,
                  query_index, candidate_token_index, candidate_segment_ids, cu_seq_lens_q):
    """Raise unless the inputs state the processor's whole layout, consistently (shapes only: no device sync)."""
    per_token = {"position_ids": position_ids, "item_token_index": item_token_index, "recency_index": recency_index,
                 "mm_token_type_ids": mm_token_type_ids}
    missing = [name for name, value in (*per_token.items(), ("query_index", query_index)) if value is None]
    if missing:
        raise ValueError(f"Speeder's forward needs the processor's layout, missing {missing}: pass the whole output of "
                         "SpeederProcessor")
    if input_ids.shape != attention_mask.shape or any(value.shape != input_ids.shape for value in per_token.values()):
        raise ValueError(f"input_ids, attention_mask and {', '.join(per_token)} must have the same (B, T) shape")
    in_prompt = candidate_token_index is not None
    if in_prompt and candidate_segment_ids is None:
        raise ValueError("candidate_token_index needs candidate_segment_ids: pass the processor's whole output")
    if cu_seq_lens_q is not None and (input_ids.shape[0] != 1 or in_prompt):
        raise ValueError(
            f"Packed inputs are one row of catalog-head sequences, got {input_ids.shape[0]} rows and "
            f"{candidate_token_index.shape[1] if in_prompt else 0} candidates in the prompt: candidates need the "
            "padded layout (their isolation mask)"
        )
    if cu_seq_lens_q is not None and cu_seq_lens_q.shape[0] != query_index.shape[0] + 1:
        raise ValueError(f"cu_seq_lens_q has {cu_seq_lens_q.shape[0]} boundaries for {query_index.shape[0]} packed "
                         "sequences: pass the processor's whole output")


def _examples(input_ids, query_index, cu_seq_lens_q=None):
    """(the example each token belongs to (B, T): its row, or its sequence in a packed row; the row of each query)."""
    batch_size, seq_len = input_ids.shape
    if cu_seq_lens_q is None:
        rows = torch.arange(batch_size, device=input_ids.device)
        return rows[:, None].expand(-1, seq_len), rows
    sequences = torch.arange(len(query_index), device=input_ids.device)
    return torch.repeat_interleave(sequences, cu_seq_lens_q.diff().long())[None], torch.zeros_like(query_index)


def _check_backbone_kwargs(kwargs: dict):
    unknown = set(kwargs) - BACKBONE_KWARGS
    if unknown:
        raise TypeError(f"Speeder's forward got unexpected arguments {sorted(unknown)}; besides its own it takes the "
                        f"backbone's {sorted(BACKBONE_KWARGS)}")


class SpeederModel(SpeederPreTrainedModel):
    """The headless Speeder (Llava's `LlavaModel`): the MRC item tokens scattered into the prompt embeddings, SPAE,
    Speeder's attention masks, and the unmodified backbone. Returns hidden states; heads and losses are
    `SpeederForSequentialRecommendation`'s.

    Prompt (built by `SpeederProcessor`): [prefix text] [item_1] ... [item_L] [bridge text] [query] [cand_1] ... [cand_C].
    Each candidate sees the shared prompt and itself only, and all candidates share one position id, so their states
    are permutation-equivariant.
    """

    def __init__(self, config: SpeederConfig):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        self.backbone = AutoModel.from_config(config.text_config)
        self.mrc = SpeederModalityExperts(config)
        # SPAE absolute order: rows 0..max_history-1 are recencies (0 = most recent), the last row marks candidates.
        self.recency_embedding = (
            nn.Embedding(config.max_history + 1, hidden_size) if config.use_recency_embeddings else None
        )
        # MPO: the probability that each modality is let through the gate for a training example (1 = on, 0 = off,
        # in between = ramping in). Not saved: the schedule lives in the config and the stage follows global_step.
        self.register_buffer("modality_keep_prob", torch.ones(len(self.mrc.modalities)), persistent=False)
        self._item_cache = None  # (N, K, H) item tokens for inference, built by cache_item_tokens()
        self._item_repr_cache = None  # (N, H) their catalog-head representations
        self._item_content_cache = None  # (N, D) their frozen content, with config.content_affinity
        self._item_cache_key = None  # the state of the weights the cache was computed from
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    # ----- item feature bank and item cache -----

    def _checked_bank_rows(self, features: dict[str, torch.Tensor], presence: dict[str, torch.Tensor] | None, n: int,
                           id_present: torch.Tensor | None = None):
        """(features, presence (n, M)) of n catalog rows, checked before anything changes: features[m] (n, d_m) of
        stored modalities, zeros for one not given; presence[m] (n,) bool, by default True where features are given
        and True only there; absent rows zeroed. `id_present` (n,): the learned id table's presence column."""
        stored = [m for m in self.mrc.modalities if not (m == "id" and self.mrc.id_embedding is not None)]
        if set(features) - set(stored):
            raise ValueError(f"Features of some of {stored} expected (the stored modalities); got {sorted(features)}")
        rows, new_presence = {}, torch.zeros(n, len(self.mrc.modalities), dtype=torch.bool)
        if id_present is not None:
            new_presence[:, self.mrc.modalities.index("id")] = id_present
        for m in stored:
            expected = (n, self.config.feature_dims[m])
            x = torch.as_tensor(features[m], dtype=torch.float32) if m in features else torch.zeros(expected)
            if tuple(x.shape) != expected:
                raise ValueError(f"Features '{m}' have shape {tuple(x.shape)}; this checkpoint expects {expected}")
            mask = torch.as_tensor((presence or {}).get(m, torch.full((n,), m in features)), dtype=torch.bool)
            if mask.shape != (n,) or (m not in features and mask.any()):
                raise ValueError(f"Presence '{m}' has shape {tuple(mask.shape)}, expected ({n},), and can be True only "
                                 "where features are given")
            rows[m], new_presence[:, self.mrc.modalities.index(m)] = torch.where(mask[:, None], x, 0.0), mask
        check_feature_bank(rows, new_presence, self.mrc.modalities)
        return rows, new_presence

    def set_item_features(self, features: dict[str, torch.Tensor], presence: dict[str, torch.Tensor] | None = None):
        """Fill the feature bank. features[m]: (N, d_m) for every stored modality; presence[m]: (N,) bool, False
        where an item lacks m."""
        learned_id = self.mrc.id_embedding is not None
        missing = [m for m in self.mrc.modalities if m not in features and not (m == "id" and learned_id)]
        if missing:
            raise ValueError(f"Features of every stored modality expected; missing {missing}")
        id_present = self.mrc.presence[:, self.mrc.modalities.index("id")] if learned_id else None
        features, new_presence = self._checked_bank_rows(features, presence, self.config.num_items, id_present)
        for m, x in features.items():
            getattr(self.mrc, f"features_{m}").copy_(x)
        self.mrc.presence.copy_(new_presence)
        self.clear_item_cache()

    def add_items(self, features: dict[str, torch.Tensor], presence: dict[str, torch.Tensor] | None = None) -> int:
        """Append n items to the catalog (rows N .. N + n - 1), scored from their content with no retraining.
        features[m]: (n, d_m) for any of the model's stored modalities; a modality not given is absent for the new
        items (a new item has no interactions, so no `id` features); presence[m]: (n,) bool, False where an item lacks
        m. Everything is checked before anything changes. Returns n."""
        if not features:
            raise ValueError("New items need features of some of the stored modalities; got none")
        n = len(next(iter(features.values())))
        new_features, new_presence = self._checked_bank_rows(features, presence, n)
        for m, x in new_features.items():
            bank = getattr(self.mrc, f"features_{m}")
            self.mrc.register_buffer(f"features_{m}", torch.cat([bank, x.to(bank.device, bank.dtype)]))
        self.mrc.register_buffer("presence", torch.cat([self.mrc.presence, new_presence.to(self.mrc.presence.device)]))
        if self.mrc.id_embedding is not None:  # rows for the new items, never let through (their presence is False)
            append_rows(self.mrc.id_embedding, torch.zeros(n, self.config.learned_id_dim))
        self.config.num_items += n
        self.clear_item_cache()
        return n

    @property
    def active_modalities(self) -> torch.Tensor:
        """(M,) bool: the modalities the gate may use at inference (any with a keep probability above 0)."""
        return self.modality_keep_prob > 0

    def set_active_modalities(self, modalities: Sequence[str] | dict[str, float]):
        """Restrict the MRC gate (MPO stages): a list of modalities, or {modality: keep probability} for ramps."""
        probs = modalities if isinstance(modalities, dict) else {m: 1.0 for m in modalities}
        unknown = set(probs) - set(self.mrc.modalities)
        if unknown:
            raise ValueError(f"Unknown modalities {sorted(unknown)}; this model has {self.mrc.modalities}")
        if not any(probs.values()):
            raise ValueError("At least one modality must stay active")
        self.modality_keep_prob.copy_(torch.tensor([float(probs.get(m, 0.0)) for m in self.mrc.modalities]))
        self.clear_item_cache()

    @torch.no_grad()
    def cache_item_tokens(self, chunk_size: int = 65536) -> torch.Tensor:
        """Encode every catalog item once; afterwards an item costs a lookup. Cleared by train() and weight setters."""
        rows = torch.arange(self.config.num_items, device=self.device)
        self._item_cache = torch.cat([self.mrc(r, self.active_modalities)[0] for r in rows.split(chunk_size)])
        # Scored by the catalog head; a view when K = 1, computed once otherwise (not per call: (N, H) is large).
        self._item_repr_cache = self._item_cache[:, 0] if self.config.tokens_per_item == 1 else self._item_cache.mean(1)
        if self.config.content_affinity:
            self._item_content_cache = torch.cat([self.mrc.content(r) for r in rows.split(chunk_size)])
        self._item_cache_key = (*self._item_weights_key(), self._mrc_checksum())
        return self._item_cache

    def clear_item_cache(self):
        self._item_cache = self._item_repr_cache = self._item_content_cache = self._item_cache_key = None

    def _item_weights_key(self) -> tuple:
        """Storage, version counter and dtype of every tensor the item tokens depend on: any in-place update
        (optimizer step, load_state_dict, set_item_features) bumps a version, and `.to(...)` changes storage or dtype."""
        tensors = [*self.mrc.parameters(), *self.mrc.buffers(), self.modality_keep_prob]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    @torch.no_grad()
    def _mrc_checksum(self) -> float:
        """A sum of the MRC parameters: an edit through `.data` (the EMA idiom) bumps no version counter. A host
        synchronisation, so only `recommend()` asks for it, never the forward (the feature bank is not summed: it is
        large, and set_item_features / add_items clear the cache themselves)."""
        return float(sum(p.double().sum() for p in self.mrc.parameters()))

    def item_cache_is_current(self, check_contents: bool = False) -> bool:
        """True when a cache exists and the weights, device and dtype it was computed from are unchanged; with
        `check_contents`, also their values (edits through `.data`)."""
        if self._item_cache is None:
            return False
        if self._item_cache_key != (*self._item_weights_key(), self._item_cache_key[-1]) or (
                check_contents and self._item_cache_key[-1] != self._mrc_checksum()):
            self.clear_item_cache()
            return False
        return True

    def train(self, mode: bool = True):
        if mode:  # weights may change from here on; eval() keeps the cache (recommend() calls it every time)
            self.clear_item_cache()
        return super().train(mode)

    def item_representations(self, item_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H) the vector each catalog item is scored with by the catalog head: the mean of its K tokens; for the
        catalog rows `item_rows` only (any shape, (*shape, H)), so a sampled-softmax step runs the experts on the
        items it touches, not on the catalog."""
        if not self.training and self.item_cache_is_current():
            return self._item_repr_cache if item_rows is None else self._item_repr_cache[item_rows]
        rows = torch.arange(self.config.num_items, device=self.device) if item_rows is None else item_rows.flatten()
        hidden = None
        if self.training and self.config.catalog_id_dropout and "id" in self.mrc.modalities:
            # Some items scored as a new item is, from their content with no `id`, so the head learns to score those.
            j = self.mrc.modalities.index("id")
            has_content = self.mrc.presence[rows][:, [i for i in range(len(self.mrc.modalities)) if i != j]].any(-1)
            hidden = torch.zeros(len(rows), len(self.mrc.modalities), dtype=torch.bool, device=rows.device)
            hidden[:, j] = has_content & (torch.rand(len(rows), device=rows.device) < self.config.catalog_id_dropout)
        vectors = self.mrc(rows, self.active_modalities, hidden)[0].mean(1)  # (rows, H)
        return vectors if item_rows is None else vectors.view(*item_rows.shape, -1)

    def item_content(self, item_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) every catalog item's frozen content (`SpeederModalityExperts.content`), or (*shape, D) of `item_rows`."""
        if not self.training and self.item_cache_is_current() and self._item_content_cache is not None:
            return self._item_content_cache if item_rows is None else self._item_content_cache[item_rows]
        rows = torch.arange(self.config.num_items, device=self.device) if item_rows is None else item_rows.flatten()
        content = self.mrc.content(rows)
        return content if item_rows is None else content.view(*item_rows.shape, -1)

    # ----- prompt embedding and masks -----

    def embed_prompt(self, input_ids, item_token_index, recency_index, mm_token_type_ids, modality_mask, example_of_token):
        """Token embeddings with every item placeholder replaced by its MRC soft token plus its SPAE embedding: its
        recency for a history item, the candidates' shared row for a candidate (`mm_token_type_ids`).
        example_of_token: (B, T) the example each token belongs to (its row, or its sequence in a packed row)."""
        k, n_items = self.config.tokens_per_item, self.config.num_items
        is_item = item_token_index >= 0  # (B, T)
        # The processor validates ids and layout on the host; these device-side asserts only catch inputs from another
        # processor, without synchronising with the device (torch.compile and CUDA graphs need none).
        torch._assert_async(
            (is_item == (input_ids == self.config.item_token_id)).all() & (is_item == (mm_token_type_ids > 0)).all(),
            "item placeholder tokens, item_token_index and mm_token_type_ids disagree: pass the output of one processor call",
        )
        torch._assert_async(
            (item_token_index < n_items * k).all(),
            f"an item index is outside this checkpoint's catalog of {n_items} items: the processor does not match the model",
        )
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, H)
        # Fixed shapes, no boolean indexing, so the forward compiles as one graph: every position gets an item vector
        # (item row 0 where there is none) and torch.where keeps those of the placeholders.
        token_index = item_token_index.clamp(min=0)  # (B, T) item * K + k
        if not self.training and modality_mask is None and self.item_cache_is_current():
            item_vectors = self._item_cache.flatten(0, 1)[token_index]  # (B, T, H)
        else:
            active = self.active_modalities.expand(*token_index.shape, -1)  # (B, T, M)
            if modality_mask is not None:  # per-example MPO ramp, drawn by the data collator: (num_examples, M)
                active = active & modality_mask[example_of_token]
            tokens = self.mrc((token_index // k).flatten(), active.flatten(0, 1))[0]  # (B * T, K, H)
            which = (token_index % k).view(-1, 1, 1).expand(-1, 1, tokens.shape[-1])  # each position's k of K
            item_vectors = tokens.gather(1, which).view(*token_index.shape, -1)  # (B, T, H)
        if self.recency_embedding is not None:  # the candidates, an unordered set, share the row after the recencies
            rows = torch.where(mm_token_type_ids == CANDIDATE_TOKEN_TYPE, self.config.max_history, recency_index.clamp(min=0))
            item_vectors = item_vectors + self.recency_embedding(rows)
        item_vectors = F.dropout(item_vectors, self.config.item_dropout, self.training)
        return torch.where(is_item.unsqueeze(-1), item_vectors.to(embeds.dtype), embeds)

    def _attention_masks(self, embeds, attention_mask, rule, virtual_index):
        """Masks in the backbone's attention-backend format for `rule` (candidate isolation, or packed-sequence
        separation) on top of causality; sliding-window layers measure the window on `virtual_index` (B, T). One dict
        entry per layer type."""
        text_config = self.backbone.config
        layer_types = getattr(text_config, "layer_types", None)
        kinds = layer_types or ["sliding_attention" if getattr(text_config, "sliding_window", None) else "full_attention"]
        unsupported = set(kinds) - {"full_attention", "sliding_attention"}
        if unsupported:
            raise NotImplementedError(f"Backbone layer types {sorted(unsupported)} are not supported by Speeder's masks")
        # Transformers' own mask interface for the backend (bool for sdpa, float for eager, BlockMask for flex). The
        # rules index tensors with broadcast index grids, so vmap is not needed: create_causal_mask would switch it on
        # for any custom rule, and on CPU that made mask building ~80% of a small model's inference time.
        build = ALL_MASK_ATTENTION_FUNCTIONS[text_config._attn_implementation]
        batch_size, seq_len = embeds.shape[:2]
        masks = {}
        padding = padding_mask_function(attention_mask.bool())
        for kind in set(kinds):
            kind_rule = rule
            if kind == "sliding_attention":
                kind_rule = and_masks(rule, candidate_sliding_window_mask_function(virtual_index, text_config.sliding_window))
            # A padding query sees itself: a fully masked row is NaN in some SDPA kernels (cuDNN under bf16 autocast),
            # and those NaN values then reach real rows through 0 * NaN in the next layer. Flex attention returns 0
            # for such rows, and Inductor's CPU flex template fails to compile padding inside the rule, so flex gets
            # the padding through the builder as before.
            flex = text_config._attn_implementation == "flex_attention"
            rule_with_padding = and_masks(causal_mask_function, kind_rule)
            if not flex:
                rule_with_padding = or_masks(and_masks(rule_with_padding, padding), diagonal_mask_function)
            masks[kind] = build(
                batch_size=batch_size, q_length=seq_len, kv_length=seq_len, q_offset=0, kv_offset=0,
                mask_function=rule_with_padding, attention_mask=attention_mask.bool() if flex else None,
                allow_is_causal_skip=False, dtype=embeds.dtype, config=text_config, use_vmap=False, device=embeds.device,
            )
        return masks if layer_types is not None else masks[kinds[0]]

    def candidate_masks(self, embeds, attention_mask, segment_ids, query_index, candidate_token_index):
        """Causal + candidate isolation, with sliding windows measured as if each candidate followed the query."""
        k = self.config.tokens_per_item
        index = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[0], -1)  # (B, T)
        last_of_candidate = candidate_token_index.gather(1, (segment_ids - 1).clamp(min=0))  # (B, T)
        offset = k - 1 - (last_of_candidate - index)  # a candidate token's place inside its candidate
        virtual = torch.where(segment_ids > 0, query_index[:, None] + 1 + offset, index)
        return self._attention_masks(embeds, attention_mask, candidate_isolation_mask_function(segment_ids), virtual)

    def _backend_takes_masks(self) -> bool:
        """False for FlashAttention kernels (and hub kernels without a mask builder): they take no arbitrary mask."""
        implementation = self.backbone.config._attn_implementation or "sdpa"
        return "flash" not in implementation and implementation in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping

    def uses_prefix_cache(self, candidate_scoring: str) -> bool:
        """Which of the two candidate-encoding algorithms runs: one pass with the isolation mask, or the shared
        prompt once with a KV cache and the candidates as a batch of its continuations (for kernels that take no
        arbitrary mask, DESIGN.md 5)."""
        if candidate_scoring not in ("auto", "mask", "prefix_cache"):
            raise ValueError(f"candidate_scoring must be 'auto', 'mask' or 'prefix_cache', got {candidate_scoring!r}")
        if candidate_scoring == "auto":
            return not self._backend_takes_masks()
        return candidate_scoring == "prefix_cache"

    # ----- forward -----

    def forward(
        self,
        input_ids: torch.LongTensor,  # (B, T) prompt, either padding side
        attention_mask: torch.LongTensor | None = None,  # (B, T); None: no padding
        position_ids: torch.LongTensor | None = None,  # (B, T) SPAE item-level positions (from the processor)
        item_token_index: torch.LongTensor | None = None,  # (B, T) item * K + k at placeholders, -1 elsewhere
        recency_index: torch.LongTensor | None = None,  # (B, T) recency at history item tokens (0 = latest), -1 elsewhere
        mm_token_type_ids: torch.LongTensor | None = None,  # (B, T) 0 text, 1 history item, 2 candidate
        query_index: torch.LongTensor | None = None,  # (B,) the query token of each row; (S,) per sequence when packed
        candidate_token_index: torch.LongTensor | None = None,  # (B, C) last token of each candidate in the prompt
        candidate_segment_ids: torch.LongTensor | None = None,  # (B, T) 0 shared prompt, c + 1 candidate c's tokens
        last_item_index: torch.LongTensor | None = None,  # (B, T) the processor's; read by the catalog head only
        modality_mask: torch.BoolTensor | None = None,  # (B, M) per-example MPO ramp mask
        output_hidden_states: bool | None = None,  # None: config.output_hidden_states
        output_attentions: bool | None = None,  # None: config.output_attentions
        return_dict: bool | None = None,  # None: config.return_dict; False gives a tuple
        candidate_scoring: str = "auto",  # "mask" (one pass, isolation mask), "prefix_cache", or "auto"
        # The backbone's keyword arguments. Padding-free batches (processor `packed=True`: B = 1 row holding S
        # sequences back to back) give their boundaries as cu_seq_lens_q / cu_seq_lens_k (S + 1,) and max_length_q /
        # max_length_k: SPAE position ids repeat values, so boundaries cannot be inferred from position-id resets.
        **kwargs: Unpack[TransformersKwargs],
    ) -> SpeederModelOutput:
        """The layout comes from the processor: the query token at `query_index`; candidates in the prompt are stated
        by `candidate_token_index` and `candidate_segment_ids`."""
        _check_backbone_kwargs(kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cu_seq_lens_q = kwargs.get("cu_seq_lens_q")
        packed, in_prompt = cu_seq_lens_q is not None, candidate_token_index is not None
        _check_layout(input_ids, attention_mask, position_ids, item_token_index, recency_index, mm_token_type_ids,
                      query_index, candidate_token_index, candidate_segment_ids, cu_seq_lens_q)
        example_of_token, query_rows = _examples(input_ids, query_index, cu_seq_lens_q)
        embeds = self.embed_prompt(input_ids, item_token_index, recency_index, mm_token_type_ids, modality_mask,
                                   example_of_token)

        if in_prompt and self.uses_prefix_cache(candidate_scoring):
            output = self._encode_candidates_with_prefix_cache(embeds, attention_mask, position_ids, query_index,
                                                               candidate_token_index)
        else:
            if packed and not self._backend_takes_masks():
                mask = None  # FlashAttention's varlen kernel: causal inside each sequence, given explicit boundaries
            else:
                kwargs = {k: v for k, v in kwargs.items() if k not in VARLEN_KWARGS}  # the mask states the boundaries
                mask = self._mask(embeds, attention_mask, example_of_token if packed else None, candidate_segment_ids,
                                  query_index, candidate_token_index)
            out = self.backbone(
                inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                output_hidden_states=self.config.output_hidden_states if output_hidden_states is None else output_hidden_states,
                output_attentions=self.config.output_attentions if output_attentions is None else output_attentions,
                **kwargs,
            )
            last = out.last_hidden_state  # (B, T, H)
            candidates = last.gather(1, candidate_token_index[..., None].expand(-1, -1, last.shape[-1])) if in_prompt else None
            output = SpeederModelOutput(  # query states (B, H), or (S, H) packed; candidates (B, C, H)
                last_hidden_state=last, query_hidden_state=last[query_rows, query_index],
                candidate_hidden_states=candidates, hidden_states=out.hidden_states, attentions=out.attentions)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    def _mask(self, embeds, attention_mask, example_of_token, candidate_segment_ids, query_index, candidate_token_index):
        """The backbone's attention mask: packed sequences kept apart (`example_of_token` (1, T)), candidates isolated,
        or plain padding."""
        if example_of_token is not None:
            real_index = torch.arange(embeds.shape[1], device=embeds.device)[None]
            return self._attention_masks(embeds, attention_mask, packed_sequence_mask_function(example_of_token),
                                         real_index)
        if candidate_token_index is not None:
            return self.candidate_masks(embeds, attention_mask, candidate_segment_ids, query_index, candidate_token_index)
        return attention_mask

    def _encode_candidates_with_prefix_cache(self, embeds, attention_mask, position_ids, query_index,
                                             candidate_token_index):
        """Encode the shared prompt once with a KV cache, then every candidate as a continuation of it (for kernels
        that take no arbitrary mask). Each row is first rotated so that its last candidate token closes it (right
        padding then leads, as left padding does), so the shared prompt is the row minus the candidates' tokens; the
        stated indices are checked against that layout on the device (no host synchronisation)."""
        batch_size, num_candidates = candidate_token_index.shape
        k, seq_len = self.config.tokens_per_item, embeds.shape[1]
        shift = seq_len - 1 - candidate_token_index.amax(-1, keepdim=True)  # (B, 1) tokens after the last candidate
        source = (torch.arange(seq_len, device=embeds.device) - shift) % seq_len  # (B, T) each new place's old one
        embeds = embeds.gather(1, source[..., None].expand(-1, -1, embeds.shape[-1]))
        attention_mask, position_ids = attention_mask.gather(1, source), position_ids.gather(1, source)
        prefix_len = seq_len - num_candidates * k
        last_tokens = prefix_len - 1 + k * torch.arange(1, num_candidates + 1, device=candidate_token_index.device)
        torch._assert_async((query_index + shift[:, 0] == prefix_len - 1).all()
                            & (candidate_token_index + shift == last_tokens).all(),
                            "the prefix-cache path needs the processor's layout: the query, then the candidates in "
                            "order, then only padding")
        prefix = self.backbone(
            inputs_embeds=embeds[:, :prefix_len],
            attention_mask=attention_mask[:, :prefix_len],
            position_ids=position_ids[:, :prefix_len],
            use_cache=True,
        )
        cache = prefix.cache
        cache.batch_repeat_interleave(num_candidates)
        cand_mask = torch.cat(
            [attention_mask[:, :prefix_len].repeat_interleave(num_candidates, 0),
             attention_mask.new_ones(batch_size * num_candidates, k)], dim=1,
        )
        cand = self.backbone(
            inputs_embeds=embeds[:, prefix_len:].reshape(batch_size * num_candidates, k, -1),
            attention_mask=cand_mask,
            position_ids=position_ids[:, prefix_len:].reshape(batch_size * num_candidates, k),
            cache=cache,
            use_cache=True,
        )
        return SpeederModelOutput(
            query_hidden_state=prefix.last_hidden_state[:, -1],  # (B, H)
            candidate_hidden_states=cand.last_hidden_state[:, -1].view(batch_size, num_candidates, -1),  # (B, C, H)
        )



class SpeederForSequentialRecommendation(SpeederPreTrainedModel):
    """Next-item recommendation with an LLM over compressed item tokens: `SpeederModel` plus two heads.

    - candidate head: one forward pass scores all candidates in the prompt (each sees the shared prompt and itself);
    - catalog head: the query token's hidden state, projected, is dotted with every item's representation (plus a
      per-item bias); it also ranks candidates given only as catalog rows, with nothing in the prompt.
    """

    # The parts training policy refers to (MPO stages' `trainable`, LoRA's modules_to_save): group -> submodule or
    # parameter paths. Owned here, next to the attributes they name, so a rename fails a test instead of silently
    # training nothing (tests/test_training.py checks every path matches and every parameter has a group).
    parameter_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "experts": ("model.mrc.experts", "model.mrc.id_embedding"),
        "gate": ("model.mrc.gate", "model.mrc.token_gain"),
        "spae": ("model.recency_embedding",),
        "heads": ("candidate_head", "query_proj", "catalog_item_bias"),
        "backbone": ("model.backbone",),
    }

    @classmethod
    def parameter_group(cls, name: str) -> str | None:
        """The group of a parameter name, also as PEFT (`base_model.model.`, `modules_to_save.default`,
        `original_module`, LoRA's adapters) or DDP (`module.`) name it."""
        name = re.sub(r"\.(modules_to_save\.[^.]+|original_module)(?=\.)", "", name)
        for prefix in ("module.", "base_model.model."):
            name = name.removeprefix(prefix)
        return next((group for group, paths in cls.parameter_groups.items()
                     if any(name == path or name.startswith(path + ".") for path in paths)), None)

    def __init__(self, config: SpeederConfig):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        self.model = SpeederModel(config)
        self.candidate_head = nn.Linear(hidden_size, 1)
        self.query_proj = nn.Linear(hidden_size, hidden_size)
        # A module (not a bare parameter) so that PEFT's modules_to_save can train it next to LoRA adapters.
        self.catalog_item_bias = zero_at_build(nn.Embedding(config.num_items, 1)) if config.catalog_item_bias else None
        self.post_init()

    @property
    def content_affinity(self) -> float:
        """The weight of the content affinity on catalog-head scores (`catalog_query`); 0 without text / image."""
        return self.config.content_affinity if self.mrc.content_modalities else 0.0

    # The headless model's parts and catalog methods, as Llava's ForConditionalGeneration exposes its model's.
    @property
    def backbone(self):
        return self.model.backbone

    @property
    def mrc(self):
        return self.model.mrc

    @property
    def active_modalities(self) -> torch.Tensor:
        return self.model.active_modalities

    def set_item_features(self, features: dict[str, torch.Tensor], presence: dict[str, torch.Tensor] | None = None):
        self.model.set_item_features(features, presence)

    def set_active_modalities(self, modalities: Sequence[str] | dict[str, float]):
        self.model.set_active_modalities(modalities)

    def cache_item_tokens(self, chunk_size: int = 65536) -> torch.Tensor:
        return self.model.cache_item_tokens(chunk_size)

    def item_cache_is_current(self, check_contents: bool = False) -> bool:
        return self.model.item_cache_is_current(check_contents)

    def add_items(self, features: dict[str, torch.Tensor], presence: dict[str, torch.Tensor] | None = None) -> int:
        """`SpeederModel.add_items`; each new item's per-item bias is the median of the trained ones: the prior of a
        typical item (in a long-tailed catalog, a rarely chosen one), so a new item competes on its content, neither
        buried below every item with evidence nor lifted to the level of the hits. Returns n."""
        n = self.model.add_items(features, presence)
        if self.catalog_item_bias is not None:
            bias = self.catalog_item_bias.weight
            append_rows(self.catalog_item_bias, bias.detach().median().expand(n, 1))
        return n

    def catalog_query(self, hidden: torch.Tensor, anchor_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(n, H [+ D]) the catalog head's query vectors of n states (n, H): the projected state and, with the content
        affinity, the frozen content of each state's latest history item (`anchor_rows` (n,), the processor's
        `last_item_index` there) times `config.content_affinity`, a weight chosen on validation. Dotted with
        `catalog_item_vectors`, the affinity adds weight x cos(content of the latest item, content of the scored
        item): the content kNN's signal, which reaches items with few or no interactions, where the learned vectors
        know least."""
        query = self.query_proj(hidden)
        if not self.content_affinity:
            return query
        if anchor_rows is None:
            raise ValueError("This model's catalog head reads each query's latest history item: pass anchor_rows (the "
                             "processor's last_item_index at the query)")
        content = self.model.item_content(anchor_rows.clamp(min=0)).to(query.dtype)
        return torch.cat([query, self.content_affinity * content], -1)

    def catalog_item_vectors(self, item_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H [+ D]) what `catalog_query` vectors are dotted with: each item's representation (the mean of its K
        tokens) and, with the content affinity, its frozen content; (*shape, H [+ D]) of the catalog rows `item_rows`."""
        items = self.model.item_representations(item_rows)
        if not self.content_affinity:
            return items
        return torch.cat([items, self.model.item_content(item_rows).to(items.dtype)], -1)

    def score_items(self, query: torch.Tensor, item_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(n, N) catalog-head scores of n `catalog_query` vectors: query . item vector, plus a learned per-item bias (the
        popularity prior a free item embedding carries in its norm, which RMS-normalised item tokens cannot). With
        `item_rows`, the scores of those catalog rows only: (U,) shared by every query gives (n, U); (n, C), one set
        per query (its candidates), gives (n, C)."""
        items = self.catalog_item_vectors(item_rows)  # (N or U, H') or (n, C, H')
        scores = query @ items.T if items.dim() == 2 else (items @ query[:, :, None]).squeeze(-1)
        if self.catalog_item_bias is None:
            return scores
        return scores + (self.catalog_item_bias.weight[:, 0] if item_rows is None else self.catalog_item_bias(item_rows)[..., 0])

    def catalog_logits(self, hidden: torch.Tensor, item_rows: torch.Tensor | None = None,
                       anchor_rows: torch.Tensor | None = None) -> torch.Tensor:
        """`score_items` of the `catalog_query` vectors of states `hidden` (n, H) with latest items `anchor_rows` (n,)."""
        return self.score_items(self.catalog_query(hidden, anchor_rows), item_rows)

    def catalog_loss(self, scores, labels, item_rows=None, item_log_q=None, reduction="mean"):
        """Cross-entropy of the catalog head. scores: (n, N) over the catalog, or (n, U) over the sampled rows
        `item_rows` (U,), sorted and unique: the step's positives plus drawn negatives (`SpeederDataCollator`);
        labels: (n,) catalog rows, -100 to ignore.

        Sampled softmax with the logQ correction: each sampled item's logit is lowered by `item_log_q` (U,), the log
        of its probability of being in the set, which makes the sampled denominator an unbiased (Horvitz-Thompson)
        estimate of the full one. The positive itself is in the set with probability 1, so its logit is not
        corrected ("Correcting the LogQ Correction", Khrylchenko et al., RecSys 2025; Yi et al. 2019 correct it too).
        An item drawn twice, or drawn and also a positive, is one column, so no positive is ever its own negative.
        When every item is in the set, log q = 0 and this is the full softmax."""
        if item_rows is None:
            return F.cross_entropy(scores.float(), labels, ignore_index=-100, reduction=reduction)
        keep = labels >= 0
        column = torch.where(keep, torch.searchsorted(item_rows, labels.clamp(min=0)), -100)  # (n,) into item_rows
        corrected = scores.float() - item_log_q.float()  # (n, U)
        positive = scores.float().gather(1, column.clamp(min=0)[:, None])  # (n, 1) uncorrected
        corrected = corrected.scatter(1, column.clamp(min=0)[:, None], positive)
        return F.cross_entropy(corrected, column, ignore_index=-100, reduction=reduction)

    def _candidate_scores(self, out: SpeederModelOutput, query, candidate_item_index=None, catalog_scores=None):
        """(B, C) by the candidate head for candidates in the prompt, else by the catalog head for the catalog rows
        `candidate_item_index` (B, C) (gathered from `catalog_scores` when computed anyway, else only those items
        encoded) with the `catalog_query` vectors `query`; a padded slot (row -1, a shorter candidate set) scores
        -inf. None without candidates."""
        if out.candidate_hidden_states is not None:
            scores = self.candidate_head(out.candidate_hidden_states).squeeze(-1)
        elif candidate_item_index is None:
            return None
        elif catalog_scores is not None:
            scores = catalog_scores.gather(1, candidate_item_index.clamp(min=0))
        else:
            scores = self.score_items(query, candidate_item_index.clamp(min=0))
        return scores if candidate_item_index is None else scores.masked_fill(candidate_item_index < 0, float("-inf"))

    def _loss(self, candidate_scores, labels, in_prompt: bool, dense_loss, catalog_labels, catalog_scores, query,
              sampled: dict):
        """The weighted sum of the candidate cross-entropy (of whichever head scored the candidates, with that head's
        weight) and the catalog loss: the dense one, which already covers the last prefix, or the query's over the
        catalog (`catalog_labels`); None without labels."""
        losses = []
        candidate_weight = self.config.candidate_loss_weight if in_prompt else self.config.catalog_loss_weight
        if labels is not None and candidate_scores is not None and candidate_weight:
            losses.append(candidate_weight * F.cross_entropy(candidate_scores.float(), labels, ignore_index=-100))
        if dense_loss is not None:
            losses.append(self.config.catalog_loss_weight * dense_loss)
        elif catalog_labels is not None:
            scores = catalog_scores if sampled["item_rows"] is None else self.score_items(query, sampled["item_rows"])
            losses.append(self.config.catalog_loss_weight * self.catalog_loss(scores, catalog_labels, **sampled))
        return sum(losses[1:], losses[0]) if losses else None

    def _dense_catalog_loss(self, last_hidden_state, dense_catalog_labels, last_item_index, sampled: dict,
                            normalizer=None):
        """(loss, scores): every history item's hidden state queries the item that followed it, all prefixes in one
        pass; summed and divided by `normalizer` when given (length-grouped batches), else the mean."""
        reduction = "mean" if normalizer is None else "sum"
        anchors = last_item_index if self.content_affinity else None
        if torch.compiler.is_compiling():  # fixed shapes: every position scored, unlabelled ones ignored
            scores = self.catalog_logits(last_hidden_state.flatten(0, 1), sampled["item_rows"],
                                         None if anchors is None else anchors.flatten())  # (B * T, N or U)
            loss = self.catalog_loss(scores, dense_catalog_labels.flatten(), **sampled, reduction=reduction)
        else:  # eagerly, only the labelled positions (a data-dependent shape, cheaper with padding)
            keep = dense_catalog_labels >= 0
            scores = self.catalog_logits(last_hidden_state[keep], sampled["item_rows"],
                                         None if anchors is None else anchors[keep])  # (n_prefixes, N or U)
            loss = self.catalog_loss(scores, dense_catalog_labels[keep], **sampled, reduction=reduction)
        return (loss if normalizer is None else loss / normalizer), scores

    def forward(
        self,
        # The processor's layout, passed on to SpeederModel.forward (shapes there).
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        item_token_index: torch.LongTensor | None = None,
        recency_index: torch.LongTensor | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
        query_index: torch.LongTensor | None = None,
        candidate_token_index: torch.LongTensor | None = None,
        candidate_segment_ids: torch.LongTensor | None = None,
        last_item_index: torch.LongTensor | None = None,  # (B, T) latest history item at each token (content affinity)
        # The heads' inputs.
        candidate_item_index: torch.LongTensor | None = None,  # (B, C) catalog rows of the candidates
        labels: torch.LongTensor | None = None,  # (B,) position of the target among the candidates
        catalog_labels: torch.LongTensor | None = None,  # (B,) catalog index of the target
        dense_catalog_labels: torch.LongTensor | None = None,  # (B, T) next item at each history item, -100 elsewhere
        # Sampled softmax for the catalog losses (None: full softmax over the catalog): (U,) sorted unique catalog rows
        # the losses are computed over, and (U,) log of each one's probability of being drawn (`catalog_loss`).
        catalog_item_rows: torch.LongTensor | None = None,
        catalog_item_log_q: torch.FloatTensor | None = None,
        # () divide the summed dense loss by this instead of the batch's label count (length-grouped batches)
        dense_loss_normalizer: torch.Tensor | None = None,
        return_catalog_scores: bool = False,
        modality_mask: torch.BoolTensor | None = None,  # as SpeederModel.forward's, and the next four
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        candidate_scoring: str = "auto",
        **kwargs: Unpack[TransformersKwargs],  # the backbone's (packed batches' boundaries: SpeederModel.forward)
    ) -> SpeederRecommendationOutput:
        """Candidates in the prompt (`candidate_token_index`) are scored by the candidate head; candidates given only
        as `candidate_item_index` by the catalog head (dot products, nothing in the prompt)."""
        in_prompt = candidate_token_index is not None
        self._check_head_inputs(in_prompt, candidate_scoring, dense_catalog_labels, catalog_item_rows, catalog_item_log_q,
                                last_item_index)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            item_token_index=item_token_index, recency_index=recency_index, mm_token_type_ids=mm_token_type_ids,
            query_index=query_index, candidate_token_index=candidate_token_index, candidate_segment_ids=candidate_segment_ids,
            modality_mask=modality_mask, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            return_dict=True, candidate_scoring=candidate_scoring, **kwargs)
        sampled = dict(item_rows=catalog_item_rows, item_log_q=catalog_item_log_q)
        dense_loss, dense_scores = (None, None) if dense_catalog_labels is None else self._dense_catalog_loss(
            out.last_hidden_state, dense_catalog_labels, last_item_index, sampled, dense_loss_normalizer)
        anchors = (last_item_index[_examples(input_ids, query_index, kwargs.get("cu_seq_lens_q"))[1], query_index]
                   if self.content_affinity else None)  # (B,) each query's latest history item
        query = self.catalog_query(out.query_hidden_state, anchors)  # (B, H [+ D])
        wants_catalog_loss = catalog_labels is not None and self.config.catalog_loss_weight and dense_loss is None
        full = return_catalog_scores or (wants_catalog_loss and catalog_item_rows is None)
        catalog_scores = self.score_items(query) if full else None  # (B, N)
        candidate_scores = self._candidate_scores(out, query, candidate_item_index, catalog_scores)
        loss = self._loss(candidate_scores, labels, in_prompt, dense_loss,
                          catalog_labels if wants_catalog_loss else None, catalog_scores, query, sampled)
        output = SpeederRecommendationOutput(
            loss=loss, candidate_scores=candidate_scores, catalog_scores=catalog_scores,
            query_hidden_state=out.query_hidden_state, catalog_query=query, hidden_states=out.hidden_states,
            attentions=out.attentions, dense_catalog_scores=dense_scores)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    def _check_head_inputs(self, in_prompt: bool, candidate_scoring: str, dense_catalog_labels, catalog_item_rows,
                           catalog_item_log_q, last_item_index):
        if dense_catalog_labels is not None and in_prompt and self.model.uses_prefix_cache(candidate_scoring):
            raise ValueError("dense_catalog_labels need the one-pass path: use candidate_scoring='mask' or no candidates")
        if (catalog_item_rows is None) != (catalog_item_log_q is None):
            raise ValueError("catalog_item_rows and catalog_item_log_q come together: pass the collator's whole batch")
        if self.content_affinity and last_item_index is None:
            raise ValueError("This model's catalog head reads each token's latest history item: pass the processor's "
                             "last_item_index (its whole output)")

    @property
    def ranks_candidates_with_catalog_head(self) -> bool:
        """True when `config.candidate_ranking_head` is "catalog": candidates are ranked by the catalog head's dot
        products, with no candidates in the prompt."""
        return self.config.candidate_ranking_head == "catalog"

    def check_processor(self, processor):
        """Raise unless `processor` states this checkpoint's catalog and layout (`recommendation.check_processor`)."""
        check_processor(self, processor)

    def recommend(self, histories: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]] | None = None,
                  top_k: int = 10, processor=None, exclude_history: bool = True, batch_size: int = 32,
                  chunk_size: int = 65536) -> list[dict]:
        """Top-k next items for each history of raw item ids, best first: one {"item_ids": [...], "scores": [...]}
        per user. With `candidates`, ranks each user's candidates with the head the model was trained with; otherwise
        the whole catalog with the catalog head, in chunks of `chunk_size` items, without the history's items when
        `exclude_history`. The processor is loaded from the checkpoint when not given (`recommendation.recommend`)."""
        return recommend(self, histories, candidates, top_k=top_k, processor=processor,
                         exclude_history=exclude_history, batch_size=batch_size, chunk_size=chunk_size)


__all__ = [
    "append_rows",
    "check_feature_bank",
    "SpeederPreTrainedModel",
    "SpeederForSequentialRecommendation",
    "SpeederModalityExperts",
    "SpeederModel",
    "SpeederModelOutput",
    "SpeederRecommendationOutput",
    "candidate_isolation_mask_function",
]
