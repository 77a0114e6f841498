"""Processor layout, SPAE positions, MRC gate masking and input validation."""

import pytest
import torch

from conftest import CANDIDATES, HISTORIES, ITEM_IDS, TARGETS, make_tiny
from modeling_speeder import SpeederProcessor
from modeling_speeder.conversion.build import make_word_tokenizer


def item_positions(inputs, row=0):
    hist = inputs["mm_token_type_ids"][row] == 1
    return inputs["position_ids"][row][hist]


@pytest.mark.parametrize("k", [1, 3])
def test_item_position_gap_is_one_whatever_the_text(k):
    """SPAE: longer prompt text shifts every position but never changes the gap between adjacent items."""
    gaps = []
    for prefix in ["short", "a much longer prompt prefix with many more words in it than before"]:
        tok = make_word_tokenizer([prefix, "next"])
        proc = SpeederProcessor(tok, item_ids=ITEM_IDS, tokens_per_item=k, max_history=8, prompt_prefix=prefix)
        inputs = proc(histories=[["item1", "item2", "item3"]], candidates=[["item4", "item5"]])
        hist_pos = item_positions(inputs)
        assert len(hist_pos) == 3 * k
        starts = hist_pos[::k]
        assert torch.equal(hist_pos.view(3, k), starts[:, None].expand(3, k)), "the K tokens of an item share one id"
        gaps.append(torch.diff(starts).tolist())
        cand_pos = inputs["position_ids"][0, -2 * k :]
        assert (cand_pos == cand_pos[0]).all(), "all candidates share one position id"
    assert gaps == [[1, 1], [1, 1]]


def test_token_level_positions_when_spae_off():
    tok = make_word_tokenizer(["x"])
    proc = SpeederProcessor(tok, item_ids=ITEM_IDS, tokens_per_item=2, item_level_position_ids=False)
    inputs = proc(histories=[["item1", "item2"]])
    pos = inputs["position_ids"][0]
    assert torch.equal(pos, torch.arange(len(pos)))


def test_left_padding_and_truncation():
    _, proc = make_tiny("llama")  # max_history = 8
    long_history = [f"item{i}" for i in range(12)]
    inputs = proc(histories=[long_history, ["item1"]], candidates=[["item20", "item21"], ["item22", "item23"]])
    assert inputs["attention_mask"][1, 0] == 0 and inputs["attention_mask"][:, -1].all(), "left padded"
    history = inputs["mm_token_type_ids"][0] == 1
    assert inputs["item_token_index"][0][history].tolist() == list(range(4, 12)), "the most recent items are kept"
    assert inputs["recency_index"][0][history].tolist() == list(range(7, -1, -1)), "recency counts back from the last"
    assert (inputs["recency_index"][0][~history] == -1).all(), "only history items have a recency"


def test_right_padding_states_the_same_layout(tmp_path):
    """padding_side="right" (per call, or the processor's saved default) moves the padding after each prompt and every
    stated index with it; the tokens and their layout are those of the left-padded batch."""
    _, proc = make_tiny("llama", tokens_per_item=2)
    left = proc(histories=HISTORIES, candidates=CANDIDATES, targets=TARGETS)
    right = proc(histories=HISTORIES, candidates=CANDIDATES, targets=TARGETS, padding_side="right")
    assert right["attention_mask"][:, 0].all() and not right["attention_mask"][:, -1].all(), "right padded"
    padding = (left["attention_mask"] == 0).sum(1)
    for b in range(len(HISTORIES)):
        real_left, real_right = left["attention_mask"][b] == 1, right["attention_mask"][b] == 1
        for key in ("input_ids", "position_ids", "item_token_index", "recency_index", "last_item_index",
                    "mm_token_type_ids", "candidate_segment_ids"):
            assert torch.equal(right[key][b][real_right], left[key][b][real_left]), key
    assert torch.equal(right["query_index"], left["query_index"] - padding)
    assert torch.equal(right["candidate_token_index"], left["candidate_token_index"] - padding[:, None])
    for key in ("labels", "catalog_labels", "candidate_item_index"):
        assert torch.equal(right[key], left[key]), key
    proc.padding_side = "right"
    proc.save_pretrained(tmp_path)
    reloaded = SpeederProcessor.from_pretrained(tmp_path)
    assert reloaded.padding_side == "right"
    assert torch.equal(reloaded(histories=HISTORIES, candidates=CANDIDATES)["input_ids"], right["input_ids"])
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        proc(histories=HISTORIES, padding_side="middle")


def test_labels():
    _, proc = make_tiny("llama")
    inputs = proc(histories=HISTORIES, candidates=CANDIDATES, targets=TARGETS)
    assert inputs["labels"].tolist() == [1, 3, 0]
    assert inputs["catalog_labels"].tolist() == [21, 26, 27]


