"""New items added to a trained checkpoint without retraining: scored from content, checked before anything changes,
saved as one atomic folder that reloads bit-identically, through the API and `speeder add-items`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import HISTORIES, NUM_ITEMS, make_tiny
from modeling_speeder.conversion.build import add_items, save_checkpoint


def content_of(model, row: int) -> dict:
    """The stored text and image features of a catalog row, as new-item features."""
    return {m: getattr(model.mrc, f"features_{m}")[row : row + 1].clone() for m in ("text", "image")}


def test_a_new_item_with_the_content_of_the_top_item_is_scored_like_it():
    """Planted content match: a new item (no `id`) carrying the text and image of a history's top recommendation gets
    exactly its score when that item's `id` is absent too (the gate reads every present modality), so both lead."""
    model, processor = make_tiny("llama", catalog_item_bias=True)
    with torch.no_grad():
        model.mrc.presence[:, model.mrc.modalities.index("id")] = False
    image_rows = model.mrc.presence[:, model.mrc.modalities.index("image")].nonzero().flatten().tolist()
    history = HISTORIES[0]
    ranked = model.recommend([history], top_k=NUM_ITEMS, processor=processor)[0]
    top = next(i for i in ranked["item_ids"] if processor.item_index(i) in image_rows)
    add_items(model, processor, ["new-0"], content_of(model, processor.item_index(top)))
    after = model.recommend([history], top_k=NUM_ITEMS + 1, processor=processor)[0]
    scores = dict(zip(after["item_ids"], after["scores"]))
    assert scores["new-0"] == pytest.approx(scores[top], abs=1e-5)
    assert after["item_ids"].index("new-0") <= after["item_ids"].index(top) + 1
    assert model.config.num_items == processor.num_items == NUM_ITEMS + 1
    model.check_processor(processor)  # the fingerprint followed


def test_new_items_get_the_median_bias_no_id_and_untouched_old_rows():
    model, processor = make_tiny("llama", catalog_item_bias=True)
    with torch.no_grad():
        model.catalog_item_bias.weight.copy_(torch.arange(NUM_ITEMS, dtype=torch.float32)[:, None])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = torch.randn(3, model.config.feature_dims["text"])
    add_items(model, processor, ["a", "b", "c"], {"text": text})
    assert model.catalog_item_bias.weight[NUM_ITEMS:, 0].tolist() == [float(torch.arange(NUM_ITEMS).float().median())] * 3
    presence = model.mrc.presence[NUM_ITEMS:]
    assert presence[:, model.mrc.modalities.index("text")].all() and not presence[:, 1:].any()
    torch.testing.assert_close(model.mrc.features_text[NUM_ITEMS:], text)
    for name, old in before.items():
        torch.testing.assert_close(model.state_dict()[name][: old.shape[0]], old)
    assert model.mrc.id_embedding.weight.shape[0] == NUM_ITEMS + 3
    assert all(p.requires_grad for p in (model.mrc.id_embedding.weight, model.catalog_item_bias.weight))


@pytest.mark.parametrize(
    "ids,features,presence,message",
    [
        (["item3"], {"text": torch.randn(1, 24)}, None, r"already in the catalog or repeated: \['item3'\]"),
        (["x", "x"], {"text": torch.randn(2, 24)}, None, r"repeated: \['x'\]"),
        (["x"], {"text": torch.randn(1, 23)}, None, r"shape \(1, 23\); this checkpoint expects \(1, 24\)"),
        (["x"], {"text": torch.full((1, 24), float("nan"))}, None, "NaN or inf in rows"),
        (["x"], {"text": torch.randn(1, 24)}, {"text": torch.tensor([False])}, "no modality present"),
        (["x"], {"text": torch.randn(1, 24)}, {"image": torch.tensor([True])}, "can be True only where features"),
        (["x"], {"colour": torch.randn(1, 24)}, None, r"some of \['text', 'image'\]"),
        (["x", "y"], {"text": torch.randn(1, 24)}, None, r"2 new item ids but features with \[1\] rows"),
        ([], {}, None, "features with"),
    ],
)
def test_bad_new_items_are_refused_and_change_nothing(ids, features, presence, message):
    model, processor = make_tiny("llama", catalog_item_bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        add_items(model, processor, ids, features, presence)
    assert processor.num_items == model.config.num_items == NUM_ITEMS and processor.item_ids[-1] == f"item{NUM_ITEMS - 1}"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_checkpoint_with_added_items_reloads_bit_identically(tmp_path):
    from transformers import AutoModel, AutoProcessor, pipeline

    model, processor = make_tiny("llama", catalog_item_bias=True)
    save_checkpoint(model, processor, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "README.md").write_text("card")
    add_items(model, processor, ["new-0", "new-1"], {"text": torch.randn(2, 24), "image": torch.randn(2, 16)})
    save_checkpoint(model, processor, tmp_path / "ckpt", carry_from=tmp_path / "ckpt")
    loaded, loaded_processor = AutoModel.from_pretrained(tmp_path / "ckpt"), AutoProcessor.from_pretrained(tmp_path / "ckpt")
    assert loaded_processor.item_ids == processor.item_ids and loaded.config.num_items == NUM_ITEMS + 2
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)
    assert (tmp_path / "ckpt" / "README.md").read_text() == "card"
    expected = model.recommend(HISTORIES, top_k=NUM_ITEMS + 2, processor=processor)
    assert loaded.recommend(HISTORIES, top_k=NUM_ITEMS + 2) == expected
    recommender = pipeline("sequential-recommendation", model=str(tmp_path / "ckpt"))
    assert recommender(HISTORIES[0], top_k=NUM_ITEMS + 2)["item_ids"] == expected[0]["item_ids"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "lock" not in p.name]


