"""The catalog head's content affinity: a weight x the cosine between the frozen text / image content of the latest
history item and of each scored item, at the query token and at every dense prefix alike, chosen on validation."""

import pytest
import torch
from datasets import Dataset

from conftest import BACKBONES, CANDIDATES, HISTORIES, ITEM_IDS, NUM_ITEMS, PROMPT_TEXT, TARGETS, make_tiny
from modeling_speeder import recipes
from modeling_speeder.conversion.build import add_items, build_speeder, make_word_tokenizer
from modeling_speeder.modeling_speeder import content_vectors


def affinity(content: torch.Tensor, anchors: torch.Tensor, weight: float) -> torch.Tensor:
    """(n, N) weight x cos(content of each anchor, content of every item), the anchor itself included."""
    return weight * content[anchors] @ content.T


def bank_content(model) -> torch.Tensor:
    """(N, D) content_vectors of the feature bank's text and image rows, computed here from the stored tensors."""
    mrc = model.mrc
    return content_vectors({m: getattr(mrc, f"features_{m}") for m in ("text", "image")},
                           {m: mrc.presence[:, mrc.modalities.index(m)] for m in ("text", "image")})


def test_the_processor_states_the_latest_history_item_at_every_token():
    _, processor = make_tiny("llama", tokens_per_item=2)
    for packed in (False, True):
        inputs = processor(histories=HISTORIES, packed=packed)
        latest, items = inputs["last_item_index"], inputs["item_token_index"]
        history_token = inputs["mm_token_type_ids"] == 1
        torch.testing.assert_close(latest[history_token], items[history_token] // 2)  # an item token: its own item
        last_rows = [processor.item_index(h[-1]) for h in HISTORIES]
        query_rows = torch.zeros_like(inputs["query_index"]) if packed else torch.arange(len(HISTORIES))
        assert latest[query_rows, inputs["query_index"]].tolist() == last_rows
        assert (latest[inputs["attention_mask"] == 0] == -1).all()  # padding
    # Candidates in the prompt are not history: their tokens keep the last history item.
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES)
    segments = inputs["candidate_segment_ids"] > 0
    expected = torch.tensor([processor.item_index(h[-1]) for h in HISTORIES])[:, None].expand_as(segments)
    assert (inputs["last_item_index"][segments] == expected[segments]).all()


@pytest.fixture
def model_and_processor():
    model, processor = make_tiny("llama", content_affinity=2.5, catalog_item_bias=True, candidate_loss_weight=0.0,
                                 catalog_loss_weight=1.0)
    with torch.no_grad():
        model.catalog_item_bias.weight.copy_(torch.randn(NUM_ITEMS, 1))
    return model, processor


def test_catalog_scores_add_the_weighted_content_cosine_of_the_latest_item(model_and_processor):
    model, processor = model_and_processor
    assert model.config.candidate_ranking_head == "catalog"
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES, candidates_in_prompt=False)
    with torch.no_grad():
        out = model(**inputs, return_catalog_scores=True)
        learned = model.query_proj(out.query_hidden_state) @ model.model.item_representations().T
        last = torch.tensor([processor.item_index(h[-1]) for h in HISTORIES])
        content = bank_content(model)
        expected = learned + model.catalog_item_bias.weight[:, 0] + affinity(content, last, 2.5)
    torch.testing.assert_close(out.catalog_scores, expected)
    torch.testing.assert_close(out.candidate_scores, expected.gather(1, inputs["candidate_item_index"]))
    # recommend() serves the same scores through catalog_query . catalog_item_vectors + bias, in catalog chunks,
    # with the history excluded or not.
    for exclude in (True, False):
        ranked = model.recommend(HISTORIES, top_k=3, processor=processor, exclude_history=exclude, chunk_size=7)
        for b, result in enumerate(ranked):
            allowed = expected[b].clone()
            if exclude:
                allowed[[processor.item_index(i) for i in HISTORIES[b]]] = float("-inf")
            assert [processor.item_index(i) for i in result["item_ids"]] == allowed.topk(3).indices.tolist()
            torch.testing.assert_close(torch.tensor(result["scores"]), allowed.topk(3).values)


