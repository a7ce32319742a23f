"""The settings of the sketch, the model, the build and the query, with no heavy imports: the CLI reads its
defaults here.

`SketchSettings` (how gradients are compressed), `ModelSettings` (which model, adapter, dtype and
parameters), `BuildSettings` (how rows become index entries) and `QuerySettings` (how a query is
answered) are frozen dataclasses, checked on construction. A field's
default here is the default of the matching CLI option (`default_of`), so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field

from rapidin_index.data import TOKENIZATIONS
from rapidin_index.errors import BuildError, ModelError, QueryError, SketchError

DTYPE_NAMES = ("float32", "float16", "bfloat16")
"""Weights dtypes a model can be loaded in (`models.DTYPES` maps them to torch dtypes)."""
VECTOR_DTYPES = ("float32", "float16")
DEFAULT_VECTOR_DTYPE = "float16"
"""A new index's vector dtype (float32 until issue 27; the manifest records each index's own)."""
"""How the index stores vectors."""
NORMALIZATIONS = ("layer", "none")
FIT_KINDS = ("none", "fisher", "kfac", "ekfac", "ekfac-weights", "fisher+ekfac-weights")
"""`build --fit`: the kinds of `rapidin-index fit --kind` (`precondition.KINDS`, `ekfac.KINDS`), or none."""
"""Per-tensor gradient normalisation: RapidIn's layer norm, or none (plain TracIn)."""
MAX_VECTOR_DIMENSION = 1 << 20
"""The widest vectors an index can hold: ``faiss.read_index`` refuses d > 2^20 when reading a file back."""


def default_of(settings_class: type, name: str):
    """The default of a settings dataclass field (its default_factory called), e.g. for a CLI option."""
    found = {f.name: f for f in dataclasses.fields(settings_class)}[name]
    if found.default is not dataclasses.MISSING:
        return found.default
    return found.default_factory()


DEFAULT_SKETCH_DIM = 1 << 16
"""K where none is given and the gradient is longer (the paper's 2^16); see :func:`resolve_sketch_dim`."""
SKETCH_ALGORITHMS = ("rapidgrad-v2", "rapidgrad-v1", "rapidgrad-ts", "rapidgrad-kron")
DEFAULT_SKETCH_ALGORITHM = "rapidgrad-v2"
AUTO_ALGORITHM = "auto"
"""Not an algorithm: a build resolves it (:func:`resolve_algorithm`) to one, which its manifest records."""


@dataclass(frozen=True)
class SketchSettings:
    """How gradients are compressed. Recorded in the index manifest; a query must use the same."""

    sketch_dim: int | None = None
    """K, the sketch length. 0 stores the exact, uncompressed normalised gradient. None (the default):
    ``DEFAULT_SKETCH_DIM``, or exact where the gradient is no longer than that (:func:`resolve_sketch_dim`;
    a manifest records the value)."""
    shuffle_lambda: int = 20
    """lambda, the number of random row+column shuffles of rapidgrad-v1. rapidgrad-v2 does not use it
    (its permutation mixes the whole vector at once); it is only recorded."""
    seed: int = 42
    """Seed of the permutation and the signs."""
    algorithm: str = AUTO_ALGORITHM
    """'rapidgrad-v2' (keyed pseudo-random permutation), 'rapidgrad-v1' (the paper's block shuffles),
    'rapidgrad-ts' (tensor-product hash of the weight matrices, sketched from their factors),
    'rapidgrad-kron' (a segment of bins per tensor, Kronecker count sketches of the weight matrices),
    or 'auto' (the default: :func:`resolve_algorithm` picks one from the attributed tensors; a manifest
    records it)."""

    def __post_init__(self) -> None:
        if self.sketch_dim is not None and self.sketch_dim < 0:
            raise SketchError(f"sketch dimension K must be >= 0 (0 = exact), got {self.sketch_dim}")
        if self.shuffle_lambda < 0:
            raise SketchError(f"--shuffle-lambda must be >= 0, got {self.shuffle_lambda}")
        if self.algorithm not in SKETCH_ALGORITHMS and self.algorithm != AUTO_ALGORITHM:
            raise SketchError(
                f"unknown sketch algorithm {self.algorithm!r}; known: {', '.join(SKETCH_ALGORITHMS)}, or "
                f"{AUTO_ALGORITHM!r}"
            )

    @property
    def exact(self) -> bool:
        return self.sketch_dim == 0

    def to_dict(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "sketch_dim": self.sketch_dim,
            "shuffle_lambda": self.shuffle_lambda,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, values: dict) -> SketchSettings:
        """The settings of a manifest's ``sketch`` dict (its gradient_dim, padded_dim, ... are ignored).

        A dict without "algorithm" predates rapidgrad-v2 (every earlier manifest was rapidgrad-v1).
        """
        algorithm = values.get("algorithm", "rapidgrad-v1")
        if algorithm not in SKETCH_ALGORITHMS:
            raise SketchError(
                f"index built with sketch algorithm {algorithm!r}, which this version of rapidin-index does "
                f"not implement (known: {', '.join(SKETCH_ALGORITHMS)}); upgrade rapidin-index"
            )
        return cls(int(values["sketch_dim"]), int(values["shuffle_lambda"]), int(values["seed"]), algorithm)


