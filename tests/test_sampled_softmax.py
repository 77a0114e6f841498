"""The catalog head's sampled softmax: logQ correction, positives never their own negatives, the full softmax as the
special case, a step that encodes only the items it touches, and distillation over the sampled set."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import HISTORIES, NUM_ITEMS, TARGETS, make_tiny
from modeling_speeder.processing.collator import SpeederDataCollator


def dense_rows():
    return [{"history": h, "target": t, "candidates": []} for h, t in zip(HISTORIES, TARGETS)]


def test_logq_corrected_loss_matches_a_hand_computation():
    model, _ = make_tiny(catalog_loss_weight=1.0)
    scores = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.3, 1.2, 0.1, -0.4]])  # 2 queries over 4 sampled items
    item_rows = torch.tensor([3, 7, 11, 20])
    log_q = torch.log(torch.tensor([0.5, 0.1, 0.9, 0.25]))
    labels = torch.tensor([7, 20])  # columns 1 and 3
    loss = model.catalog_loss(scores, labels, item_rows, log_q)
    expected = 0.0
    for b, column in enumerate((1, 3)):
        # The positive keeps its logit; every other sampled item's is lowered by log q.
        terms = [math.exp(scores[b, j] - (0 if j == column else log_q[j])) for j in range(4)]
        expected += -(scores[b, column].item() - math.log(sum(terms)))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    ignored = model.catalog_loss(scores, torch.tensor([7, -100]), item_rows, log_q)
    terms = [math.exp(scores[0, j] - (0 if j == 1 else log_q[j])) for j in range(4)]
    assert ignored.item() == pytest.approx(-(scores[0, 1].item() - math.log(sum(terms))), rel=1e-6)


def test_a_positive_drawn_as_a_negative_is_one_column_not_its_own_negative():
    _, processor = make_tiny(catalog_loss_weight=1.0)
    collator = SpeederDataCollator(processor, dense=True, candidates_in_prompt=False, catalog_negatives=NUM_ITEMS - 1)
    batch = collator(dense_rows())
    rows, labels = batch["catalog_item_rows"], batch["dense_catalog_labels"]
    positives = set(labels[labels >= 0].tolist())
    assert rows.tolist() == sorted(set(rows.tolist())), "sorted and unique: an item drawn twice is one column"
    assert positives <= set(rows.tolist())
    # With 39 draws from 40 items the positives are almost surely drawn as negatives too: still one column each, so
    # the loss over the set is the loss where each positive appears once, with its own logit uncorrected.
    model, _ = make_tiny(catalog_loss_weight=1.0)
    scores = torch.randn(len(labels[labels >= 0]), len(rows))
    label_rows = labels[labels >= 0]
    loss = model.catalog_loss(scores, label_rows, rows, batch["catalog_item_log_q"])
    column = torch.searchsorted(rows, label_rows)
    corrected = scores - batch["catalog_item_log_q"]
    corrected[torch.arange(len(column)), column] = scores[torch.arange(len(column)), column]
    assert loss.item() == pytest.approx(F.cross_entropy(corrected, column).item(), rel=1e-6)


def test_inclusion_probabilities_follow_the_draws():
    """q = 1 - (1 - u)^P (1 - 1/N)^M for P in-batch positives (frequency u) and M uniform draws."""
    _, processor = make_tiny()
    counts = np.arange(NUM_ITEMS) + 1.0
    collator = SpeederDataCollator(processor, dense=True, candidates_in_prompt=False, catalog_negatives=5,
                                   item_counts=counts)
    labels = torch.tensor([[3, 9, -100], [9, 12, -100]])
    sample = collator._sampled_catalog(labels)
    rows = sample["catalog_item_rows"].numpy()
    u = counts / counts.sum()
    expected = np.log(1 - (1 - u[rows]) ** 4 * (1 - 1 / NUM_ITEMS) ** 5)
    np.testing.assert_allclose(sample["catalog_item_log_q"].numpy(), expected, rtol=1e-5)
    assert {3, 9, 12} <= set(rows.tolist()) and len(rows) <= 3 + 5
    # The draws are uniform: each half of the catalog comes up about as often.
    draws = np.concatenate([collator._sampled_catalog(torch.tensor([[0]]))["catalog_item_rows"].numpy()
                            for _ in range(400)])
    draws = draws[draws != 0]  # the positive
    assert 0.4 < (draws >= NUM_ITEMS // 2).mean() < 0.6


@pytest.mark.parametrize("packed", [False, True])
def test_every_item_drawn_is_the_full_softmax(packed):
    """Loss and gradients of the sampled step with the whole catalog in the set equal the full-softmax step's."""
    model, processor = make_tiny(catalog_loss_weight=1.0, candidate_loss_weight=0.0, catalog_item_bias=True)
    model.train()
    model.config.item_dropout = 0.0
    with torch.no_grad():
        model.catalog_item_bias.weight.normal_()
    results = []
    for negatives in (0, NUM_ITEMS):
        collator = SpeederDataCollator(processor, dense=True, packed=packed, candidates_in_prompt=False,
                                       catalog_negatives=negatives)
        batch = collator(dense_rows())
        assert ("catalog_item_rows" in batch) == bool(negatives)
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.loss.detach(), grads))
    assert results[0][0] > 0 and results[0][1].abs().max() > 0
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_a_sampled_step_encodes_only_the_items_it_touches():
    model, processor = make_tiny(catalog_loss_weight=1.0, candidate_loss_weight=0.0)
    model.train()
    encoded = []
    hook = model.mrc.register_forward_hook(lambda module, args, output: encoded.append(args[0].numel()))
    batch = SpeederDataCollator(processor, dense=True, candidates_in_prompt=False, catalog_negatives=4)(dense_rows())
    model(**batch).loss.backward()
    hook.remove()
    tokens, sampled = batch["input_ids"].numel(), batch["catalog_item_rows"].numel()
    assert encoded == [tokens, sampled] and sampled < NUM_ITEMS, "the prompt's positions, then the sampled set only"
    # Only the sampled items' bias and id rows get gradients.
    assert model.mrc.id_embedding.weight.grad.abs().sum(1).nonzero().numel() < NUM_ITEMS


