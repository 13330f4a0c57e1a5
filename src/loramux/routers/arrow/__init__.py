"""Arrow: zero-shot per-token routing from SVD prototypes of each adapter (arXiv 2405.11157)."""

from .prototypes import adapter_prototypes, library_prototypes, top_right_singular_vector
from .router import ArrowConfig, ArrowRouter

__all__ = ["ArrowRouter", "ArrowConfig", "top_right_singular_vector", "adapter_prototypes", "library_prototypes"]