def test_recency_embedding_makes_order_matter():
    """SPAE absolute order: with the same items and positions, the recency embedding alone changes the scores when
    the order of the history changes; without it (zeroed) the recency indices have no effect."""
    model, proc = make_tiny("llama")
    inputs = proc(histories=[["item1", "item2", "item3"]], candidates=[["item4", "item5", "item6"]])
    swapped = dict(inputs)
    swapped["recency_index"] = inputs["recency_index"].clone()
    hist = inputs["mm_token_type_ids"] == 1
    swapped["recency_index"][hist] = inputs["recency_index"][hist].flip(0)
    with torch.no_grad():
        a, b = model(**inputs).candidate_scores, model(**swapped).candidate_scores
        assert not torch.allclose(a, b, atol=1e-6)
        model.model.recency_embedding.weight.zero_()
        a, b = model(**inputs).candidate_scores, model(**swapped).candidate_scores
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_image_goes_through_gate_mask():
    model, _ = make_tiny("llama")
    presence = model.mrc.presence
    image = model.mrc.modalities.index("image")
    missing = (~presence[:, image]).nonzero().flatten()
    assert len(missing), "fixture has items without an image"
    rows = torch.arange(model.config.num_items)
    with torch.no_grad():
        tokens, weights = model.mrc(rows, model.active_modalities)
        assert torch.isfinite(tokens).all()
        assert (weights[missing, image] == 0).all() and (weights[presence[:, image], image] > 0).all()
        # Garbage in an absent item's image row cannot change its tokens.
        model.mrc.features_image[missing] = 1e3
        tokens_after, _ = model.mrc(rows, model.active_modalities)
    torch.testing.assert_close(tokens_after[missing], tokens[missing])


def test_active_modalities_restrict_the_gate():
    model, _ = make_tiny("llama")
    model.set_active_modalities(["text"])
    with torch.no_grad():
        _, weights = model.mrc(torch.arange(model.config.num_items), model.active_modalities)
    assert torch.equal(weights[:, 0], torch.ones(model.config.num_items))
    with pytest.raises(ValueError, match="Unknown modalities"):
        model.set_active_modalities(["audio"])


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(histories=[["item1", "nope"]]), "Unknown item id 'nope'"),
        (dict(histories=[[]]), "History 0 is empty"),
        (dict(histories=[["item1"]], candidates=[[]]), "Candidate list 0 is empty"),
        (dict(histories=[["item1"]], candidates=[["item2", "item3", "item2"]]), r"duplicate items \['item2'\]"),
        (dict(histories=[["item1"]], candidates=[["item2", "item3"]], targets=["item4"]), "Target 'item4' of row 0 is not among"),
        (dict(histories=["item1", "item2"]), "list of histories"),
    ],
)
@pytest.mark.parametrize("in_prompt", [True, False], ids=["candidate-head", "catalog-head"])
def test_processor_errors(call, message, in_prompt):
    """One validation for both heads: candidates ranked by the catalog head (not in the prompt) are checked too."""
    _, proc = make_tiny("llama")
    with pytest.raises(ValueError, match=message):
        proc(**call, candidates_in_prompt=in_prompt)


def test_duplicate_catalog_ids_rejected():
    with pytest.raises(ValueError, match=r"Duplicate item ids in the catalog: \['a'\]"):
        SpeederProcessor(make_word_tokenizer(["x"]), item_ids=["a", "b", "a"])


def test_catalog_mismatch_errors():
    model, proc = make_tiny("llama")
    smaller = SpeederProcessor(make_word_tokenizer(["x"]), item_ids=ITEM_IDS[:-1])
    with pytest.raises(ValueError, match="catalog has 39 items but this checkpoint was built for 40"):
        model.recommend([["item1"]], processor=smaller)
    reordered = SpeederProcessor(make_word_tokenizer(["x"]), item_ids=list(reversed(ITEM_IDS)))
    with pytest.raises(ValueError, match="differs from this checkpoint"):
        model.recommend([["item1"]], processor=reordered)
    bigger = SpeederProcessor(proc.tokenizer, item_ids=ITEM_IDS + ["extra"])
    with pytest.raises(RuntimeError, match="outside this checkpoint's catalog"):
        model(**bigger(histories=[["extra"]]))


def test_placeholder_count_checked():
    model, proc = make_tiny("llama")
    inputs = proc(histories=[["item1", "item2"]], candidates=[["item3", "item4"]])
    inputs["item_token_index"][0, -1] = -1
    with pytest.raises(RuntimeError, match="item placeholder tokens"):
        model(**inputs)


