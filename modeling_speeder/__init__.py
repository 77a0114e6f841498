"""Speeder: fast multimodal-LLM sequential recommendation, as a Hugging Face Transformers model package.

Importing this package registers the `speeder` model type with AutoConfig, AutoModel and AutoProcessor, so
`AutoModel.from_pretrained(path)` returns a `SpeederForSequentialRecommendation` (the Hub use case: a checkpoint that
recommends; the headless `SpeederModel` is imported directly) without remote code, and the
`sequential-recommendation` pipeline task (`pipeline("sequential-recommendation", model=path)`).

The `speeder` command is the one exception: it parses its arguments before torch and transformers are imported
(so `--help` and argument errors answer at once) and registers right after (`cli.run`).
"""

import os
import sys

__version__ = "0.2.0"
__all__ = [
    "MODALITIES",
    "SequentialRecommendationPipeline",
    "SpeederConfig",
    "SpeederForSequentialRecommendation",
    "SpeederModalityExperts",
    "SpeederModel",
    "SpeederModelOutput",
    "SpeederPreTrainedModel",
    "SpeederProcessor",
    "SpeederRecommendationOutput",
    "catalog_fingerprint",
]


def register():
    """Import the model classes and register them with the Auto classes and the pipeline registry (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoProcessor
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_speeder import MODALITIES, SpeederConfig
    from .modeling_speeder import (
        SpeederForSequentialRecommendation,
        SpeederModalityExperts,
        SpeederModel,
        SpeederModelOutput,
        SpeederPreTrainedModel,
        SpeederRecommendationOutput,
    )
    from .pipeline_speeder import SequentialRecommendationPipeline
    from .processing.processing_speeder import SpeederProcessor, catalog_fingerprint

    AutoConfig.register("speeder", SpeederConfig, exist_ok=True)
    AutoModel.register(SpeederConfig, SpeederForSequentialRecommendation, exist_ok=True)
    AutoProcessor.register(SpeederConfig, SpeederProcessor, exist_ok=True)
    # save_pretrained then writes the remote-code files and `auto_map`, for users without this package.
    SpeederConfig.register_for_auto_class()
    SpeederForSequentialRecommendation.register_for_auto_class("AutoModel")
    SpeederProcessor.register_for_auto_class("AutoProcessor")
    PIPELINE_REGISTRY.register_pipeline("sequential-recommendation", pipeline_class=SequentialRecommendationPipeline,
                                        pt_model=AutoModel, default=_NoDefaultModel(), type="multimodal")
    globals().update(MODALITIES=MODALITIES, SequentialRecommendationPipeline=SequentialRecommendationPipeline,
                     SpeederConfig=SpeederConfig, SpeederForSequentialRecommendation=SpeederForSequentialRecommendation,
                     SpeederModalityExperts=SpeederModalityExperts, SpeederModel=SpeederModel,
                     SpeederModelOutput=SpeederModelOutput,
                     SpeederPreTrainedModel=SpeederPreTrainedModel,
                     SpeederProcessor=SpeederProcessor, SpeederRecommendationOutput=SpeederRecommendationOutput,
                     catalog_fingerprint=catalog_fingerprint)


class _NoDefaultModel(dict):
    """The task's `default` entry: there is no default recommender (a catalog is the user's), so `pipeline(task)`
    without a model gets one clear line instead of transformers' `KeyError: 'default'`."""

    def __contains__(self, key):
        return key == "model"

    def __getitem__(self, key):
        raise ValueError("pipeline('sequential-recommendation') needs model=: a Speeder checkpoint folder or hub id "
                         "(a recommender knows one catalog, so there is no default model)")


def _imported_by_the_speeder_command() -> bool:
    """True while the `speeder` console script or `python -m modeling_speeder` starts (it registers after parsing)."""
    argv = getattr(sys, "orig_argv", [])
    run_as_module = "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["modeling_speeder"]
    return os.path.basename(sys.argv[0] if sys.argv else "") == "speeder" or run_as_module


def __getattr__(name):  # the `speeder` command's process, before `register()`: load on first use
    if name in __all__:
        register()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _imported_by_the_speeder_command():
    register()
