"""The quality protocol: training windows cover every training target and no validation or test target, model
selection on validation (Speeder through the Trainer, SASRec by epoch), popularity and cold-item buckets."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from conftest import HISTORIES, make_tiny
from modeling_speeder.evaluation import (
    bucketed,
    popularity_baseline,
    popularity_bucket_names,
    ranking_metrics,
    target_ranks,
    training_item_counts,
    training_windows,
)
from modeling_speeder.recipes import dense_training_rows
from modeling_speeder.recommendation import exclude_history


@pytest.mark.parametrize("length", [2, 3, 7, 20, 21, 50, 137])
@pytest.mark.parametrize("max_length,stride", [(4, None), (5, 1), (6, 6), (20, None)])
def test_training_windows_predict_every_target_exactly_once(length, max_length, stride):
    sequence = list(range(100, 100 + length))
    predicted = []
    for window, first_labeled in training_windows(sequence, max_length, stride):
        start = sequence.index(window[0])
        assert len(window) <= max_length + 1 and window == sequence[start : start + len(window)]
        assert 0 <= first_labeled < len(window) - 1
        predicted += window[first_labeled + 1 :]
        if window[0] != sequence[0]:  # a later window: its labelled predictions see at least max_length - stride items
            assert first_labeled >= max_length - (stride or max(1, max_length // 2))
    assert predicted == sequence[1:], "each target once, in order"


def _splits(sequences):
    rows = {s: {"user_id": [], "history": [], "target": [], "candidates": []} for s in ("train", "validation", "test")}
    for user, seq in sequences.items():
        for split, cut in (("validation", len(seq) - 2), ("test", len(seq) - 1)):
            for key, value in zip(rows[split], (user, seq[:cut], seq[cut], [seq[cut], "n1", "n2"])):
                rows[split][key].append(value)
    return DatasetDict({s: Dataset.from_dict(r) for s, r in rows.items()})


def test_dense_rows_cover_long_histories_without_validation_or_test_targets():
    # Item names carry their position, so a leaked validation (index n-2) or test (index n-1) target is visible.
    sequences = {f"u{u}": [f"u{u}-pos{j}" for j in range(n)] for u, n in enumerate([3, 5, 60, 137])}
    splits = _splits(sequences)
    rows = dense_training_rows(splits, max_history=20)
    covered = {u: [] for u in sequences}
    for row in rows:
        seq = sequences[row["user_id"]]
        window = row["history"] + [row["target"]]
        for item in window:
            assert seq.index(item) < len(seq) - 2, f"{item} is a validation or test target"
        covered[row["user_id"]] += window[row["first_labeled"] + 1 :]
        assert len(row["history"]) <= 20 and row["length"] == len(row["history"]), "lengths for grouped batches"
    for user, seq in sequences.items():
        assert covered[user] == seq[1:-2], "every training target of every user, once"
    # The processor turns `first_labeled` into labels on exactly the predictions that count.
    model, processor = make_tiny("llama")
    inputs = processor(histories=[["item1", "item2", "item3", "item4"]], targets=["item5"], dense=True, dense_labels_from=[2])
    labels = inputs["dense_catalog_labels"][0]
    assert labels[labels >= 0].tolist() == [4, 5]
    assert labels[inputs["query_index"][0]] == 5, "the query token, which inference reads, predicts the target"
    with pytest.raises(ValueError, match="dense_labels_from"):
        processor(histories=HISTORIES, dense_labels_from=[0, 0, 0])


def test_popularity_buckets_and_baseline_on_a_hand_made_example():
    # Training sequences (validation histories): a x7, b x2, c x1, z x4. Validation targets x*, test targets y*.
    sequences = {"u1": ["a", "b", "a", "a", "x1", "y1"], "u2": ["a", "c", "a", "a", "b", "x2", "y2"],
                 "u3": ["a", "z", "z", "z", "z", "x3", "y3"]}
    splits = _splits(sequences)
    index = {item: row for row, item in enumerate(["a", "b", "c", "x1", "x2", "x3", "y1", "y2", "y3", "z", "n1", "n2"])}
    counts = training_item_counts(splits, index)
    assert counts[index["a"]] == 7 and counts[index["b"]] == 2 and counts[index["c"]] == 1 and counts[index["x1"]] == 0
    assert counts[index["y1"]] == 0 and counts[index["z"]] == 4, "validation and test targets are not training data"
    assert popularity_bucket_names([index["a"], index["b"], index["z"]], counts) == ["warm", "cold", "cold"]
    scores = np.array([[3.0, 1.0], [1.0, 2.0], [0.0, 5.0]])
    buckets = bucketed(scores, [0, 0, 1], ["warm", "cold", "cold"], order=["cold", "warm"])
    assert list(buckets) == ["cold", "warm"] and buckets["warm"]["hr@1"] == 1.0 and buckets["cold"]["hr@1"] == 0.5
    assert buckets["cold"]["users"] == 2
    report = popularity_baseline(splits, index, splits["test"])
    # Test candidates [target, n1, n2]: the targets y* were never trained on, so they tie with n1, n2 at 0 and lose.
    assert report["hr@1"] == 0.0 and report["by_target_popularity"]["cold"]["users"] == 3


def test_nan_scores_count_as_misses():
    scores = np.array([[np.nan, np.nan, np.nan], [1.0, np.nan, 0.0]])
    metrics = ranking_metrics(scores, [0, 0])
    assert metrics["hr@1"] == 0.5 and metrics["nonfinite_scores"] == 4 and np.isfinite(metrics["mrr"])
    ranks = target_ranks(torch.tensor([[float("nan"), 1.0, 2.0]]), torch.tensor([0]))
    assert ranks.tolist() == [2]


def test_exclude_history_keeps_the_target():
    scores = torch.arange(6.0).expand(2, -1).clone()
    exclude_history(scores, [[1, 2], [5]], keep=torch.tensor([2, 0]))
    assert scores[0].tolist() == [0, float("-inf"), 2, 3, 4, 5] and scores[1, 5] == float("-inf")


@pytest.mark.parametrize("metric", ["ndcg@10", "full_ndcg@10"])
def test_speeder_is_selected_on_validation(tmp_path, metric):
    """The recipe evaluates the validation split every epoch through the Trainer, keeps the best checkpoint and serves
    it: the saved model's validation metric (NDCG@10 on the stored candidates, or on the whole catalog with the
    history excluded) is the best one logged, not the last."""
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.conversion.datasets import load_canonical
    from modeling_speeder.recipes import build_for_dataset, train

    tiny_dataset(tmp_path / "data")
    model, processor, splits = build_for_dataset(tmp_path / "data", expert_hidden_size=16, learned_id_dim=8)
    # A learning rate high enough that validation quality moves around, so best and last differ in most runs.
    report = train(model, processor, splits, tmp_path / "run", epochs=6, batch_size=4, learning_rate=3e-2, patience=0,
                   selection_metric=metric)
    evaluations = [e for e in report["log_history"] if "eval_ndcg@10" in e]
    key = f"eval_{metric}"
    # text + id features: the image stage is skipped, so the last stage starts after epoch 1.
    assert len(evaluations) == 5, "one validation pass per epoch of the last MPO stage (epochs 2 to 6)"
    last_stage_start = report["mpo_transitions"][-1][0]
    assert all(e["step"] > last_stage_start for e in evaluations), "only checkpoints that saw every modality compete"
    best = max(evaluations, key=lambda e: e[key])  # the first of equals, as the Trainer keeps it
    assert report["selection_metric"] == metric and report["best_validation_metric"] == pytest.approx(best[key])
    assert report["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    # Then the content-affinity weight is chosen on the same rows and metric: weight 0 is the selected checkpoint as
    # it was, and the served model scores what the chosen weight measured.
    affinity = report["content_affinity"]
    assert affinity["validation"][0.0] == pytest.approx(best[key], abs=1e-5)
    assert affinity["validation"][affinity["weight"]] == max(affinity["validation"].values())
    assert report["validation"][metric] == pytest.approx(affinity["validation"][affinity["weight"]], abs=1e-5)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["test"]["by_target_popularity"] and saved["test"]["by_history_length"]
    splits, *_ = load_canonical(tmp_path / "data")
    assert set(saved["test"]) >= {"full_hr@10", "full_no_exclusion_hr@10", "users"}


def test_speeder_stops_early_when_validation_stops_improving(tmp_path):
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.recipes import build_for_dataset, train

    tiny_dataset(tmp_path / "data")
    model, processor, splits = build_for_dataset(tmp_path / "data", expert_hidden_size=16, learned_id_dim=8)
    report = train(model, processor, splits, tmp_path / "run", epochs=40, batch_size=4, learning_rate=1e-12,
                   patience=2, mpo=False)  # no learning to speak of: validation never improves after the first evaluation
    evaluations = [e for e in report["log_history"] if "eval_ndcg@10" in e]
    assert len(evaluations) == 3 and report["epochs"] == pytest.approx(3, abs=0.01)


def test_sasrec_keeps_its_best_validation_epoch():
    from modeling_speeder.sasrec import evaluate_sasrec, train_sasrec

    sequences = [[(s + j) % 30 for j in range(8)] for s in range(30)]
    validation = ([seq[:-1] for seq in sequences], [seq[-1] for seq in sequences])
    model = train_sasrec([seq[:-1] for seq in sequences], num_items=30, epochs=12, batch_size=16, lr=5e-2,
                         hidden_size=16, max_length=5, dropout=0.0, validation=validation, patience=3)
    record = model.training_record
    scores = [e["validation_ndcg@10"] for e in record["epochs"]]
    assert record["best_epoch"] == int(np.argmax(scores)) + 1
    assert evaluate_sasrec(model, *validation)["full_ndcg@10"] == pytest.approx(max(scores))
    assert len(scores) == 12 or len(scores) - record["best_epoch"] == 3, "stops after `patience` epochs without gain"


def test_the_candidate_head_trains_on_a_checkpoint_trained_on_the_catalog_head_alone(tmp_path):
    """`speeder train --model <a default checkpoint> --head candidate` kept the saved candidate loss weight 0, so the
    candidate head never learned."""
    import torch
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.recipes import build_for_dataset, train

    tiny_dataset(tmp_path / "data")
    model, processor, splits = build_for_dataset(tmp_path / "data", expert_hidden_size=16, learned_id_dim=8)
    model.config.candidate_loss_weight, model.config.catalog_loss_weight = 0.0, 1.0  # as the default recipe saves it
    before = model.candidate_head.weight.detach().clone()
    # The weights after the steps, not the best checkpoint (which may be the first, before any update).
    train(model, processor, splits, tmp_path / "run", max_steps=3, batch_size=8, head="candidate", mpo=False,
          report_splits=(), patience=0, load_best_model_at_end=False)
    assert model.config.candidate_loss_weight == 1.0 and model.config.candidate_ranking_head == "candidate"
    assert not torch.equal(model.candidate_head.weight, before)


def test_distillation_adds_the_teachers_divergence_at_every_labelled_prefix(tmp_path):
    """The teacher reads the same (truncated) histories as the model and is asked about exactly the prefixes that carry
    a dense label, in the same order; the loss is the dense loss plus weight x KL(teacher || model) at temperature t
    (times t squared), normalised like the dense loss."""
    import torch.nn.functional as F
    from test_distributed_and_resume import tiny_dataset
    from transformers import TrainingArguments

    from modeling_speeder.processing.collator import SpeederDataCollator
    from modeling_speeder.recipes import build_for_dataset
    from modeling_speeder.sasrec import train_sasrec
    from modeling_speeder.training import SpeederTrainer

    tiny_dataset(tmp_path / "data")
    model, processor, splits = build_for_dataset(tmp_path / "data", expert_hidden_size=16, learned_id_dim=8,
                                                 item_dropout=0.0, catalog_id_dropout=0.0, max_history=4)
    model.config.candidate_loss_weight, model.config.catalog_loss_weight = 0.0, 1.0
    rows = dense_training_rows(splits, max_history=4, stride=2)
    assert any(r["first_labeled"] > 0 for r in rows.select(range(6))), "overlapping windows: context-only prefixes"
    index = {item: row for row, item in enumerate(processor.item_ids)}
    teacher = train_sasrec([[index[i] for i in h] for h in splits["validation"]["history"]], processor.num_items,
                           epochs=2, hidden_size=16, max_length=4)
    batch = SpeederDataCollator(processor, dense=True, candidates_in_prompt=False, distillation=True,
                                dense_labels_per_row=2.5)([rows[i] for i in range(6)])
    item_rows, positions, labels = batch["distillation_item_rows"], batch["distillation_positions"], batch["dense_catalog_labels"]
    following = []  # what followed each prefix the teacher is asked about, read from its own inputs
    for b, row in enumerate(rows.select(range(6))):
        sequence = item_rows[b][item_rows[b] >= 0].tolist() + [index[row["target"]]]
        following += [sequence[j + 1] for j in range(len(sequence) - 1) if positions[b, j]]
    assert following == labels[labels >= 0].tolist(), "the teacher's prefixes are the dense labels' prefixes, in order"

    args = TrainingArguments(str(tmp_path / "t"), report_to=[], use_cpu=True)
    trainer = SpeederTrainer(model=model, args=args, teacher=teacher, distillation_weight=0.5)
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    plain = {k: v for k, v in batch.items() if not k.startswith("distillation")}
    out = model(**plain)
    student = F.log_softmax(out.dense_catalog_scores, -1)
    target = F.log_softmax(teacher.next_item_logits(item_rows, positions), -1)
    divergence = (target.exp() * (target - student)).sum() / batch["dense_loss_normalizer"]
    assert divergence > 0 and float(loss) == pytest.approx(float(out.loss + 0.5 * divergence), rel=1e-5)
    assert float(trainer.compute_loss(model, dict(plain))) == pytest.approx(float(out.loss), rel=1e-6), "no teacher inputs"
    # Restricted to some items, both distributions are renormalised over those items only.
    keep = torch.arange(processor.num_items) % 3 != 0
    restricted = SpeederTrainer(model=model, args=args, teacher=teacher, distillation_weight=0.5, distillation_items=keep)
    student = F.log_softmax(out.dense_catalog_scores[:, keep], -1)
    target = F.log_softmax(teacher.next_item_logits(item_rows, positions)[:, keep], -1)
    divergence = (target.exp() * (target - student)).sum() / batch["dense_loss_normalizer"]
    assert float(restricted.compute_loss(model, dict(batch))) == pytest.approx(float(out.loss + 0.5 * divergence), rel=1e-5)
    with pytest.raises(ValueError, match="distillation_items"):
        SpeederTrainer(model=model, args=args, teacher=teacher, distillation_weight=0.5,
                       distillation_items=torch.zeros(processor.num_items, dtype=torch.bool))
    with pytest.raises(ValueError, match="distillation_weight"):
        SpeederTrainer(model=model, args=args, teacher=teacher, distillation_weight=-1.0)
    from modeling_speeder.recipes import train

    with pytest.raises(ValueError, match="catalog-dense"):
        train(model, processor, splits, tmp_path / "run", head="candidate", teacher=teacher, distillation_weight=1.0)
    with pytest.raises(ValueError, match="distillation_min_count"):
        train(model, processor, splits, tmp_path / "run", teacher=teacher, distillation_weight=1.0, distillation_min_count=-1)


def test_a_teacher_of_another_catalog_is_refused_before_training(tmp_path):
    """A SASRec of the same size over other item ids (or another order), or another model class, used to be accepted
    and distilled from with weight 1."""
    from conftest import make_tiny
    from modeling_speeder.cli import _distillation_teacher
    from modeling_speeder.processing.processing_speeder import catalog_fingerprint
    from modeling_speeder.recipes import check_teacher
    from modeling_speeder.sasrec import SASRecConfig, SASRecModel

    model, processor = make_tiny("llama")
    teacher = SASRecModel(SASRecConfig(num_items=processor.num_items, catalog_fingerprint=processor.catalog_fingerprint))
    check_teacher(teacher, processor)
    teacher.config.catalog_fingerprint = catalog_fingerprint(list(reversed(processor.item_ids)))
    with pytest.raises(ValueError, match="teacher's catalog .* differs from the model's"):
        check_teacher(teacher, processor)
    with pytest.raises(ValueError, match="catalog of 7 items, the model has 40"):
        check_teacher(SASRecModel(SASRecConfig(num_items=7)), processor)
    with pytest.raises(ValueError, match="must be the package's SASRecModel, got SpeederForSequentialRecommendation"):
        check_teacher(model, processor)
    model.save_pretrained(tmp_path / "speeder")
    args = type("Args", (), {"distillation_weight": 1.0, "head": "catalog-dense", "teacher": str(tmp_path / "speeder"),
                             "data": str(tmp_path)})()
    with pytest.raises(ValueError, match="a 'speeder' checkpoint, not a SASRec"):
        _distillation_teacher(args)
