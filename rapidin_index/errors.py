"""Every error this package raises on purpose, under one base class.

`RapidinIndexError` is what the CLI catches: its message is written for the user (it names the row,
option or file and says what to change), so the CLI prints it on one line, without a traceback. Each
class also keeps the builtin base it had before (ValueError for bad input, RuntimeError for work that
cannot proceed), so ``except ValueError`` in user code keeps working. Import them from here; a
module that raises one also has it under its own name (``rapidin_index.data.RowError`` is this one).
"""

from __future__ import annotations


class RapidinIndexError(Exception):
    """Base of every typed rapidin-index error; the message is meant for the user."""


# --------------------------------------------------------------------------- input and settings


class DataError(RapidinIndexError, ValueError):
    """A problem with the whole input (missing file, unknown format, bad --template, tokenizer)."""


class RowError(RapidinIndexError, ValueError):
    """A problem with one row; the message is the human-readable reason it was rejected."""


class ModelError(RapidinIndexError, ValueError):
    """The model, adapter, dtype or parameter selection cannot be used."""


class GradientError(RapidinIndexError, ValueError):
    """Bad gradient settings (unknown normalisation, empty batch, ...)."""


class SketchError(RapidinIndexError, ValueError):
    """Sketch settings that cannot work (K < 0, lambda < 0, an unknown algorithm, ...)."""


class DeviceError(RapidinIndexError, ValueError):
    """A device was asked for that this machine does not have."""


class QueryError(RapidinIndexError, ValueError):
    """A query that cannot be answered as given (empty response, too long, unknown row format, ...)."""


class TokenAttributionError(RapidinIndexError, ValueError):
    """Bad token-attribution inputs (batch of several examples, mismatched query direction, ...)."""


class ReportError(RapidinIndexError, ValueError):
    """Results that cannot be written as asked (unknown format, html without a file)."""


class FinetuneError(RapidinIndexError, ValueError):
    """Rows or settings that cannot be trained on (the demo's fine-tuning)."""


class DemoError(RapidinIndexError, ValueError):
    """Demo or evaluation settings that cannot work (an unknown dataset or architecture, bad fractions)."""


class OptimizerStateError(RapidinIndexError, ValueError):
    """An optimizer state that cannot precondition the gradients (unreadable, not Adam, does not match)."""


class PreconditionError(RapidinIndexError, ValueError):
    """A Fisher preconditioner that cannot be fitted, read or applied (missing, stale, damaged)."""


# --------------------------------------------------------------------------- the index folder


class ManifestError(RapidinIndexError, ValueError):
    """No manifest, an unreadable one, or one from a newer format version."""


class IndexMismatchError(RapidinIndexError, ValueError):
    """The index was built with other settings, model or tokenizer than those asked for."""


class IntegrityError(RapidinIndexError, ValueError):
    """A file of the index does not match its checksum in the manifest."""


class StoreError(RapidinIndexError, ValueError):
    """Vectors or rows that cannot be stored or read as asked (wrong shape, dtype, dimension)."""


class BundleError(RapidinIndexError, ValueError):
    """A bundle that cannot be written, or one that is refused on import; the message names the member."""


class ShardError(RapidinIndexError, ValueError):
    """Shards that cannot be merged; the message names the shard, setting or row."""


class BuildError(RapidinIndexError, RuntimeError):
    """The build cannot proceed as asked; the message says what to change."""


class RejectedRowsError(BuildError):
    """The build indexed no row, or rejected more than ``--max-rejected-share`` of its rows. The index is
    committed all the same, so that ``rapidin-index info --json`` lists every rejected row and its reason;
    ``report`` is the build's report."""

    report = None


class JournalError(RapidinIndexError, RuntimeError):
    """The journal holds an unfinished build that this one must not be mixed into."""


class WriteError(RapidinIndexError, OSError):
    """The disk refused a write (full, over quota, read-only, failing); the message names the folder and
    about how much space the write needs. Nothing was committed: what was there before is untouched."""


class IndexLockedError(RapidinIndexError, RuntimeError):
    """Another process is writing the index folder; the message names it and says what to do."""


class ParallelError(RapidinIndexError, RuntimeError):
    """Distributed work that cannot start or finish; the message says what to change."""


# --------------------------------------------------------------------------- the server


class ServeError(RapidinIndexError, RuntimeError):
    """The server cannot start as asked (its extra is not installed, the port is taken)."""


class RequestError(RapidinIndexError, ValueError):
    """An HTTP request the server refuses; ``status`` is the 4xx code it answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
