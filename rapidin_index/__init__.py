"""rapidin-index: token-wise influential training data retrieval (RapidIn) as a vector index."""

__version__ = "0.1.0"

from rapidin_index.build import BuildReport, BuildSettings, build_index  # noqa: E402
from rapidin_index.models import ModelSettings  # noqa: E402
from rapidin_index.retrieval import Index  # noqa: E402
from rapidin_index.sketch import SketchSettings  # noqa: E402

__all__ = [
    "BuildReport",
    "BuildSettings",
    "Index",
    "ModelSettings",
    "SketchSettings",
    "build_index",
    "__version__",
]
