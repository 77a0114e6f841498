"""The package's SASRec: learns a simple sequential pattern, saves and loads as safetensors."""

import torch

from modeling_speeder.sasrec import SASRecModel, evaluate_sasrec, train_sasrec


def test_sasrec_learns_and_round_trips(tmp_path):
    # Every user walks the catalog in steps of one: the next item is always the last one + 1.
    sequences = [[(s + j) % 30 for j in range(8)] for s in range(30)]
    model = train_sasrec(sequences, num_items=30, epochs=40, batch_size=16, lr=5e-3, hidden_size=32, max_length=10,
                         dropout=0.0)
    histories = [[(s + j) % 30 for j in range(5)] for s in range(30)]
    targets = [(s + 5) % 30 for s in range(30)]
    candidates = [[t, (t + 7) % 30, (t + 13) % 30] for t in targets]
    metrics = evaluate_sasrec(model, histories, targets, candidates)
    assert metrics["full_hr@10"] > 0.9 and metrics["hr@1"] > 0.9, metrics
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = SASRecModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.user_embeddings(histories), model.user_embeddings(histories))
    assert loaded.item_embeddings().shape == (30, 32)


def test_the_demo_s_sasrec_is_trained_once_per_key_and_loaded_after(tmp_path):
    from test_new_items import synthetic_splits

    from modeling_speeder.recipes import cached_sasrec_baseline

    splits, item_ids = synthetic_splits(users=30, items=40)
    kwargs = dict(epochs=2, seed=0, hidden_size=16, num_layers=1, num_heads=1)
    report, model, cached = cached_sasrec_baseline(tmp_path / "sasrec", {"data": "a"}, splits, item_ids, **kwargs)
    assert not cached and (tmp_path / "sasrec" / "model.safetensors").exists()
    again, loaded, cached = cached_sasrec_baseline(tmp_path / "sasrec", {"data": "a"}, splits, item_ids, **kwargs)
    assert cached and again["test"] == report["test"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    _, _, cached = cached_sasrec_baseline(tmp_path / "sasrec", {"data": "b"}, splits, item_ids, **kwargs)
    assert not cached
