"""rapidin-index: token-wise influential training data retrieval (RapidIn) as a vector index."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Imported on first use, so that `import rapidin_index.sketch` (or a Ray worker) does not pay for
# torch + transformers + lancedb before it needs them.
_EXPORTS = {
    "BuildReport": "rapidin_index.build",
    "BuildSettings": "rapidin_index.settings",
    "build_index": "rapidin_index.build",
    "ModelSettings": "rapidin_index.settings",
    "Index": "rapidin_index.retrieval",
    "SketchSettings": "rapidin_index.settings",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rapidin_index' has no attribute {name!r}")