# rapidgrad-ts is picked by 'auto' from this K up: on a fine-tuned 5.5M-parameter Llama it built 1.13x
# faster than rapidgrad-v2 with the same Spearman against exact scores (0.997, five seeds); at K = 4096 it
# was 1.11x faster but 0.003 lower (0.968 against 0.971), its variance being somewhat higher (a tensor
# sketch's collisions are correlated along rows and columns). BENCHMARKS.md, "Factored sketch (issue 14)".
TS_AUTO_MIN_SKETCH_DIM = 1 << 16
MAPPING_CACHE_LIMIT = 1 << 24
"""rapidgrad-v1/v2 keep their coordinate -> (bin, sign) mapping up to this many padded coordinates; a
larger gradient re-hashes every coordinate (about 100 ns each on a CPU core) for every batch of a build
and every query. rapidgrad-ts hashes only each weight matrix's rows and columns, so 'auto' picks it for a
full-parameter model of more than this many attributed parameters at any K: on a 20.7M-parameter Llama
it built 2.5x faster than rapidgrad-v2 at K = 4096 (BENCHMARKS.md, "Factored sketch (issue 14)")."""


KRON_AUTO_BINS_PER_MATRIX = 2048
"""'auto' picks rapidgrad-kron over rapidgrad-ts where K gives every weight matrix at least this many
bins: on a fine-tuned 5.5M-parameter Llama at K = 65536 (2,700 bins a matrix) it built 1.5x faster than
rapidgrad-ts at Spearman 0.974 against exact scores (ts: 0.986); with a few hundred bins a matrix its
Spearman fell to 0.92-0.93 where a full mixing sketch keeps 0.97 (BENCHMARKS.md, "Kronecker sketch")."""


def resolve_sketch_dim(settings: SketchSettings, gradient_dim: int) -> SketchSettings:
    """Concrete settings with a K (a build's manifest records it): a given K is kept; none given means
    ``DEFAULT_SKETCH_DIM`` for a longer gradient, else 0, exact vectors.

    Exact rather than the largest power of two below D: with D <= 65,536 (a LoRA adapter's gradient often
    is a few thousand long) exact vectors are no wider than the default sketch, carry no estimation noise
    (a sketch adds about 1/sqrt(K) in cosine units) and cost no hashing; a power of two below D would save
    at most half the bytes for that noise.
    """
    if settings.sketch_dim is not None:
        return settings
    sketch_dim = DEFAULT_SKETCH_DIM if gradient_dim > DEFAULT_SKETCH_DIM else 0
    return dataclasses.replace(settings, sketch_dim=sketch_dim)


