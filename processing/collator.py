"""Data collator: canonical dataset rows -> model inputs, with fresh training negatives."""

from dataclasses import dataclass, field

import numpy as np
import torch

from ..arguments import NUM_NEGATIVES
from .processing_speeder import SpeederProcessor


@dataclass
class SpeederDataCollator:
    """Rows with stored `candidates` (validation / test) are scored on those. Rows without (training) get the
    target plus `num_negatives` items drawn from outside the user's history, shuffled. The draws come from one
    seeded stream, so every epoch sees new negatives and a rerun sees the same ones. With `dense`, each row is a
    whole training sequence and the catalog head learns every prefix of it in one causal pass."""

    processor: SpeederProcessor
    num_negatives: int = NUM_NEGATIVES  # 20 candidates, the research protocol
    seed: int = 0
    dense: bool = False  # catalog head, every prefix in one pass: no candidates, `dense_catalog_labels` instead
    packed: bool = False  # with dense: padding-free rows with explicit boundaries (FlashAttention varlen, flex)
    candidates_in_prompt: bool = True  # False for models that rank stored candidates with the catalog head
    # MPO ramps: a callable giving the current per-modality keep probabilities (M,) (SpeederMPOCallback.keep_probabilities);
    # training batches then carry a `modality_mask` (one row per example) drawn here, so the model draws nothing.
    modality_keep_probabilities: object = None
    # With dense: the dataset's mean number of labels per row. Batches then carry `dense_loss_normalizer` = rows x this,
    # so every label weighs the same in every batch (length-grouped batches hold very different label counts).
    dense_labels_per_row: float | None = None
    # With dense: batches also carry `distillation_item_rows` (B, L) each row's (truncated) history as catalog rows,
    # oldest first, -1 after its end, and `distillation_positions` (B, L) True at the prefixes that have a label, in
    # the order of the model's `dense_catalog_scores`: the inputs of a sequential teacher (`SpeederTrainer`).
    distillation: bool = False
    # With dense (or catalog labels): train the catalog head with a sampled softmax. Each training batch carries
    # `catalog_item_rows` (U,), the sorted unique union of its positives and `catalog_negatives` items drawn once for
    # the whole batch, and `catalog_item_log_q` (U,), the log of each one's probability of being in that set (the
    # model's logQ correction). 0: the full softmax over the catalog. A count at or above the catalog size puts every
    # item in the set (log q = 0): the full softmax again, exactly.
    catalog_negatives: int = 0
    # Training interactions per catalog item (N,) (`evaluation.training_item_counts`): how often an item is an
    # in-batch positive, for the logQ correction (negatives are drawn uniformly). None: every item as likely.
    item_counts: np.ndarray | None = None
    _rng: np.random.Generator = field(init=False, repr=False)
    RECORDED_STATES = 64  # (not a field) draw states kept: those before the last 64 training batches
    _training_batches: int = field(init=False, repr=False, default=0)  # training batches collated so far
    _states_before: dict = field(init=False, repr=False, default_factory=dict)  # batch number -> stream state then

    def __post_init__(self):
        if self.packed and not self.dense:
            raise ValueError("packed=True needs dense=True: packed batches train the catalog head, without candidates")
        self._rng = np.random.default_rng(self.seed)
        n = self.processor.num_items
        if self.catalog_negatives < 0:
            raise ValueError(f"catalog_negatives must be >= 0, got {self.catalog_negatives!r}")
        counts = np.ones(n) if self.item_counts is None else np.asarray(self.item_counts, dtype=np.float64)
        if counts.shape != (n,):
            raise ValueError(f"item_counts has shape {counts.shape}; expected ({n},), one count per catalog item")
        self._positive_p = counts / counts.sum() if counts.sum() else np.full(n, 1.0 / n)  # (N,) in-batch positive
        # Uniform negatives, drawn by bisection on this CDF (as when the proposal was configurable: the same stream).
        self._uniform_cdf = np.cumsum(np.full(n, 1.0 / n))

    def rng_state(self, training_batches: int) -> dict:
        """The draw stream's state before training batch number `training_batches` (0-based) was collated, so that a
        resumed run draws what an uninterrupted one would have. The data loader collates a batch or two ahead of the
        step that consumes it, so the state asked for (that of the first batch not yet trained on) is usually a
        recorded one, not the current one."""
        if training_batches == self._training_batches:
            return self._rng.bit_generator.state
        if training_batches not in self._states_before:
            raise ValueError(f"No draw state recorded before training batch {training_batches}: this collator has "
                             f"collated {self._training_batches} training batches and keeps the last "
                             f"{len(self._states_before)} states")
        return self._states_before[training_batches]

    def restore_rng_state(self, state: dict, training_batches: int):
        """Continue the draw stream from `rng_state(training_batches)` of an earlier run (resume)."""
        self._rng.bit_generator.state = state
        self._training_batches, self._states_before = training_batches, {}

    def _draw_candidates(self, history, target):
        seen = {str(i) for i in history} | {str(target)}
        n = self.processor.num_items
        if n - len(seen) < self.num_negatives:
            raise ValueError(f"Catalog of {n} items is too small for {self.num_negatives} negatives outside a history "
                             f"of {len(seen)}")
        negatives = []
        while len(negatives) < self.num_negatives:
            for row in self._rng.integers(0, n, size=2 * self.num_negatives):
                item = self.processor.item_ids[row]
                if item not in seen and item not in negatives:
                    negatives.append(item)
        cands = [str(target)] + negatives[: self.num_negatives]
        self._rng.shuffle(cands)
        return cands

    def _sampled_catalog(self, labels: torch.Tensor) -> dict:
        """The sampled-softmax set of one batch: its positives (labels >= 0) plus `catalog_negatives` draws.

        An item is in the set if any of the batch's P positives or M draws is it; treating the positives as P draws
        from the items' training frequency u, its probability is q = 1 - (1 - u)^P (1 - p)^M, with p the negatives'
        proposal (uniform, 1 / N). The model subtracts log q from the negatives' logits
        (`SpeederForSequentialRecommendation.catalog_loss`)."""
        n, m = self.processor.num_items, self.catalog_negatives
        if m >= n:  # every item: the full softmax (log q = 0)
            return {"catalog_item_rows": torch.arange(n), "catalog_item_log_q": torch.zeros(n)}
        positives = labels[labels >= 0].numpy()
        draws = np.minimum(np.searchsorted(self._uniform_cdf, self._rng.random(m) * self._uniform_cdf[-1], side="right"),
                           n - 1)
        rows = np.unique(np.concatenate([positives, draws]))
        log_missed = len(positives) * np.log1p(-np.minimum(self._positive_p[rows], 1 - 1e-12)) + m * np.log1p(
            -1.0 / n)  # log P(not in the set)
        log_q = np.log(-np.expm1(np.minimum(log_missed, -1e-12)))
        return {"catalog_item_rows": torch.from_numpy(rows).long(), "catalog_item_log_q": torch.from_numpy(log_q).float()}

    def __call__(self, rows):
        stored = [len(r.get("candidates") or []) > 0 for r in rows]
        if any(stored) and not all(stored):
            raise ValueError("A batch mixes rows with stored candidates (evaluation) and rows without (training)")
        if all(stored):  # evaluation rows: scored on their stored candidates, by the model's ranking head
            return self.processor(histories=[r["history"] for r in rows], candidates=[list(r["candidates"]) for r in rows],
                                  targets=[r["target"] for r in rows], candidates_in_prompt=self.candidates_in_prompt)
        # A training batch: remember the stream's state before it, for `rng_state`. The loader runs at most one
        # optimiser step (gradient_accumulation_steps batches) and one batch ahead of training.
        self._states_before[self._training_batches] = self._rng.bit_generator.state
        self._states_before.pop(self._training_batches - self.RECORDED_STATES, None)
        self._training_batches += 1
        if self.dense:
            first = [r["first_labeled"] for r in rows] if "first_labeled" in rows[0] else None
            batch = self.processor(histories=[r["history"] for r in rows], targets=[r["target"] for r in rows], dense=True,
                                   packed=self.packed, dense_labels_from=first, teacher_inputs=self.distillation)
            if self.dense_labels_per_row is not None:
                batch["dense_loss_normalizer"] = torch.tensor(len(rows) * self.dense_labels_per_row)
            if self.catalog_negatives:
                batch.update(self._sampled_catalog(batch["dense_catalog_labels"]))
        else:
            candidates = [self._draw_candidates(r["history"], r["target"]) for r in rows]
            batch = self.processor(histories=[r["history"] for r in rows], candidates=candidates,
                                   targets=[r["target"] for r in rows])
            if self.catalog_negatives:
                batch.update(self._sampled_catalog(torch.as_tensor(batch["catalog_labels"])))
        keep = None if self.modality_keep_probabilities is None else self.modality_keep_probabilities()
        if keep is not None and ((keep > 0) & (keep < 1)).any():
            # A modality ramping in is let through for a share of the examples that rises to 1 (MPO).
            batch["modality_mask"] = torch.from_numpy(self._rng.random((len(rows), len(keep))) < keep.numpy())
        return batch


__all__ = ["SpeederDataCollator"]
