"""Speeder: fast multimodal-LLM sequential recommendation, as a Hugging Face Transformers model package.

Importing this package registers the `speeder` model type with AutoConfig, AutoModel and AutoProcessor, so
`AutoModel.from_pretrained(path)` returns a `SpeederForSequentialRecommendation` without remote code, and the
`sequential-recommendation` pipeline task (`pipeline("sequential-recommendation", model=path)`).
"""

from transformers import AutoConfig, AutoModel, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_speeder import MODALITIES, SpeederConfig
from .modeling_speeder import (
    SpeederForSequentialRecommendation,
    SpeederModalityExperts,
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
                                    pt_model=AutoModel, type="multimodal")

__version__ = "0.1.0"
__all__ = [
    "MODALITIES",
    "SequentialRecommendationPipeline",
    "SpeederConfig",
    "SpeederForSequentialRecommendation",
    "SpeederModalityExperts",
    "SpeederPreTrainedModel",
    "SpeederProcessor",
    "SpeederRecommendationOutput",
    "catalog_fingerprint",
]
