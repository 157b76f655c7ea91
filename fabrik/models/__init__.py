"""Model definitions: one file per ``model_type``, the shared decoder, and the paged attention they call."""

from fabrik.models.attention import AttentionMetadata, kv_cache_shape, paged_attention
from fabrik.models.registry import MODEL_CLASSES, get_model_class

__all__ = ["MODEL_CLASSES", "AttentionMetadata", "get_model_class", "kv_cache_shape", "paged_attention"]
