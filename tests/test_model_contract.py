"""Contract tests run on every backbone family: the same guarantees whatever the LLM underneath."""

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from conftest import CANDIDATES, HISTORIES, TARGETS, make_tiny
from modeling_speeder import SpeederForSequentialRecommendation, SpeederProcessor, SpeederRecommendationOutput


def test_forward_backward(family):
    model, processor = make_tiny(family)
    model.train()
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES, targets=TARGETS)
    out = model(**inputs)
    assert isinstance(out, SpeederRecommendationOutput)
    assert out.candidate_scores.shape == (3, 4) and torch.isfinite(out.candidate_scores).all()
    out.loss.backward()
    for name in ["model.mrc.experts.text.1.weight", "model.mrc.experts.image.1.weight", "model.mrc.gate.weight",
                 "model.mrc.id_embedding.weight", "model.recency_embedding.weight", "candidate_head.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_catalog_head_loss_and_scores(family):
    model, processor = make_tiny(family, catalog_loss_weight=1.0, candidate_loss_weight=0.0)
    inputs = processor(histories=HISTORIES, targets=TARGETS)
    out = model(**inputs, return_catalog_scores=True)
    assert out.candidate_scores is None
    assert out.catalog_scores.shape == (3, model.config.num_items)
    expected = torch.nn.functional.cross_entropy(out.catalog_scores, inputs["catalog_labels"])
    torch.testing.assert_close(out.loss, expected)


def test_save_load_round_trip(family, tmp_path):
    model, processor = make_tiny(family)
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES)
    with torch.no_grad():
        before = model(**inputs).candidate_scores
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SpeederForSequentialRecommendation and type(loaded_processor) is SpeederProcessor
    assert loaded_processor.item_ids == processor.item_ids
    with torch.no_grad():
        after = loaded(**loaded_processor(histories=HISTORIES, candidates=CANDIDATES)).candidate_scores
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert torch.equal(loaded.mrc.presence, model.mrc.presence)
    # Non-persistent state is re-initialised, not left as whatever memory from_pretrained allocated.
    assert loaded.model.modality_keep_prob.tolist() == [1.0, 1.0, 1.0]
    assert loaded.recommend(HISTORIES, top_k=5) == model.recommend(HISTORIES, processor=processor, top_k=5)


def test_candidate_permutation_equivariance(family):
    model, processor = make_tiny(family)
    perm = [2, 0, 3, 1]
    permuted = [[c[p] for p in perm] for c in CANDIDATES]
    with torch.no_grad():
        scores = model(**processor(histories=HISTORIES, candidates=CANDIDATES)).candidate_scores
        permuted_scores = model(**processor(histories=HISTORIES, candidates=permuted)).candidate_scores
    torch.testing.assert_close(permuted_scores, scores[:, perm], rtol=0, atol=1e-5)