def test_bad_features_rejected():
    model, _ = make_tiny("llama")
    n = model.config.num_items
    text = torch.randn(n, 24)
    text[[3, 7]] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in rows \[3, 7\]"):
        model.set_item_features({"text": text, "image": torch.randn(n, 16)})
    with pytest.raises(ValueError, match=r"shape \(40, 5\); this checkpoint expects \(40, 24\)"):
        model.set_item_features({"text": torch.randn(n, 5), "image": torch.randn(n, 16)})
    with pytest.raises(ValueError, match=r"missing \['image'\]"):
        model.set_item_features({"text": torch.randn(n, 24)})
    # NaN in an absent image row is fine: it is never read.
    image = torch.randn(n, 16)
    image[0] = float("nan")
    present = torch.ones(n, dtype=torch.bool)
    present[0] = False
    model.set_item_features({"text": torch.randn(n, 24), "image": image}, {"image": present})


def test_recommend_catalog_excludes_history():
    model, proc = make_tiny("llama")
    history = [f"item{i}" for i in range(30)]
    recs = model.recommend([history], processor=proc, top_k=10)[0]
    assert len(recs["item_ids"]) == 10 and not set(recs["item_ids"]) & set(history)
    assert recs["scores"] == sorted(recs["scores"], reverse=True)
    with_history = model.recommend([history], processor=proc, top_k=40, exclude_history=False)[0]
    assert len(with_history["item_ids"]) == 40


def test_chunked_catalog_topk_equals_full():
    """recommend() ranks the catalog in chunks (memory O(B x chunk)); the result is the full top-k."""
    model, proc = make_tiny("llama")
    with torch.no_grad():
        full = model(**proc(histories=HISTORIES), return_catalog_scores=True).catalog_scores.topk(7, dim=-1)
    chunked = model.recommend(HISTORIES, top_k=7, processor=proc, exclude_history=False, chunk_size=6)
    assert [r["item_ids"] for r in chunked] == [proc.item_ids_of(rows) for rows in full.indices.tolist()]
    torch.testing.assert_close(torch.tensor([r["scores"] for r in chunked]), full.values)


def test_item_cache_survives_eval_and_is_dropped_for_training():
    model, proc = make_tiny("llama")
    model.recommend([["item1"]], processor=proc)
    cache = model.cache_item_tokens()
    model.recommend([["item2"]], processor=proc)
    assert model.item_cache_is_current(), "recommend() must not re-encode the catalog on every call"
    model.train()
    assert not model.item_cache_is_current()
    model.eval()
    model.cache_item_tokens()
    model.set_active_modalities(["text"])
    assert not model.item_cache_is_current()
    assert cache is not None


def test_item_cache_follows_weights_device_and_dtype():
    """recommend(), then new weights loaded in eval mode, must rank with the new weights; a dtype change after
    recommend() must not crash on a stale float32 cache."""
    model, proc = make_tiny("llama")
    other, _ = make_tiny("llama", seed=1)
    before = model.recommend(HISTORIES, top_k=5, processor=proc)
    model.load_state_dict(other.state_dict())
    assert model.recommend(HISTORIES, top_k=5, processor=proc) == other.recommend(HISTORIES, top_k=5, processor=proc)
    assert before != other.recommend(HISTORIES, top_k=5, processor=proc), "the two models must rank differently"
    model.to(torch.bfloat16)
    ranked = model.recommend(HISTORIES, top_k=5, processor=proc)
    assert len(ranked) == len(HISTORIES) and all(len(r["item_ids"]) == 5 for r in ranked)


def test_configs_of_removed_options_load_only_with_the_value_that_was_kept():
    """Options that lost their experiments were deleted; a config saved while they existed loads when it holds their
    off value (dropped, not saved again), and is refused, naming the option, when it turned one on."""
    from modeling_speeder import SpeederConfig

    config = SpeederConfig(num_items=3, item_residual_embedding=False, feature_normalization="item")
    assert "item_residual_embedding" not in config.to_dict() and "feature_normalization" not in config.to_dict()
    for name, value in (("item_residual_embedding", True), ("catalog_item_embedding", True),
                        ("feature_normalization", "catalog")):
        with pytest.raises(ValueError, match=f"sets {name}={value!r}, an option removed"):
            SpeederConfig(num_items=3, **{name: value})


def test_item_cache_follows_edits_through_data():
    """The EMA idiom edits weights through `.data`, which bumps no version counter: recommend() used the old cache."""
    model, proc = make_tiny("llama")
    before = model.recommend(HISTORIES, top_k=5, processor=proc)
    generator = torch.Generator().manual_seed(0)
    for parameter in model.mrc.parameters():
        parameter.data.add_(torch.randn(parameter.shape, generator=generator))
    expected = model.model.mrc(torch.arange(model.config.num_items), model.model.active_modalities)[0].mean(1)
    assert before != model.recommend(HISTORIES, top_k=5, processor=proc)
    torch.testing.assert_close(model.model.item_representations(), expected)