def test_every_dense_prefix_compares_with_its_own_latest_item(model_and_processor):
    model, processor = model_and_processor
    model.config.item_dropout = model.config.catalog_id_dropout = 0.0
    inputs = processor(histories=HISTORIES, targets=TARGETS, dense=True)
    out = model.train()(**inputs)
    labels = inputs["dense_catalog_labels"]
    keep = labels >= 0
    with torch.no_grad():
        layout = {k: v for k, v in inputs.items() if k not in ("catalog_labels", "dense_catalog_labels")}
        states = model.model(**layout).last_hidden_state[keep]
        learned = model.query_proj(states) @ model.model.item_representations().T + model.catalog_item_bias.weight[:, 0]
        anchors = inputs["last_item_index"][keep]  # each labelled item's own row; at the query, the last history item
        content = bank_content(model)
    torch.testing.assert_close(out.dense_catalog_scores, learned + affinity(content, anchors, 2.5))


def test_a_new_item_with_the_latest_items_content_is_recommended_first(model_and_processor):
    """Planted content match: an item added after training, carrying the text and image of a history's latest item,
    reaches the top of that user's whole-catalog list through the affinity alone (no id, the median bias)."""
    model, processor = model_and_processor
    model.config.content_affinity = 50.0
    history = HISTORIES[0]
    latest = processor.item_index(history[-1])
    new_content = {m: getattr(model.mrc, f"features_{m}")[latest : latest + 1].clone() for m in ("text", "image")}
    presence = {m: model.mrc.presence[latest : latest + 1, model.mrc.modalities.index(m)] for m in ("text", "image")}
    add_items(model, processor, ["new-0"], new_content, presence)
    assert model.recommend([history], top_k=1, processor=processor)[0]["item_ids"] == ["new-0"]


def test_inputs_without_the_latest_items_are_refused(model_and_processor):
    model, processor = model_and_processor
    inputs = dict(processor(histories=HISTORIES))
    del inputs["last_item_index"]
    with pytest.raises(ValueError, match="last_item_index"):
        model(**inputs)


def test_the_weight_is_chosen_on_validation_by_the_selection_metric_and_scores_as_evaluated():
    """Validation rows whose target has the content of the history's latest item: the affinity must be chosen (> 0),
    and each weight's measured metric is what the evaluation reports with the model set to that weight."""
    model, processor = make_tiny("llama", candidate_loss_weight=0.0, catalog_loss_weight=1.0)
    features = {m: getattr(model.mrc, f"features_{m}") for m in ("text", "image")}
    with torch.no_grad():
        for h, target in zip(HISTORIES, TARGETS):  # plant: each target carries its history's latest item's content
            for x in features.values():
                x[processor.item_index(target)] = x[processor.item_index(h[-1])]
        model.mrc.presence[[processor.item_index(t) for t in TARGETS]] = model.mrc.presence[
            [processor.item_index(h[-1]) for h in HISTORIES]]
    rows = Dataset.from_dict({"user_id": ["a", "b", "c"], "history": HISTORIES, "target": TARGETS,
                              "candidates": CANDIDATES})
    measured = recipes.calibrate_content_affinity(model, processor, rows, "full_ndcg@10", batch_size=2)
    assert list(measured) == list(recipes.CONTENT_AFFINITY_WEIGHTS)
    chosen = model.config.content_affinity
    assert chosen > 0 and measured[chosen] == max(measured.values()) > measured[0.0]
    for weight in (0.0, chosen):
        model.config.content_affinity = weight
        report = recipes.evaluate_split(model, processor, rows)
        assert report["full_ndcg@10"] == pytest.approx(measured[weight], abs=1e-6)


def test_a_model_without_text_or_image_keeps_no_affinity():
    model, processor = build_speeder(BACKBONES["llama"](), make_word_tokenizer([PROMPT_TEXT]), ITEM_IDS, {},
                                     learned_id_dim=8, max_history=8, content_affinity=3.0)
    assert model.mrc.modalities == ("id",) and model.content_affinity == 0.0  # nothing to compare: no term
    rows = Dataset.from_dict({"user_id": ["a"], "history": HISTORIES[:1], "target": TARGETS[:1],
                              "candidates": CANDIDATES[:1]})
    assert recipes.calibrate_content_affinity(model, processor, rows, "full_ndcg@10") == {}
    assert model.config.content_affinity == 0.0