def test_candidates_do_not_see_each_other(family):
    """Replacing one candidate leaves the other candidates' scores unchanged."""
    model, processor = make_tiny(family)
    changed = [c[:-1] + ["item35"] for c in CANDIDATES]
    with torch.no_grad():
        a = model(**processor(histories=HISTORIES, candidates=CANDIDATES)).candidate_scores
        b = model(**processor(histories=HISTORIES, candidates=changed)).candidate_scores
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_eager_equals_sdpa_with_padding(family):
    model, processor = make_tiny(family, attn_implementation="eager")
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES)
    assert (inputs["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        eager = model(**inputs).candidate_scores
        model.set_attn_implementation("sdpa")
        sdpa = model(**inputs).candidate_scores
    torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)


def test_right_padding_gives_the_left_padded_results(family):
    """Either padding side: the processor states the layout, so a right-padded batch scores, loses and learns as the
    left-padded one on the one-pass path (candidates in the prompt, the catalog head with its content affinity, the
    dense loss) and on the prefix-cache path (FlashAttention's route)."""
    model, processor = make_tiny(family, tokens_per_item=2, catalog_loss_weight=1.0, content_affinity=1.5)
    model.train()
    results = []
    for side in ("left", "right"):
        inputs = processor(histories=HISTORIES, candidates=CANDIDATES, targets=TARGETS, padding_side=side)
        dense = processor(histories=HISTORIES, targets=TARGETS, dense=True, padding_side=side)
        padded_end = inputs["attention_mask"][:, 0 if side == "left" else -1]
        assert not padded_end.all(), f"the batch must contain {side} padding"
        model.zero_grad()
        out = model(**inputs, candidate_scoring="mask", return_catalog_scores=True)
        dense_out = model(**dense)
        (out.loss + dense_out.loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert grads and max(g.abs().max() for g in grads.values()) > 0, "a comparison of zero gradients proves nothing"
        results.append((out.candidate_scores.detach(), out.catalog_scores.detach(), dense_out.loss.detach(), grads))
    (left_scores, left_catalog, left_dense, left_grads), (right_scores, right_catalog, right_dense, right_grads) = results
    torch.testing.assert_close(right_scores, left_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(right_catalog, left_catalog, rtol=0, atol=1e-5)
    torch.testing.assert_close(right_dense, left_dense, rtol=0, atol=1e-5)
    assert right_grads.keys() == left_grads.keys()
    for name, grad in right_grads.items():
        torch.testing.assert_close(grad, left_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    model.zero_grad()
    cached = []
    for side in ("left", "right"):
        inputs = processor(histories=HISTORIES, candidates=CANDIDATES, targets=TARGETS, padding_side=side)
        out = model(**inputs, candidate_scoring="prefix_cache")
        out.loss.backward()
        cached.append((out.candidate_scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.grad is not None}))
        model.zero_grad()
    torch.testing.assert_close(cached[1][0], cached[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(cached[0][0], left_scores, rtol=0, atol=1e-5)
    for name, grad in cached[1][1].items():
        torch.testing.assert_close(grad, cached[0][1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_prefix_cache_path_matches_mask_path(family):
    """HSTU-style: the fast path (shared prompt encoded once, candidates as cache continuations, the FlashAttention
    route) equals the reference one-pass masked path, on scores and on gradients."""
    model, processor = make_tiny(family, tokens_per_item=2)
    model.train()
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES, targets=TARGETS)
    grads = []
    for path in ("mask", "prefix_cache"):
        model.zero_grad()
        out = model(**inputs, candidate_scoring=path)
        out.loss.backward()
        grads.append((out.candidate_scores.detach(),
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_scores, ref_grads), (fast_scores, fast_grads) = grads
    torch.testing.assert_close(fast_scores, ref_scores, rtol=0, atol=1e-5)
    assert ref_grads.keys() == fast_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_prefix_cache_path_refuses_a_layout_it_cannot_read():
    """The prefix-cache path takes the shared prompt as the row minus the candidates' tokens: it checks the stated
    query and candidate indices against that layout (on the device) instead of scoring the wrong tokens."""
    model, processor = make_tiny("llama")
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES)
    moved = dict(inputs, candidate_token_index=inputs["candidate_token_index"].flip(-1))  # a stated layout it is not
    with torch.no_grad():
        model(**inputs, candidate_scoring="prefix_cache")
        with pytest.raises(RuntimeError, match="prefix-cache path needs the processor's layout"):
            model(**moved, candidate_scoring="prefix_cache")


def test_sliding_window_without_layer_types_keeps_candidates_a_set():
    """Mistral-style configs (one sliding_window, no layer_types) take the single sliding mask: candidates still
    form a set, and the one-pass path equals the prefix-cache path."""
    from transformers import MistralConfig

    import conftest

    config = MistralConfig(**conftest.SMALL, sliding_window=6)
    conftest.BACKBONES["mistral_window"] = lambda: config
    try:
        model, processor = make_tiny("mistral_window")
    finally:
        del conftest.BACKBONES["mistral_window"]
    assert getattr(model.backbone.config, "layer_types", None) is None and model.backbone.config.sliding_window == 6
    perm = [2, 0, 3, 1]
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES)
    with torch.no_grad():
        scores = model(**inputs, candidate_scoring="mask").candidate_scores
        permuted = model(**processor(histories=HISTORIES, candidates=[[c[p] for p in perm] for c in CANDIDATES])).candidate_scores
        cached = model(**inputs, candidate_scoring="prefix_cache").candidate_scores
    torch.testing.assert_close(permuted, scores[:, perm], rtol=0, atol=1e-5)
    torch.testing.assert_close(cached, scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_no_query_row_of_the_candidate_mask_is_fully_masked(impl, side):
    """Padding queries must not be fully masked under the candidate-isolation mask: some SDPA kernels (cuDNN under
    bf16 autocast on GPU) return NaN for such rows, and the NaN then reaches real rows in the next layer. CPU kernels
    tolerate such rows, so the test reads the mask itself (and checks the outputs stay finite)."""
    model, processor = make_tiny("llama", attn_implementation=impl)
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES, padding_side=side)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded for this test to mean anything"
    embeds = model.backbone.get_input_embeddings()(inputs["input_ids"])
    mask = model.model.candidate_masks(embeds, inputs["attention_mask"], inputs["candidate_segment_ids"],
                                        inputs["query_index"], inputs["candidate_token_index"])
    visible = mask if mask.dtype == torch.bool else mask == 0  # eager: additive float mask, 0 where visible
    assert visible.any(-1).all(), "a query row sees no key"
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert all(torch.isfinite(h).all() for h in out.hidden_states)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("layout", ["candidates", "dense"])
def test_compiled_training_step_matches_eager(family, layout):
    """The forward has no host synchronisation, random draw or data-dependent shape: torch.compile(fullgraph=True)
    captures a training forward in one graph, and its loss and every gradient equal eager mode's. (The aot_eager
    backend traces exactly what Inductor would compile, without generating C++: the graph is the claim tested.)"""
    model, processor = make_tiny(family, catalog_loss_weight=1.0, candidate_loss_weight=1.0, catalog_item_bias=True)
    model.train()
    if layout == "candidates":
        inputs = processor(histories=HISTORIES, candidates=CANDIDATES, targets=TARGETS)
        kwargs = {"candidate_scoring": "mask"}
    else:
        inputs = processor(histories=HISTORIES, targets=TARGETS, dense=True, candidates_in_prompt=False)
        kwargs = {}
    modality_mask = torch.ones(len(HISTORIES), len(model.mrc.modalities), dtype=torch.bool)
    modality_mask[0, -1] = False  # an MPO ramp mask, as the collator draws it

    def step(forward):
        model.zero_grad()
        loss = forward(**inputs, modality_mask=modality_mask, **kwargs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    eager_loss, eager_grads = step(model)
    compiled_loss, compiled_grads = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_transformers_output_conventions():
    """output_attentions, output_hidden_states (argument or config), return_dict=False and a missing attention mask
    behave as in every Transformers model."""
    model, processor = make_tiny("llama", attn_implementation="eager")
    inputs = processor(histories=[HISTORIES[0]], candidates=[CANDIDATES[0]])  # one row: no padding
    out = model(**inputs, output_attentions=True, output_hidden_states=True, candidate_scoring="mask")
    layers = model.config.text_config.num_hidden_layers
    assert len(out.attentions) == layers and len(out.hidden_states) == layers + 1
    model.config.output_hidden_states = True
    assert model(**inputs, candidate_scoring="mask").hidden_states is not None
    model.config.output_hidden_states = False
    as_tuple = model(**inputs, return_dict=False, candidate_scoring="mask")
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.candidate_scores)
    without_mask = {k: v for k, v in inputs.items() if k != "attention_mask"}
    torch.testing.assert_close(model(**without_mask, candidate_scoring="mask").candidate_scores, out.candidate_scores)
    with pytest.raises(ValueError, match="missing \\['item_token_index'"):
        model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])


def test_init_weights_initialises_the_feature_bank_buffers():
    """A model built on the meta device and initialised gets a zero feature bank and presence set, not leftover
    memory (from_pretrained initialises missing tensors this way; a missing bank is refused on load)."""
    model, _ = make_tiny("llama")
    for buffer in model.mrc.buffers():
        buffer.data.fill_(float("nan") if buffer.is_floating_point() else False)
    model._init_weights(model.mrc)
    assert all(b.eq(0).all() for n, b in model.mrc.named_buffers() if n.startswith("features_"))
    assert model.mrc.presence.all()


def test_headless_model_gives_the_states_the_heads_score(family):
    """SpeederModel (headless) returns the query and candidate states; the recommendation model's heads score exactly
    those (Llava's split: the ForX class only adds heads and losses)."""
    from modeling_speeder import SpeederModel, SpeederModelOutput

    model, processor = make_tiny(family, catalog_item_bias=True)
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES)
    layout = {k: v for k, v in inputs.items() if k != "candidate_item_index"}  # catalog rows are the heads' business
    with torch.no_grad():
        states = model.model(**layout)
        out = model(**inputs, return_catalog_scores=True)
    assert isinstance(model.model, SpeederModel) and isinstance(states, SpeederModelOutput)
    assert states.last_hidden_state.shape[:2] == inputs["input_ids"].shape
    torch.testing.assert_close(out.candidate_scores, model.candidate_head(states.candidate_hidden_states).squeeze(-1))
    torch.testing.assert_close(out.catalog_scores, model.catalog_logits(states.query_hidden_state))


def test_catalog_item_bias_starts_at_zero_and_scores_everywhere():
    """The per-item bias starts at zero (transformers initialises each parameter once, children first, so a parent's
    zeroing was silently skipped: it started as N(0, 0.02) noise), and enters every catalog score: the forward's and
    recommend()'s top-k."""
    model, processor = make_tiny("llama", catalog_loss_weight=1.0, catalog_item_bias=True)
    assert not model.catalog_item_bias.weight.any()
    with torch.no_grad():
        model.catalog_item_bias.weight.normal_(0, 10.0)  # large enough to decide the ranking
    model.eval()
    inputs = processor(histories=HISTORIES[:1])
    with torch.no_grad():
        out = model(**inputs, return_catalog_scores=True)
    expected = model.query_proj(out.query_hidden_state) @ model.model.item_representations().T
    torch.testing.assert_close(out.catalog_scores, expected + model.catalog_item_bias.weight[:, 0])
    scores = out.catalog_scores[0].clone()
    scores[[processor.item_index(i) for i in HISTORIES[0]]] = float("-inf")
    top = model.recommend(HISTORIES[:1], top_k=3, processor=processor)[0]["item_ids"]
    assert top == processor.item_ids_of(scores.topk(3).indices.tolist())


def test_misspelled_forward_argument_is_an_error():
    model, processor = make_tiny("llama")
    with pytest.raises(TypeError, match=r"unexpected arguments \['candidate_scorng'\]"):
        model(**processor(histories=HISTORIES, candidates=CANDIDATES), candidate_scorng="mask")


FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "speeder-checkpoint-8b1321b"


def test_checkpoint_saved_before_the_headless_split_loads_and_scores_the_same(tmp_path):
    """A checkpoint saved by the code of commit 8b1321b (weights `backbone.*`, `mrc.*` at the top level) loads through
    AutoModel, computes the scores that code computed, and is saved again under today's names."""
    import json

    from safetensors import safe_open

    from modeling_speeder import SpeederModel

    expected = json.loads((FIXTURE / "expected_outputs.json").read_text())
    with safe_open(FIXTURE / "model.safetensors", "pt") as stored:
        assert "mrc.presence" in stored.keys(), "the fixture must hold the old names"
    model, processor = AutoModel.from_pretrained(FIXTURE), AutoProcessor.from_pretrained(FIXTURE)
    assert isinstance(model, SpeederForSequentialRecommendation)
    inputs = processor(histories=expected["histories"], candidates=expected["candidates"])
    with torch.no_grad():
        out = model(**inputs, return_catalog_scores=True)
    torch.testing.assert_close(out.candidate_scores, torch.tensor(expected["candidate_scores"]))
    torch.testing.assert_close(out.catalog_scores[0], torch.tensor(expected["catalog_scores_first_row"]))
    model.save_pretrained(tmp_path / "resaved")
    with safe_open(tmp_path / "resaved" / "model.safetensors", "pt") as stored:
        assert "model.mrc.presence" in stored.keys() and not any(k.startswith("mrc.") for k in stored.keys())
    headless = SpeederModel.from_pretrained(FIXTURE)
    torch.testing.assert_close(headless.mrc.features_text, model.mrc.features_text)
    reloaded = SpeederForSequentialRecommendation.from_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).candidate_scores, out.candidate_scores)
