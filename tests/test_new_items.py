"""The new-item protocol's split (no held-out item reaches training) and the content kNN baseline."""

import numpy as np
import pytest
import torch

from modeling_speeder.conversion.datasets import hold_out_items, leave_one_out
from modeling_speeder.evaluation import content_knn_baseline, content_knn_scores
from modeling_speeder.modeling_speeder import content_vectors


def synthetic_splits(users=60, items=80, seed=0):
    rng = np.random.default_rng(seed)
    item_ids = [f"i{j}" for j in range(items)]
    sequences = {f"u{u}": [item_ids[j] for j in rng.choice(items, size=rng.integers(4, 12), replace=False)]
                 for u in range(users)}
    return leave_one_out(sequences, item_ids, seed=seed), item_ids


def test_held_out_items_reach_no_training_row_and_the_test_split_keeps_its_targets():
    splits, item_ids = synthetic_splits()
    known, known_ids, held_ids, protocol = hold_out_items(splits, item_ids, share=0.1, seed=3)
    test = protocol["test"]
    held = set(held_ids)
    assert len(held_ids) == 8 and not held & set(known_ids) and set(known_ids) | held == set(item_ids)
    for split in ("train", "validation", "test"):  # no held-out item as a target, history item or candidate
        rows = known[split]
        assert not held & {*rows["target"], *(i for h in rows["history"] for i in h),
                           *(c for cs in rows["candidates"] for c in cs)}
    # No original validation or test target of a user is a training target or training-history item of that user.
    training = {}
    for user, history, target in zip(known["train"]["user_id"], known["train"]["history"], known["train"]["target"]):
        training.setdefault(user, set()).update([*history, target])
    for split in ("validation", "test"):
        for user, target in zip(splits[split]["user_id"], splits[split]["target"]):
            assert target not in training.get(user, set())
    # The protocol's test rows: original targets and candidates, histories without held-out items.
    original = {u: (t, c) for u, t, c in zip(splits["test"]["user_id"], splits["test"]["target"], splits["test"]["candidates"])}
    assert all(original[u] == (t, c) for u, t, c in zip(test["user_id"], test["target"], test["candidates"]))
    assert not held & {i for split in ("validation", "test") for h in protocol[split]["history"] for i in h}
    assert protocol["validation"]["target"] == [t for t, h in zip(splits["validation"]["target"],
                                                                  splits["validation"]["history"]) if set(h) - held]
    assert any(t in held for t in test["target"]), "the new-item set must not be empty on this example"
    again = hold_out_items(splits, item_ids, share=0.1, seed=3)
    assert again[2] == held_ids and again[0]["validation"]["candidates"] == known["validation"]["candidates"]
    with pytest.raises(ValueError, match="share must be in"):
        hold_out_items(splits, item_ids, share=1.0)


def test_content_knn_ranks_by_cosine_to_the_recent_history():
    """Hand-made: four items on two axes; a user whose recent items lie on the x axis gets the x-axis item first."""
    features = {"text": torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [5.0, 0.2]])}
    presence = {"text": torch.tensor([True, True, True, True, True])}
    vectors = content_vectors(features, presence)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(5))
    scores = content_knn_scores(vectors, [[2, 0]], last=1)  # only the most recent item (0) counts
    assert scores[0].argsort(descending=True)[:3].tolist() == [0, 4, 1]
    both = content_knn_scores(vectors, [[2, 0]], last=2)  # the mean of 0 and 2: items 1 and 3 tie with 0 and 2
    torch.testing.assert_close(both[0, 0], both[0, 2])
    report = content_knn_baseline(vectors, [[2, 0]], [4], [[3, 4, 1]], np.zeros(5), last=1)
    assert report["hr@1"] == 1.0 and report["full_hr@10"] == 1.0  # 0 and 2 excluded: item 4 is first


def test_content_vectors_weigh_modalities_alike_and_zero_absent_ones():
    features = {"text": torch.tensor([[3.0, 4.0], [3.0, 4.0]]), "image": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    presence = {"image": torch.tensor([True, False])}
    vectors = content_vectors(features, presence)
    torch.testing.assert_close(vectors[1], torch.tensor([0.0, 0.0, 0.6, 0.8]))  # image absent: text only
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1 / 2**0.5)  # same text, image missing on one side
