"""`pipeline("sequential-recommendation", model=PATH)`: histories of item ids in, ranked item ids out.

The pipeline holds the model and its processor and ranks through `SpeederForSequentialRecommendation.recommend`, the
same call users make directly, so the pipeline adds loading and batching conventions, not another ranking path.
Registered when `modeling_speeder` is imported; without the package, load the model with `trust_remote_code=True`
and call `model.recommend(...)` instead (a custom pipeline would be one more file of remote code to trust).
"""

from collections.abc import Sequence

from transformers import Pipeline


class SequentialRecommendationPipeline(Pipeline):
    """Next-item recommendation for one history or a list of them.

    Inputs: a history (list of item ids, oldest first), a dict `{"history": [...], "candidates": [...]}` to rank
    given candidates, or a list of either. Keyword arguments: `top_k` (default 10), `exclude_history` (default True,
    full-catalog ranking only), `candidates` (for a single history). Output per history: `{"item_ids": [...],
    "scores": [...]}`, best first.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError("The sequential-recommendation pipeline needs the model's SpeederProcessor (processor=...)")
        self.model.check_processor(self.processor)

    def __call__(self, inputs, batch_size: int | None = None, **kwargs):
        single = isinstance(inputs, dict) or (isinstance(inputs, Sequence) and len(inputs) and isinstance(inputs[0], str))
        if isinstance(inputs, str) or not isinstance(inputs, (Sequence, dict)) or not len(inputs):
            raise ValueError(f"Expected a history (a list of item ids) or a list of histories, got {inputs!r}")
        if not single and kwargs.get("candidates") is not None:
            raise ValueError("candidates= goes with a single history; for several, pass {'history': ..., 'candidates': ...}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size is None:
            results = super().__call__([inputs] if single else list(inputs), **kwargs)
        else:  # batched: the histories go to `recommend` together, which batches them (one forward per batch_size)
            preprocess_params, forward_params, _ = self._sanitize_parameters(**kwargs)
            rows = [self.preprocess(x, **preprocess_params) for x in ([inputs] if single else list(inputs))]
            results = [None] * len(rows)
            for with_candidates in (False, True):
                group = [i for i, row in enumerate(rows) if (row["candidates"] is not None) == with_candidates]
                if group:
                    ranked = self.model.recommend(
                        [rows[i]["history"] for i in group],
                        candidates=[rows[i]["candidates"] for i in group] if with_candidates else None,
                        processor=self.processor, batch_size=batch_size, **forward_params)
                    for i, result in zip(group, ranked):
                        results[i] = result
        return results[0] if single else results

    def _sanitize_parameters(self, top_k=None, exclude_history=None, candidates=None):
        preprocess = {} if candidates is None else {"candidates": candidates}
        forward = {key: value for key, value in (("top_k", top_k), ("exclude_history", exclude_history)) if value is not None}
        return preprocess, forward, {}

    def preprocess(self, inputs, candidates=None):
        if isinstance(inputs, dict):
            unknown = set(inputs) - {"history", "candidates"}
            if unknown or "history" not in inputs:
                raise ValueError(f"A dict input needs 'history' (and optionally 'candidates'), got keys {sorted(inputs)}")
            history, candidates = inputs["history"], inputs.get("candidates")
        else:
            history = inputs
        for name, ids in (("history", history), ("candidates", candidates)):
            required = ids is not None or name == "history"
            if isinstance(ids, str) or (required and not isinstance(ids, Sequence)):
                raise ValueError(f"A {name} is a list of item ids, got {ids!r:.80}")
        return {"history": list(history), "candidates": None if candidates is None else list(candidates)}

    def _forward(self, model_inputs, top_k=10, exclude_history=True):
        candidates = model_inputs["candidates"]
        return self.model.recommend([model_inputs["history"]], candidates=None if candidates is None else [candidates],
                                    top_k=top_k, processor=self.processor, exclude_history=exclude_history)[0]

    def postprocess(self, model_outputs):
        return model_outputs


__all__ = ["SequentialRecommendationPipeline"]