def test_candidates_ranked_by_the_catalog_head_encode_only_the_candidates():
    from conftest import CANDIDATES

    model, processor = make_tiny(catalog_loss_weight=1.0, candidate_loss_weight=0.0, catalog_item_bias=True)
    with torch.no_grad():
        model.catalog_item_bias.weight.normal_()
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES, candidates_in_prompt=False)
    full = model(**inputs, return_catalog_scores=True)
    encoded = []
    hook = model.mrc.register_forward_hook(lambda module, args, output: encoded.append(args[0].numel()))
    only = model(**inputs)
    hook.remove()
    assert only.catalog_scores is None
    assert encoded == [inputs["input_ids"].numel(), inputs["candidate_item_index"].numel()], "prompt, then candidates"
    torch.testing.assert_close(only.candidate_scores, full.catalog_scores.gather(1, inputs["candidate_item_index"]))


def test_distillation_over_the_sampled_set_is_the_renormalised_divergence(tmp_path):
    from test_distributed_and_resume import tiny_dataset
    from transformers import TrainingArguments

    from modeling_speeder.recipes import build_for_dataset, dense_training_rows
    from modeling_speeder.sasrec import train_sasrec
    from modeling_speeder.training import SpeederTrainer

    tiny_dataset(tmp_path / "data")
    model, processor, splits = build_for_dataset(tmp_path / "data", expert_hidden_size=16, learned_id_dim=8,
                                                 item_dropout=0.0, catalog_id_dropout=0.0, max_history=4)
    model.config.candidate_loss_weight, model.config.catalog_loss_weight = 0.0, 1.0
    rows = dense_training_rows(splits, max_history=4, stride=2)
    index = {item: row for row, item in enumerate(processor.item_ids)}
    teacher = train_sasrec([[index[i] for i in h] for h in splits["validation"]["history"]], processor.num_items,
                           epochs=1, hidden_size=16, max_length=4)
    batch = SpeederDataCollator(processor, dense=True, candidates_in_prompt=False, distillation=True,
                                catalog_negatives=5)([rows[i] for i in range(6)])
    sampled = batch["catalog_item_rows"]
    assert len(sampled) < processor.num_items
    keep = torch.arange(processor.num_items) % 3 != 0
    args = TrainingArguments(str(tmp_path / "t"), report_to=[], use_cpu=True)
    trainer = SpeederTrainer(model=model, args=args, teacher=teacher, distillation_weight=0.5, distillation_items=keep)
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    plain = {k: v for k, v in batch.items() if not k.startswith("distillation")}
    out = model(**plain)
    assert out.dense_catalog_scores.shape[1] == len(sampled)
    kept = keep[sampled]
    student = F.log_softmax(out.dense_catalog_scores[:, kept], -1)
    full_teacher = teacher.next_item_logits(batch["distillation_item_rows"], batch["distillation_positions"])
    target = F.log_softmax(full_teacher[:, sampled][:, kept], -1)
    divergence = (target.exp() * (target - student)).sum() / len(out.dense_catalog_scores)
    assert divergence > 0 and float(loss) == pytest.approx(float(out.loss + 0.5 * divergence), rel=1e-5)


def test_no_validation_or_test_target_enters_a_training_row(tmp_path):
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.conversion.datasets import load_canonical
    from modeling_speeder.recipes import dense_training_rows

    tiny_dataset(tmp_path / "data")
    splits, *_ = load_canonical(tmp_path / "data")
    rows = dense_training_rows(splits, max_history=3, stride=1)
    training = {u: list(h) for u, h in zip(splits["validation"]["user_id"], splits["validation"]["history"])}
    validation_targets = dict(zip(splits["validation"]["user_id"], splits["validation"]["target"]))
    for test_user, test_history in zip(splits["test"]["user_id"], splits["test"]["history"]):
        # The training sequence is the test history without its last item, the validation target.
        assert list(test_history) == training[test_user] + [validation_targets[test_user]]
    for user, history, target in zip(rows["user_id"], rows["history"], rows["target"]):
        window, sequence = list(history) + [target], training[user]
        # Every row is a contiguous slice of the user's training sequence, which ends before the validation target.
        assert any(sequence[s : s + len(window)] == window for s in range(len(sequence) - len(window) + 1)), (user, window)
