"""Shared fixtures: tiny random backbones of several families, a small catalog with text/image/id features."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen3Config  # noqa: E402

from modeling_speeder.conversion.build import build_speeder, make_word_tokenizer  # noqa: E402
from modeling_speeder.processing.processing_speeder import DEFAULT_PROMPT_BRIDGE, DEFAULT_PROMPT_PREFIX  # noqa: E402

collect_ignore = ["transformers_shims"]  # helper modules for the conformance tests, not tests

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=512)
BACKBONES = {  # overrides: e.g. GPU_SHAPE
    "llama": lambda **o: LlamaConfig(**{**SMALL, **o}),
    "qwen3": lambda **o: Qwen3Config(**{**SMALL, "head_dim": 8, **o}),
    "mistral": lambda **o: MistralConfig(**{**SMALL, "sliding_window": None, **o}),
    # Gemma3 alternates sliding and full layers: exercises the per-layer-type mask dict. A window shorter than
    # the prompts makes the sliding layers matter.
    "gemma3": lambda **o: Gemma3TextConfig(
        **{**SMALL, "head_dim": 8, "sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"], **o}
    ),
}
GPU_SHAPE = dict(hidden_size=64, head_dim=16)  # GPU flex / FlashAttention kernels want head_dim >= 16
NUM_ITEMS = 40
ITEM_IDS = [f"item{i}" for i in range(NUM_ITEMS)]
PROMPT_TEXT = f"{DEFAULT_PROMPT_PREFIX} {DEFAULT_PROMPT_BRIDGE}"


def make_catalog_features(seed=0, image_missing=0.3):
    g = torch.Generator().manual_seed(seed)
    features = {"text": torch.randn(NUM_ITEMS, 24, generator=g), "image": torch.randn(NUM_ITEMS, 16, generator=g)}
    presence = {"image": torch.rand(NUM_ITEMS, generator=g) > image_missing}
    return features, presence


def make_tiny(family="llama", seed=0, attn_implementation="sdpa", backbone_overrides=None, **config_kwargs):
    """A tiny random Speeder model and its processor (text + image features, learned id table)."""
    torch.manual_seed(seed)
    features, presence = make_catalog_features(seed)
    config_kwargs.setdefault("expert_hidden_size", 32)
    config_kwargs.setdefault("learned_id_dim", 8)
    config_kwargs.setdefault("max_history", 8)
    model, processor = build_speeder(
        BACKBONES[family](**(backbone_overrides or {})), make_word_tokenizer([PROMPT_TEXT]), ITEM_IDS, features, presence,
        **config_kwargs,
    )
    model.set_attn_implementation(attn_implementation)
    return model.eval(), processor


HISTORIES = [["item1", "item2", "item3", "item4"], ["item5", "item6"], ["item7", "item8", "item9", "item10", "item11"]]
CANDIDATES = [["item20", "item21", "item22", "item1"], ["item23", "item24", "item25", "item26"],
              ["item27", "item28", "item29", "item30"]]
TARGETS = ["item21", "item26", "item27"]


def packed_and_padded_runs(family, impl, device="cpu", dtype=torch.float32, backbone_overrides=None):
    """Dense catalog-head loss, query states and gradients of one padded and one packed batch (K = 2 tokens per item,
    so SPAE position ids repeat values and only explicit boundaries can separate the sequences)."""
    model, proc = make_tiny(family, attn_implementation=impl, tokens_per_item=2, backbone_overrides=backbone_overrides,
                            catalog_loss_weight=1.0)
    model = model.to(device, dtype).train()
    results = []
    # A per-example MPO modality mask (one row per sequence, also when they share one packed row).
    modality_mask = torch.ones(len(HISTORIES), len(model.mrc.modalities), dtype=torch.bool, device=device)
    modality_mask[0, 0] = modality_mask[2, -1] = False
    for packed in (False, True):
        inputs = proc(histories=HISTORIES, targets=TARGETS, dense=True, packed=packed).to(device)
        model.zero_grad()
        out = model(**inputs, modality_mask=modality_mask)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert out.loss > 0 and grads.abs().max() > 0, "a comparison of zero gradients proves nothing"
        results.append((out.loss.detach().float(), out.query_hidden_state.detach().float(), grads.float()))
    return results


@pytest.fixture(params=list(BACKBONES))
def family(request):
    return request.param