def tiny_text_encoder(path, width=24):
    """A random BERT of the catalog's text width with a word tokenizer: `speeder add-items` encodes with it as it
    would with all-MiniLM-L6-v2."""
    from transformers import BertConfig, BertModel

    from modeling_speeder.conversion.build import make_word_tokenizer

    tokenizer = make_word_tokenizer(["a red lamp", "a blue chair", "a green pen"])
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_the_add_items_command_extends_a_checkpoint_and_refuses_bad_input_without_a_trace(tmp_path):
    from transformers import AutoModel

    from modeling_speeder.cli import run

    model, processor = make_tiny("llama")
    save_checkpoint(model, processor, tmp_path / "ckpt")
    encoder = tiny_text_encoder(tmp_path / "encoder")
    items = tmp_path / "new.jsonl"
    items.write_text("".join(json.dumps(row) + "\n" for row in [{"item_id": "lamp", "title": "a red lamp"},
                                                                {"item_id": "pen", "text": "a green pen"}]))
    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir() if p.is_file()}
    wide_encoder = tiny_text_encoder(tmp_path / "wide", width=32)
    with pytest.raises(ValueError, match=r"shape \(2, 32\); this checkpoint expects \(2, 24\)"):
        run(["add-items", "--model", str(tmp_path / "ckpt"), "--items", str(items), "--text-encoder", wide_encoder])
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir() if p.is_file()} == snapshot
    run(["add-items", "--model", str(tmp_path / "ckpt"), "--items", str(items), "--text-encoder", encoder])
    loaded = AutoModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.num_items == NUM_ITEMS + 2
    assert "lamp" in {i for r in loaded.recommend(HISTORIES, top_k=NUM_ITEMS + 2) for i in r["item_ids"]}
    with pytest.raises(ValueError, match=r"already in the catalog or repeated: \['lamp', 'pen'\]"):
        run(["add-items", "--model", str(tmp_path / "ckpt"), "--items", str(items), "--text-encoder", encoder])


def test_catalog_id_dropout_scores_some_items_as_new_items_while_training_only():
    """With catalog_id_dropout, the catalog head's item vectors are computed, for a share of items, as a new item's
    are (no `id`, the gate not reading it); never for an item whose only modality is `id`, and never at inference."""
    model, _ = make_tiny("llama")
    model.config.catalog_id_dropout = 0.999
    rows = torch.arange(NUM_ITEMS)
    j = model.mrc.modalities.index("id")
    with torch.no_grad():
        model.mrc.presence[0] = False
        model.mrc.presence[0, j] = True  # item 0 has only its id
        hidden = torch.zeros(NUM_ITEMS, len(model.mrc.modalities), dtype=torch.bool)
        hidden[1:, j] = True
        as_new = model.mrc(rows, model.model.active_modalities, hidden)[0].mean(1)
        with_id = model.mrc(rows, model.model.active_modalities)[0].mean(1)
        model.train()
        torch.manual_seed(0)
        training = model.model.item_representations()
        model.eval()
        inference = model.model.item_representations()
    assert (training[1:] - as_new[1:]).abs().max() < 1e-6 and not torch.allclose(as_new[1:], with_id[1:])
    torch.testing.assert_close(training[0], with_id[0])
    torch.testing.assert_close(inference, with_id)
    with pytest.raises(ValueError, match="catalog_id_dropout must be in"):
        make_tiny("llama", catalog_id_dropout=1.0)