@pytest.mark.parametrize("layout", ["left", "right", "packed"])
def test_the_token_type_map_states_what_each_token_is(layout):
    """`mm_token_type_ids`: 0 text (padding too), 1 history item, 2 candidate, agreeing with the placeholders, the
    candidates' segments and the recency indices, on either padding side and packed."""
    _, proc = make_tiny("llama", tokens_per_item=2)
    if layout == "packed":
        inputs = proc(histories=HISTORIES, packed=True)
    else:
        inputs = proc(histories=HISTORIES, candidates=CANDIDATES, padding_side=layout)
    types = inputs["mm_token_type_ids"]
    assert set(types.unique().tolist()) <= {0, 1, 2}
    assert torch.equal(types > 0, inputs["item_token_index"] >= 0), "item tokens are the placeholders"
    assert torch.equal(types == 1, inputs["recency_index"] >= 0), "history items, and only they, have a recency"
    assert (types[inputs["attention_mask"] == 0] == 0).all()
    if layout != "packed":
        assert torch.equal(types == 2, inputs["candidate_segment_ids"] > 0), "candidates are their segments"
        history_lengths = [min(len(h), proc.max_history) * proc.tokens_per_item for h in HISTORIES]
        assert (types == 1).sum(1).tolist() == history_lengths


def test_candidates_share_the_spae_row_after_the_recencies():
    """The model reads the map: a candidate token gets the SPAE row after the recencies, a history item the row of
    its recency; the map is required and must agree with the placeholders."""
    model, proc = make_tiny("llama")
    model.eval()
    inputs = proc(histories=HISTORIES, candidates=CANDIDATES)
    layout = {k: inputs[k] for k in ("input_ids", "item_token_index", "recency_index", "mm_token_type_ids")}
    table = model.model.recency_embedding.weight.detach().clone()
    with torch.no_grad():
        embeds = model.model.embed_prompt(**layout, modality_mask=None, example_of_token=None)
        model.model.recency_embedding.weight.zero_()
        spae = embeds - model.model.embed_prompt(**layout, modality_mask=None, example_of_token=None)
    candidate, history = inputs["mm_token_type_ids"] == 2, inputs["mm_token_type_ids"] == 1
    assert candidate.any() and history.any()
    torch.testing.assert_close(spae[candidate], table[model.config.max_history].expand(int(candidate.sum()), -1))
    torch.testing.assert_close(spae[history], table[inputs["recency_index"][history]])
    missing = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match=r"missing \['mm_token_type_ids'\]"):
        model(**missing)
    wrong = dict(inputs, mm_token_type_ids=torch.zeros_like(inputs["mm_token_type_ids"]))
    with pytest.raises(RuntimeError, match="mm_token_type_ids disagree"):
        model(**wrong)


@pytest.mark.parametrize("head", ["candidate", "catalog"])
def test_candidate_sets_of_different_sizes_share_a_batch(head):
    """A shorter candidate set is padded to the batch's largest, its padded slots stated as catalog row -1 and scored
    -inf; every real candidate scores as it does in a batch of its own, on both candidate paths, and the loss is
    finite."""
    model, proc = make_tiny("llama", tokens_per_item=2, candidate_ranking_head=head, catalog_loss_weight=1.0)
    model.eval()
    histories, candidates = [["item1", "item2"], ["item3"], ["item9"]], [["item4", "item5", "item6"], ["item7"],
                                                                        ["item8", "item10"]]
    in_prompt = head == "candidate"
    batch = proc(histories=histories, candidates=candidates, targets=["item5", "item7", "item10"],
                 candidates_in_prompt=in_prompt)
    assert batch["candidate_item_index"].tolist() == [[4, 5, 6], [7, -1, -1], [8, 10, -1]]
    assert batch["labels"].tolist() == [1, 0, 1]
    paths = ("mask", "prefix_cache") if in_prompt else ("auto",)
    with torch.no_grad():
        for path in paths:
            out = model(**batch, candidate_scoring=path)
            assert torch.isfinite(out.loss)
            for b, (history, items) in enumerate(zip(histories, candidates)):
                alone = model(**proc(histories=[history], candidates=[items], candidates_in_prompt=in_prompt),
                              candidate_scoring=path).candidate_scores[0]
                torch.testing.assert_close(out.candidate_scores[b, : len(items)], alone, rtol=0, atol=1e-5)
                assert torch.isneginf(out.candidate_scores[b, len(items) :]).all()
    ranked = model.recommend(histories, candidates, top_k=3, processor=proc)
    assert [len(r["item_ids"]) for r in ranked] == [3, 1, 2] and ranked[1]["item_ids"] == ["item7"]