def resolve_algorithm(settings: SketchSettings, blocks: list) -> SketchSettings:
    """Concrete settings for a build (its manifest records them): ``algorithm="auto"`` resolved.

    'auto' sketches a full-parameter model (a 2-D weight among the ``capture.GradientBlock`` list and no
    LoRA tensor) from its factors at K >= ``TS_AUTO_MIN_SKETCH_DIM``, where that measured faster at the
    same fidelity, or at any K above ``MAPPING_CACHE_LIMIT`` parameters, where rapidgrad-v2 would
    re-hash every coordinate for every batch and query: with rapidgrad-kron where K holds
    ``KRON_AUTO_BINS_PER_MATRIX`` bins for every weight matrix, else with rapidgrad-ts. rapidgrad-v2
    otherwise (K = 0 stores exact vectors, whatever the name). A named algorithm is kept as it is.
    """
    if settings.sketch_dim is None:  # K first: the algorithm depends on it
        if not blocks:
            raise SketchError("K was not given and no gradient blocks tell D: call resolve_sketch_dim first")
        settings = resolve_sketch_dim(settings, sum(block.parameter.numel() for block in blocks))
    if settings.algorithm != AUTO_ALGORITHM:
        return settings
    matrices = sum(1 for block in blocks if block.parameter.dim() == 2)
    full = matrices > 0 and not any("lora_" in block.name for block in blocks)
    large = sum(block.parameter.numel() for block in blocks) > MAPPING_CACHE_LIMIT
    factored = full and (settings.sketch_dim >= TS_AUTO_MIN_SKETCH_DIM or large)
    algorithm = DEFAULT_SKETCH_ALGORITHM
    if factored:
        roomy = settings.sketch_dim >= KRON_AUTO_BINS_PER_MATRIX * matrices
        algorithm = "rapidgrad-kron" if roomy else "rapidgrad-ts"
    return SketchSettings(settings.sketch_dim, settings.shuffle_lambda, settings.seed, algorithm)


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


