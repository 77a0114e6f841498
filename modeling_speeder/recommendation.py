"""Recommendation: the top-k of a candidate list or of the whole catalog, with the history's items left out, from raw
item ids to raw item ids. `SpeederForSequentialRecommendation.recommend`, the pipeline, the evaluation and the SASRec
baseline rank and exclude through these functions, so the benchmarks leave out exactly what users are never shown.

Imported by the model file, so it travels with saved checkpoints as remote code: it imports only installed libraries.
"""

from collections.abc import Sequence

import torch


def exclude_history(scores: torch.Tensor, histories: Sequence[Sequence[int]], keep: torch.Tensor | None = None,
                    offset: int = 0) -> torch.Tensor:
    """Set the scores of each user's history items to -inf, in place. scores: (B, W) scores of catalog rows
    offset .. offset + W - 1 (the whole catalog, or one chunk of it); histories: catalog rows per user; keep: (B,)
    rows never excluded (the evaluation target, which a user may have seen before), with whole-catalog scores."""
    if keep is not None and offset:
        raise ValueError("keep= needs the scores of the whole catalog (offset 0)")
    width = scores.shape[1]
    pairs = [(b, i - offset) for b, h in enumerate(histories) for i in h if offset <= i < offset + width]
    if pairs:
        rows, cols = zip(*pairs)
        kept = None if keep is None else scores.gather(1, keep[:, None])
        scores[list(rows), list(cols)] = float("-inf")
        if keep is not None:
            scores.scatter_(1, keep[:, None], kept)
    return scores


def catalog_topk(query: torch.Tensor, items: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                 exclude: Sequence[Sequence[int]] | None = None, chunk_size: int = 65536):
    """(scores, rows), each (B, k): the top-k of query (B, H) . items (N, H)^T (+ bias (N,)) over the catalog, in
    chunks, so extra memory stays O(B * chunk_size) whatever the catalog size; `exclude`: catalog rows per user."""
    top_k = min(top_k, items.shape[0])
    best_scores = query.new_full((query.shape[0], 0), float("-inf"))
    best_rows = torch.zeros(query.shape[0], 0, dtype=torch.long, device=query.device)
    for start in range(0, items.shape[0], chunk_size):
        scores = query @ items[start : start + chunk_size].T  # (B, chunk)
        if bias is not None:
            scores = scores + bias[start : start + chunk_size]
        if exclude is not None:
            exclude_history(scores, exclude, offset=start)
        # Top-k of the chunk first, then merge k-sized lists: extra memory is one chunk of scores.
        chunk_scores, chunk_rows = scores.topk(min(top_k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, chunk_scores], 1)
        merged_rows = torch.cat([best_rows, chunk_rows + start], 1)
        best_scores, pick = merged_scores.topk(min(top_k, merged_scores.shape[1]), dim=1)
        best_rows = merged_rows.gather(1, pick)
    return best_scores, best_rows


def check_processor(model, processor):
    """Raise if the processor does not state the layout `model` was built for: the same catalog, K tokens per item,
    history length, position mode and placeholder token ids (the config owns them; a processor with another value
    would embed the wrong items or read the wrong token without any other error)."""
    config = model.config
    if processor.num_items != config.num_items:
        raise ValueError(f"The processor's catalog has {processor.num_items} items but this checkpoint was built for "
                         f"{config.num_items}: load the processor saved with this model")
    expected = config.catalog_fingerprint
    if expected is not None and processor.catalog_fingerprint != expected:
        raise ValueError(f"The processor's catalog (fingerprint {processor.catalog_fingerprint}) differs from this "
                         f"checkpoint's ({expected}): same size, different item ids or order")
    for name in ("tokens_per_item", "max_history", "item_level_position_ids", "item_token_id", "query_token_id"):
        value, expected = getattr(processor, name), getattr(config, name)
        if expected is not None and value != expected:
            raise ValueError(f"The processor has {name}={value!r} but this checkpoint was built with {name}={expected!r}: "
                             "load the processor saved with this model")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_histories(histories, candidates=None):
    """Raise unless `histories` is a list of histories, each a list of item ids (a string would be read as a list of
    one-character ids), and `candidates`, when given, one list of item ids per history."""
    if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
        raise ValueError(f"histories must be a list of histories (each a list of item ids), got {histories!r:.80}")
    for name, lists in (("history", histories), ("candidate list", candidates or [])):
        for value in lists:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"each {name} must be a list of item ids, got {value!r:.80}")
    if candidates is not None and len(candidates) != len(histories):
        raise ValueError(f"{len(candidates)} candidate lists for {len(histories)} histories")


def load_processor(model):
    """The processor saved with `model`. With this package installed nothing from the checkpoint folder runs; only a
    model that was itself loaded as remote code (the user trusted this checkpoint to get it) loads it the same way."""
    from transformers import AutoProcessor

    if not model.name_or_path:
        raise ValueError("recommend() needs a processor: pass processor=..., or load the model from a saved folder")
    loaded_as_remote_code = type(model).__module__.startswith("transformers_modules")
    return AutoProcessor.from_pretrained(model.name_or_path, trust_remote_code=loaded_as_remote_code)


@torch.inference_mode()
def recommend(model, histories, candidates=None, top_k: int = 10, processor=None, exclude_history: bool = True,
              batch_size: int = 32, chunk_size: int = 65536) -> list[dict]:
    """`SpeederForSequentialRecommendation.recommend`: one {"item_ids": [...], "scores": [...]} per history, best
    first. Excluded history items are never returned, so fewer than `top_k` come back when too few are left."""
    processor = load_processor(model) if processor is None else processor
    check_processor(model, processor)
    check_histories(histories, candidates)
    top_k, batch_size = _positive_int("top_k", top_k), _positive_int("batch_size", batch_size)
    chunk_size = _positive_int("chunk_size", chunk_size)
    model.eval()
    if not model.item_cache_is_current(check_contents=True):
        model.cache_item_tokens()
    results = []
    for start in range(0, len(histories), batch_size):
        hist = histories[start : start + batch_size]
        cands = None if candidates is None else candidates[start : start + batch_size]
        inputs = processor(histories=hist, candidates=cands,
                           candidates_in_prompt=not model.ranks_candidates_with_catalog_head).to(model.device)
        out = model(**inputs)
        if cands is not None:
            scores, order = out.candidate_scores.topk(min(top_k, out.candidate_scores.shape[1]), dim=-1)
            rows = inputs["candidate_item_index"].gather(1, order)
        else:
            exclude = [[processor.item_index(i) for i in h] for h in hist] if exclude_history else None
            bias = None if model.catalog_item_bias is None else model.catalog_item_bias.weight[:, 0]
            scores, rows = catalog_topk(out.catalog_query, model.catalog_item_vectors(), bias, top_k, exclude, chunk_size)
        if torch.isnan(scores).any() or torch.isposinf(scores).any():
            raise ValueError(f"The model scored NaN or +inf for histories {start}..{start + len(hist) - 1}: its weights "
                             "or feature bank hold non-finite values (load_state_dict or a diverged training run)")
        for r, sc in zip(rows.tolist(), scores.tolist()):
            kept = [j for j, value in enumerate(sc) if value != float("-inf")]  # excluded history items
            results.append({"item_ids": processor.item_ids_of([r[j] for j in kept]), "scores": [sc[j] for j in kept]})
    return results


__all__ = ["catalog_topk", "check_histories", "check_processor", "exclude_history", "recommend"]
