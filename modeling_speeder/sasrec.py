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

from .training import ranking_metrics


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

    def forward(self, item_ids: torch.LongTensor, labels: torch.LongTensor | None = None):
        """item_ids: (B, L) catalog rows + 1, right-padded with 0. labels: (B, L) next catalog row, -100 at pads.
        Returns (loss or None, hidden (B, L, H)); every position is trained at once (dense next-item loss)."""
        seq_len = item_ids.shape[1]
        x = self.item_embedding(item_ids) * math.sqrt(self.config.hidden_size)
        x = self.dropout(x + self.position_embedding(torch.arange(seq_len, device=item_ids.device)))
        causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=item_ids.device), 1)
        hidden = self.norm(self.encoder(x, mask=causal, src_key_padding_mask=item_ids == 0, is_causal=True))
        loss = None
        if labels is not None:
            keep = labels >= 0
            logits = hidden[keep] @ self.item_embedding.weight[1:].T  # full softmax over the catalog
            loss = F.cross_entropy(logits, labels[keep])
        return loss, hidden

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
                 seed: int = 0, log_every: int = 0, **config_kwargs) -> SASRecModel:
    """Train on per-user training sequences (catalog rows, oldest first): each predicts its next item everywhere."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRecModel(SASRecConfig(num_items=num_items, **config_kwargs)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    max_len = model.config.max_length + 1
    seqs = [s[-max_len:] for s in sequences if len(s) >= 2]
    start = time.perf_counter()
    for epoch in tqdm(range(epochs), desc="SASRec", unit="epoch"):
        order = rng.permutation(len(seqs))
        for b in range(0, len(order), batch_size):
            rows = [seqs[i] for i in order[b : b + batch_size]]
            inputs = _pad([r[:-1] for r in rows])
            labels = torch.full_like(inputs, -100)
            for i, r in enumerate(rows):
                labels[i, : len(r) - 1] = torch.tensor(r[1:])
            loss, _ = model(inputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if log_every and (epoch + 1) % log_every == 0:
            print(f"SASRec epoch {epoch + 1}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    return model.eval()


@torch.no_grad()
def evaluate_sasrec(model: SASRecModel, histories: list[list[int]], targets: list[int],
                    candidates: list[list[int]] | None = None, batch_size: int = 256) -> dict:
    """Full-catalog HR@10 / NDCG@10 with history items excluded, and the candidate protocol when given."""
    items = model.item_embeddings()
    ranks, cand_scores = [], []
    for b in range(0, len(histories), batch_size):
        hist, tgt = histories[b : b + batch_size], targets[b : b + batch_size]
        scores = model.user_embeddings(hist) @ items.T  # (B, N)
        for i, h in enumerate(hist):
            keep = scores[i, tgt[i]].clone()
            scores[i, h] = float("-inf")
            scores[i, tgt[i]] = keep
        ranks += ((scores >= scores[torch.arange(len(tgt)), tgt][:, None]).sum(1) - 1).tolist()
        if candidates is not None:
            cand_scores.append(scores.gather(1, torch.tensor(candidates[b : b + batch_size])))
    ranks = np.array(ranks)
    out = {"full_hr@10": float(np.mean(ranks < 10)), "full_ndcg@10": float(np.mean((ranks < 10) / np.log2(ranks + 2)))}
    if candidates is not None:
        labels = [c.index(t) for c, t in zip(candidates, targets)]
        out.update(ranking_metrics(torch.cat(cand_scores).numpy(), labels))
    return out


__all__ = ["SASRecConfig", "SASRecModel", "evaluate_sasrec", "train_sasrec"]