@dataclass(frozen=True)
class BuildSettings:
    """How to turn training rows into index entries."""

    model: ModelSettings
    sketch: SketchSettings = field(default_factory=SketchSettings)
    """The sketch; by default 'auto' (`resolve_algorithm` picks the algorithm once the model is loaded)."""
    normalize: str = "layer"
    """Per-tensor gradient normalisation: 'layer' (RapidIn) or 'none' (plain TracIn)."""
    template: str = "auto"
    """Prompt template: auto, alpaca, completion, chat, plain, or a format string over the row's fields."""
    response_field: str | None = None
    """Field holding the response when the template cannot tell (custom templates)."""
    max_length: int | None = 1024
    """Sequences are truncated to this many tokens (counted in the build report)."""
    tokenization: str = "trl"
    """How rows become labelled tokens. trl: as TRL's SFT trainer labels them (prompt + response
    tokenized as one text, EOS text appended to text rows but not after a chat template's end of turn,
    labels from where the prompt's own ids and the whole sequence's part); trl-assistant: TRL with
    assistant_only_loss=True (chat rows labelled by the template's {% generation %} blocks); separate:
    as a plain Trainer
    with the prompt masked (each part tokenized on its own, EOS appended); joint: the rule of indexes
    built before trl."""
    batch_size: int = 8
    """Examples per forward/backward pass."""
    device: str = "auto"
    """auto, cpu or cuda."""
    strict: bool = False
    """Fail on the first malformed row instead of reporting it and indexing the rest."""
    max_rejected_share: float = 0.5
    """The build fails (after committing the index, whose `info` lists every reason) when more than this
    share of the data's rows is rejected, or when none is indexed; 1 accepts any share."""
    split: str | None = None
    """For a folder written by datasets' save_to_disk: the DatasetDict split to index (needed when it
    holds more than one)."""
    allow_duplicate_data: bool = False
    """Let --append add data whose checksum an index source already has (its rows then appear twice)."""
    chunk_size: int = 256
    """Rows per journal chunk: the unit of resumption."""
    vector_dtype: str | None = None
    """How the index stores vectors: float16 (2K bytes a row; scores accumulate in float32 over the
    stored values; per row searched about as fast as float32, BENCHMARKS.md issue 27) or float32 (4K bytes). Not given: an existing
    index's own (appends, rebuilds), else float16 (`DEFAULT_VECTOR_DTYPE`) for sketches and float32 for
    exact vectors (K = 0: kept exact, for checks against brute force)."""
    num_shards: int = 1
    """Static sharding: this build indexes only the rows whose id % num_shards == shard_index."""
    shard_index: int = 0
    optimizer_state: str | None = None
    """Adam/AdamW state of the fine-tune (a Trainer checkpoint folder with optimizer.pt, or a saved
    optimizer state_dict): each gradient is divided elementwise by sqrt(v_hat) + eps before layer
    normalisation, on both sides (`optimizer_state`); the manifest records its path and fingerprint."""
    fit: str = "none"
    """'fisher', 'kfac', 'ekfac', 'ekfac-weights' or 'fisher+ekfac-weights': fit that query-side
    preconditioner (`precondition`, `ekfac_fit`) once the build is written; 'none' (the default): fit it
    later with `rapidin-index fit`."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1:
            raise BuildError("--batch-size and --chunk-size must be at least 1")
        if (self.sketch.sketch_dim or 0) > MAX_VECTOR_DIMENSION:
            raise BuildError(
                f"--k {self.sketch.sketch_dim:,} is more than FAISS opens ({MAX_VECTOR_DIMENSION:,} dimensions); "
                "use a smaller --k"
            )
        if self.vector_dtype is not None and self.vector_dtype not in VECTOR_DTYPES:
            raise BuildError(f"--vector-dtype must be one of {', '.join(VECTOR_DTYPES)}")
        if self.normalize not in NORMALIZATIONS:
            raise BuildError(f"--normalize {self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.tokenization not in TOKENIZATIONS:
            raise BuildError(f"--tokenization must be one of {', '.join(TOKENIZATIONS)}")
        if not 0 <= self.max_rejected_share <= 1:
            raise BuildError(f"--max-rejected-share must be between 0 and 1, got {self.max_rejected_share}")
        if self.fit not in FIT_KINDS:
            raise BuildError(f"--fit must be one of {', '.join(FIT_KINDS)}, got {self.fit!r}")
        if not 0 <= self.shard_index < self.num_shards:
            raise BuildError(f"--shard-index must be in [0, {self.num_shards}), got {self.shard_index}")

    @property
    def shard(self) -> dict | None:
        return None if self.num_shards == 1 else {"index": self.shard_index, "count": self.num_shards}


AGGREGATIONS = ("mean", "sum", "max", "count")
"""How `aggregate` ranks rows for a set of queries (``--aggregate``)."""


@dataclass(frozen=True)
class QuerySettings:
    """How a query is answered: the defaults of ``rapidin-index query``, `retrieval.Index`'s query methods
    and the server's requests, which all read them here."""

    top_k: int = 10
    """Training examples per list (helpful, harmful) for the whole generation."""
    token_top_k: int = 5
    """Training examples per list for each generated token."""
    per_token: bool = True
    """Each generated token gets its own hits (off: the whole generation only, one backward pass)."""
    explain: int = 3
    """The top N hits of each list get their training tokens scored (0: none)."""
    max_new_tokens: int = 64
    """Tokens to generate for a ``generate`` query."""
    rerank: int = 0
    """The top and bottom M rows are scored again without the sketch and re-ordered."""
    depth: int = 100
    """Rows read from each query's own helpful and harmful lists for an aggregate (``appears_in``, max,
    count)."""
    generate: bool = False
    """The response is the model's greedy continuation of the prompt."""
    where: str | None = None
    """An SQL filter over the rows' fields (LanceDB syntax): only the rows it keeps are searched."""
    aggregate: str | None = None
    """One list for a set of queries: one of `AGGREGATIONS`, or None (a list per query)."""

    def __post_init__(self) -> None:
        least = {"top_k": 1, "token_top_k": 1, "explain": 0, "max_new_tokens": 1, "depth": 1, "rerank": 0}
        for name, smallest in least.items():
            value = getattr(self, name)
            if value < smallest:
                option = "--" + name.replace("_", "-")
                raise QueryError(f"{option} must be at least {smallest}, got {value}")
        if self.aggregate is not None and self.aggregate not in AGGREGATIONS:
            raise QueryError(f"--aggregate {self.aggregate!r} is not one of {', '.join(AGGREGATIONS)}")


_MEMORY_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_MEMORY_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_memory(text: str | None, option: str = "--max-memory") -> int | None:
    """A size as a user writes it (``4GB``, ``512MiB``, ``1.5GB``, ``100000`` bytes) in bytes; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _MEMORY_UNITS or float(match.group(1)) <= 0:
        raise QueryError(f"{option} {text!r} is not a size: give e.g. 4GB, 512MB or a number of bytes")
    return int(float(match.group(1)) * _MEMORY_UNITS[unit])
