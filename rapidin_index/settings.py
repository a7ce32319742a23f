"""The settings of the model and the build, with no heavy imports: the CLI reads its defaults from here.

`ModelSettings` (which model, adapter, dtype and parameters) and `BuildSettings` (how rows become index
entries) are frozen dataclasses, checked on construction; `SketchSettings` lives in `sketch`. A field's
default here is the default of the matching CLI option (`default_of`), so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from rapidin_index.data import TOKENIZATIONS
from rapidin_index.errors import BuildError, ModelError

if TYPE_CHECKING:
    from rapidin_index.sketch import SketchSettings

DTYPE_NAMES = ("float32", "float16", "bfloat16")
"""Weights dtypes a model can be loaded in (`models.DTYPES` maps them to torch dtypes)."""
VECTOR_DTYPES = ("float32", "float16")
"""How the index stores vectors."""
MAX_VECTOR_DIMENSION = 1 << 20
"""The widest vectors an index can hold: ``faiss.read_index`` refuses d > 2^20 when reading a file back."""


def default_of(settings_class: type, name: str):
    """The default of a settings dataclass field (its default_factory called), e.g. for a CLI option."""
    found = {f.name: f for f in dataclasses.fields(settings_class)}[name]
    if found.default is not dataclasses.MISSING:
        return found.default
    return found.default_factory()


@dataclass(frozen=True)
class ModelSettings:
    """Which model to attribute, and how to run it."""

    model: str
    """Local folder or hub id of a Hugging Face causal LM."""
    adapter: str | None = None
    """Folder of a PEFT LoRA adapter; its trainable tensors become the attributed parameters."""
    dtype: str = "float32"
    """Weights dtype: float32, float16 or bfloat16 (gradients are always accumulated in float32)."""
    params: str | None = None
    """Regular expression (re.search on parameter names) that narrows the attributed parameters."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ModelError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        if self.params is not None:
            try:
                re.compile(self.params)
            except re.error as error:
                raise ModelError(
                    f"--params {self.params!r} is not a valid regular expression: {error}"
                ) from None

    def to_dict(self) -> dict:
        return asdict(self)


def _default_sketch() -> SketchSettings:
    from rapidin_index.sketch import SketchSettings

    return SketchSettings()


@dataclass(frozen=True)
class BuildSettings:
    """How to turn training rows into index entries."""

    model: ModelSettings
    sketch: SketchSettings = field(default_factory=_default_sketch)
    normalize: str = "layer"
    """Per-tensor gradient normalisation: 'layer' (RapidIn) or 'none' (plain TracIn)."""
    template: str = "auto"
    """Prompt template: auto, alpaca, completion, chat, plain, or a format string over the row's fields."""
    response_field: str | None = None
    """Field holding the response when the template cannot tell (custom templates)."""
    max_length: int | None = 1024
    """Sequences are truncated to this many tokens (counted in the build report)."""
    tokenization: str = "joint"
    """joint: prompt + response tokenized as one text, as TRL's trainers do (the tokens the model was
    trained on); separate: each part on its own (an exact boundary, but SentencePiece tokenizers then
    see another first response token)."""
    batch_size: int = 8
    """Examples per forward/backward pass."""
    device: str = "auto"
    """auto, cpu or cuda."""
    strict: bool = False
    """Fail on the first malformed row instead of reporting it and indexing the rest."""
    chunk_size: int = 256
    """Rows per journal chunk: the unit of resumption."""
    vector_dtype: str = "float32"
    """How the index stores vectors: float32 (4K bytes a row) or float16 (2K bytes, scores still fp32)."""
    num_shards: int = 1
    """Static sharding: this build indexes only the rows whose id % num_shards == shard_index."""
    shard_index: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1:
            raise BuildError("--batch-size and --chunk-size must be at least 1")
        if self.sketch.sketch_dim > MAX_VECTOR_DIMENSION:
            raise BuildError(
                f"--k {self.sketch.sketch_dim:,} is more than FAISS opens ({MAX_VECTOR_DIMENSION:,} dimensions); "
                "use a smaller --k"
            )
        if self.vector_dtype not in VECTOR_DTYPES:
            raise BuildError(f"--vector-dtype must be one of {', '.join(VECTOR_DTYPES)}")
        from rapidin_index.gradients import NORMALIZATIONS

        if self.normalize not in NORMALIZATIONS:
            raise BuildError(f"--normalize {self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.tokenization not in TOKENIZATIONS:
            raise BuildError(f"--tokenization must be one of {', '.join(TOKENIZATIONS)}")
        if not 0 <= self.shard_index < self.num_shards:
            raise BuildError(f"--shard-index must be in [0, {self.num_shards}), got {self.shard_index}")

    @property
    def shard(self) -> dict | None:
        return None if self.num_shards == 1 else {"index": self.shard_index, "count": self.num_shards}
