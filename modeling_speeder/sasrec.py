"""SASRec (Kang & McAuley, 2018): the ID-only baseline, and the collaborative encoder whose item embeddings
become Speeder's `id` modality. A PreTrainedModel, so it saves and loads as safetensors with its own config."""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.trainer_pt_utils import LengthGroupedSampler

from .evaluation import (
    full_ranking_metrics,
    ranking_metrics,
    report_for,
    target_ranks,
    training_windows,
)
from .recommendation import exclude_history


@strict
class SASRecConfig(PreTrainedConfig):
    model_type = "speeder_sasrec"

    num_items: int = 0  # catalog size; embedding row 0 is padding, item i is row i + 1
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    max_length: int = 50  # most recent items kept
    dropout: float = 0.2
    initializer_range: float = 0.02
    catalog_fingerprint: str | None = None  # hash of the item ids in row order (`catalog_fingerprint`), when known


class SASRecModel(PreTrainedModel):
    config: SASRecConfig
    config_class = SASRecConfig
    base_model_prefix = "sasrec"

    def __init__(self, config: SASRecConfig):
        super().__init__(config)
        h = config.hidden_size
        self.item_embedding = nn.Embedding(config.num_items + 1, h, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_length, h)
        layer = nn.TransformerEncoderLayer(h, config.num_heads, 4 * h, config.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def forward(self, item_ids: torch.LongTensor, labels: torch.LongTensor | None = None, loss_normalizer: float | None = None):
        """item_ids: (B, L) catalog rows + 1, right-padded with 0. labels: (B, L) next catalog row, -100 at pads.
        Returns (loss or None, hidden (B, L, H)); every position is trained at once (dense next-item loss).
        loss_normalizer: divide the summed loss by this constant instead of the batch's label count, so that every
        label weighs the same whatever batch it lands in (length-grouped batches hold very different counts)."""
        seq_len = item_ids.shape[1]
        x = self.item_embedding(item_ids) * math.sqrt(self.config.hidden_size)
        x = self.dropout(x + self.position_embedding(torch.arange(seq_len, device=item_ids.device)))
        causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=item_ids.device), 1)
        hidden = self.norm(self.encoder(x, mask=causal, src_key_padding_mask=item_ids == 0, is_causal=True))
        loss = None
        if labels is not None:
            keep = labels >= 0
            logits = hidden[keep] @ self.item_embedding.weight[1:].T  # full softmax over the catalog
            if loss_normalizer is None:
                loss = F.cross_entropy(logits, labels[keep])
            else:
                loss = F.cross_entropy(logits, labels[keep], reduction="sum") / loss_normalizer
        return loss, hidden

    @torch.no_grad()
    def next_item_logits(self, item_rows: torch.LongTensor, positions: torch.BoolTensor,
                         catalog_rows: torch.LongTensor | None = None) -> torch.Tensor:
        """(n, N) full-catalog logits of the next item after each marked prefix. item_rows: (B, L) catalog rows,
        oldest first from position 0, -1 after each sequence's end; positions: (B, L) the prefixes wanted (the
        logits come in row-major order of them); catalog_rows: (U,) score those items only, (n, U) (a sampled
        softmax's set). Speeder's distillation teacher (`SpeederTrainer`)."""
        if item_rows.shape[1] > self.config.max_length:
            raise ValueError(f"Sequences of {item_rows.shape[1]} items exceed SASRec's max_length "
                             f"{self.config.max_length}")
        _, hidden = self((item_rows + 1).clamp(min=0).to(self.device))
        items = self.item_embedding.weight[1:] if catalog_rows is None else self.item_embedding(catalog_rows.to(self.device) + 1)
        return hidden[positions.to(self.device)] @ items.T

    def item_embeddings(self) -> torch.Tensor:
        """(N, H) item vectors: Speeder's collaborative (`id`) features."""
        return self.item_embedding.weight[1:].detach()

    @torch.no_grad()
    def user_embeddings(self, histories_rows: list[list[int]]) -> torch.Tensor:
        batch = _pad([h[-self.config.max_length :] for h in histories_rows])
        _, hidden = self(batch.to(self.device))
        lengths = (batch > 0).sum(1).to(self.device)
        return hidden[torch.arange(len(batch)), lengths - 1]


def _pad(rows: list[list[int]]) -> torch.Tensor:
    """Catalog rows -> (B, L) ids shifted by one, right-padded with 0."""
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r) + 1
    return out


def train_sasrec(sequences: list[list[int]], num_items: int, epochs: int = 200, batch_size: int = 128, lr: float = 1e-3,
                 seed: int = 0, log_every: int = 0, validation: tuple[list[list[int]], list[int]] | None = None,
                 patience: int = 10, weight_decay: float = 0.0, **config_kwargs) -> SASRecModel:
    """Train on per-user training sequences (catalog rows, oldest first) with the dense next-item loss (full softmax).

    Every training target of every user is predicted exactly once per epoch: long sequences are cut into overlapping
    windows of `max_length` items (`training_windows`), where each window's positions already covered by the previous
    window give context only. With `validation` = (histories, targets), the model is evaluated after every epoch on
    full-catalog NDCG@10 (history excluded), the best epoch's weights are kept and training stops after `patience`
    epochs without improvement, as RecBole does. `model.training_record` holds the curve and the best epoch.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRecModel(SASRecConfig(num_items=num_items, **config_kwargs)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    windows = [w for s in sequences for w in training_windows(s, model.config.max_length)]
    record = {"epochs": [], "best_epoch": None, "best_validation_ndcg@10": None, "windows": len(windows)}
    best_state, stale, start = None, 0, time.perf_counter()
    lengths = [len(w) - 1 for w, _ in windows]
    # Length-grouped batches hold very different numbers of labels (2 per short window, up to 49 per long one): the
    # loss is normalised by the epoch-average count per batch, not by each batch's, so the objective is the same
    # per-target mean as with random batches.
    labels_per_window = sum(len(w) - 1 - first for w, first in windows) / len(windows)
    for epoch in tqdm(range(epochs), desc="SASRec", unit="epoch"):
        model.train()
        # Batches of similar window lengths (transformers' sampler: shuffled megabatches sorted by length), so short
        # histories are not padded to the longest one; batch order shuffled.
        order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed + epoch)))
        batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
        for batch in (batches[i] for i in rng.permutation(len(batches))):
            rows = [windows[i] for i in batch]
            inputs = _pad([w[:-1] for w, _ in rows])
            labels = torch.full_like(inputs, -100)
            for i, (w, first_labeled) in enumerate(rows):
                labels[i, first_labeled : len(w) - 1] = torch.tensor(w[first_labeled + 1 :])
            loss, _ = model(inputs, labels, loss_normalizer=len(rows) * labels_per_window)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        entry = {"epoch": epoch + 1, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - start, 1)}
        if validation is not None:
            model.eval()
            entry["validation_ndcg@10"] = evaluate_sasrec(model, *validation)["full_ndcg@10"]
            if best_state is None or entry["validation_ndcg@10"] > record["best_validation_ndcg@10"]:
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
                record.update(best_epoch=epoch + 1, **{"best_validation_ndcg@10": entry["validation_ndcg@10"]})
                stale = 0
            else:
                stale += 1
        record["epochs"].append(entry)
        if log_every and (epoch + 1) % log_every == 0:
            print(f"SASRec {entry}")
        if validation is not None and stale >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.training_record = record
    return model.eval()


@torch.no_grad()
def catalog_scores(model: SASRecModel, histories: list[list[int]], batch_size: int = 256) -> torch.Tensor:
    """(B, N) dot products of each user's last hidden state with every item."""
    items = model.item_embeddings()
    return torch.cat([model.user_embeddings(histories[b : b + batch_size]) @ items.T
                      for b in range(0, len(histories), batch_size)])


@torch.no_grad()
def evaluate_sasrec(model: SASRecModel, histories: list[list[int]], targets: list[int],
                    candidates: list[list[int]] | None = None, counts=None) -> dict:
    """Full-catalog HR@10 / NDCG@10 with history items excluded (and without, as RecBole scores sequential models),
    and, with `candidates`, the candidate protocol; with training-split item `counts`, the full bucketed report."""
    scored = score_sasrec(model, histories, targets, candidates)
    ranks, raw_ranks = scored["ranks"], scored["raw_ranks"]
    if candidates is None:
        return full_ranking_metrics(ranks)
    labels, candidate_scores = scored["labels"], scored["candidate_scores"]
    if counts is None:
        return {**ranking_metrics(candidate_scores, labels), **full_ranking_metrics(ranks),
                **full_ranking_metrics(raw_ranks, prefix="full_no_exclusion_")}
    return report_for(candidate_scores, labels, ranks, [len(h) for h in histories], targets, counts, raw_ranks)


def score_sasrec(model: SASRecModel, histories: list[list[int]], targets: list[int],
                 candidates: list[list[int]] | None = None) -> dict:
    """Per user: the target's whole-catalog rank with the history excluded (`ranks`) and without (`raw_ranks`), and,
    with `candidates`, their scores (`candidate_scores`, `labels`): `recipes.score_split`'s keys, for SASRec."""
    scores = catalog_scores(model, histories)
    target_rows = torch.tensor(targets)
    scored = {"raw_ranks": target_ranks(scores, target_rows),
              "ranks": target_ranks(exclude_history(scores, histories, keep=target_rows), target_rows)}
    if candidates is not None:
        scored["labels"] = [c.index(t) for c, t in zip(candidates, targets)]
        scored["candidate_scores"] = scores.gather(1, torch.tensor(candidates)).numpy()
    return scored


__all__ = ["SASRecConfig", "SASRecModel", "catalog_scores", "evaluate_sasrec", "score_sasrec", "train_sasrec"]
