"""Everything about devices and processes lives here; the stages only see a ``device`` argument.

* Devices: `resolve_device`; FAISS on GPUs (`search_index`, `partitions_to_gpus`).
* Builds on many GPUs or machines: `RayChunkRunner`, a ``runner_factory`` for `build.build_index` that
  runs one Ray actor per GPU (or N CPU actors). Each actor loads the model once and sketches whole chunks;
  this process alone writes the journal and the index, so resume and exactly-once hold as for a local build.
* Queries over an index split across devices or machines: `partition_index_by_rows` + `PartitionedSearch` over
  FAISS partitions (CPU or GPU, in this process) or `RayPartitionActor`s, with an exact top-k merge. (A
  *shard* is a build's: one of ``--num-shards`` static slices of the rows, merged by `shards`; a query
  searches *partitions*, which may be read from build shards' vectors files.)

Ray is optional (``pip install 'rapidin-index[ray]'``) and imported only when one of these is used.
"""

from __future__ import annotations

import collections
import functools
import os
import signal
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import torch

from rapidin_index.errors import DeviceError, ParallelError
from rapidin_index.store import vector_index

if TYPE_CHECKING:
    from rapidin_index.store.journal import ChunkRecord

DEVICES = ("auto", "cpu", "cuda")
JOBS_IN_FLIGHT_PER_WORKER = 2  # one computing, one queued: the actor never waits for the driver
WORKER_RESTARTS = 3
"""Ray restarts a dead actor (and retries its chunks) this many times before the build fails."""
LOCAL_OBJECT_STORE_BYTES = 500 * 2**20
# Test-only fault injection: a Ray worker SIGKILLs itself halfway through chunk N, once (the marker file
# records that it fired, so the restarted actor computes the chunk normally).
RAY_CRASH_ON_CHUNK_ENV = "RAPIDIN_INDEX_RAY_CRASH_ON_CHUNK"
RAY_CRASH_MARKER_ENV = "RAPIDIN_INDEX_RAY_CRASH_MARKER"


def resolve_device(device: str) -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU; 'cuda' without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    if device not in DEVICES and not device.startswith("cuda:"):
        raise DeviceError(f"--device {device!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    return torch.device(device)


def faiss_gpu_count() -> int:
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus() if get_num_gpus is not None else 0


def search_index(cpu_index: faiss.Index, use_gpus: bool = True) -> faiss.Index:
    """The index to search: sharded across every GPU when faiss-gpu sees several, else on one GPU or the CPU.

    Sharding splits the rows, so each GPU holds 1/n of the vectors and FAISS merges the exact top-k.
    """
    gpus = faiss_gpu_count() if use_gpus else 0
    if gpus == 0:
        return cpu_index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    if vector_index.vector_dtype_of(cpu_index) == "float16":
        # faiss-gpu has no flat scalar quantizer: a flat index stored as float16 on the GPUs is the same.
        ids, vectors = vector_index.stored_vectors(cpu_index)
        cpu_index = vector_index.new_index(cpu_index.d)
        vector_index.add_vectors(cpu_index, vectors, ids)
        options.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(cpu_index, co=options, ngpu=gpus)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ParallelError("the Ray backend needs ray: pip install 'rapidin-index[ray]'") from None
    return ray


# --------------------------------------------------------------------------- builds on Ray


class RayChunkRunner:
    """Computes a build's chunks on Ray actors: one per GPU (num_gpus=1), else ``workers`` CPU actors.

    Use ``build_index(..., runner_factory=RayChunkRunner.factory(address, workers))``. Each actor loads
    the model once and sketches whole chunks pulled from a queue (at most two in flight per actor); this
    process receives ``(record, vectors)`` and writes each chunk, once, to the journal. An actor killed
    mid-chunk is restarted by Ray, which reruns its unfinished chunks (``max_restarts`` /
    ``max_task_retries``): nothing is lost, and as every chunk is submitted once and its result received
    once, nothing is written twice. A chunk whose worker dies more often fails the build; the finished
    chunks stay in the journal and rerunning the same command resumes.

    Without ``address`` a local Ray instance is started (``workers`` CPUs, or every GPU) and shut down at
    the end; with one (``auto``, ``ray://head:10001``) this process connects to that cluster, whose nodes
    must have the package installed and the model path readable. An already initialised Ray is reused.
    """

    def __init__(
        self, loaded, selected, settings, device, *, address: str | None = None, workers: int | None = None
    ):
        del loaded, device  # every actor loads its own copy; placement comes from the cluster
        if workers is not None and workers < 1:
            raise ParallelError(f"--workers must be at least 1, got {workers}")
        self.settings = settings
        # A row's vector: K wide, or D with exact vectors (K = 0, the default for a short gradient).
        self.vector_width = settings.sketch.sketch_dim or sum(
            parameter.numel() for _, parameter in selected or []
        )
        self.address = address
        self.workers = workers
        self.timings: dict[str, float] = {}
        """startup_seconds (Ray start + every actor's model loaded), compute_seconds, actors."""

    @classmethod
    def factory(cls, address: str | None = None, workers: int | None = None):
        """A ``runner_factory`` for `build.build_index`."""
        return functools.partial(cls, address=address, workers=workers)

    def run(self, jobs, write, advance) -> None:
        jobs = list(jobs)  # the pending chunks, pulled by the actors as they free up
        if not jobs:
            return
        ray = import_ray()
        started = time.perf_counter()
        connected_here = self._connect(ray)
        actors = []
        try:
            count, device, options = self._placement(ray)
            worker = ray.remote(RayChunkWorker).options(**options)
            threads = 1 if device == "cpu" else None
            actors = [worker.remote(self.settings, device, threads) for _ in range(count)]
            try:
                ray.get([actor.ready.remote() for actor in actors])
            except ray.exceptions.RayError as error:
                raise ParallelError(f"a Ray worker could not load the model: {error}") from None
            self.timings = {"startup_seconds": time.perf_counter() - started, "actors": count}
            computing = time.perf_counter()
            self._pull(ray, actors, jobs, write, advance)
            self.timings["compute_seconds"] = time.perf_counter() - computing
        finally:
            for actor in actors:
                ray.kill(actor)
            if connected_here:
                ray.shutdown()

    def _connect(self, ray) -> bool:
        """Start or join Ray unless this process already has; True when it is ours to shut down."""
        if ray.is_initialized():
            return False
        if self.address is not None:
            try:
                ray.init(address=self.address, log_to_driver=False)
            except (ConnectionError, ValueError) as error:  # no cluster there; ray:// without ray[client]
                raise ParallelError(f"cannot join the Ray cluster at {self.address}: {error}") from None
            return True
        gpus = torch.cuda.device_count() if self.settings.device != "cpu" else 0
        workers = self.workers or gpus or 2
        # Ray forks and at once execs its daemons, so lancedb's warning about forking does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "lancedb fork support", RuntimeWarning)
            ray.init(
                num_cpus=max(workers, os.cpu_count() or 1) if gpus else workers,
                num_gpus=gpus,
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=self._object_store_bytes(workers),
            )
        return True

    def _object_store_bytes(self, workers: int) -> int:
        """Room for every chunk in flight, twice; beyond that Ray spills to disk (slower, still correct)."""
        in_flight = JOBS_IN_FLIGHT_PER_WORKER * workers * self.settings.chunk_size
        return max(LOCAL_OBJECT_STORE_BYTES, 2 * in_flight * self.vector_width * 4)

    def _placement(self, ray) -> tuple[int, str, dict]:
        """(number of actors, their device, their Ray options) for this cluster and ``--device``."""
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if self.settings.device != "cpu" else 0
        if self.settings.device.startswith("cuda") and gpus == 0:
            raise ParallelError(
                f"--device {self.settings.device} asked for, but the Ray cluster has no GPU; use --device cpu"
            )
        available, kind = (gpus, "GPU") if gpus else (int(resources.get("CPU", 0)), "CPU")
        count = self.workers or gpus or max(1, min(2, available))
        if count > available:
            raise ParallelError(
                f"--workers {count} asked for, but the Ray cluster has {available} {kind}s "
                f"(one worker per {kind}); use --workers {available} or fewer"
            )
        options = {
            "num_cpus": 1,
            "num_gpus": 1 if gpus else 0,
            "max_restarts": WORKER_RESTARTS,
            "max_task_retries": WORKER_RESTARTS,
        }
        hooks = {name: os.environ.get(name) for name in (RAY_CRASH_ON_CHUNK_ENV, RAY_CRASH_MARKER_ENV)}
        if all(hooks.values()):  # test-only fault injection reaches workers of an already running Ray
            options["runtime_env"] = {"env_vars": hooks}
        return count, "cuda" if gpus else "cpu", options

    @staticmethod
    def _pull(ray, actors: list, jobs: list, write, advance) -> None:
        """Keep every actor busy; write each chunk as it comes back (in completion order)."""
        queue = collections.deque(jobs)
        in_flight = {}  # ObjectRef -> (job, actor): each job is submitted exactly once

        def submit(actor) -> None:
            job = queue.popleft()
            in_flight[actor.compute.remote(job)] = (job, actor)

        for _ in range(JOBS_IN_FLIGHT_PER_WORKER):
            for actor in actors:
                if queue:
                    submit(actor)
        while in_flight:
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            job, actor = in_flight.pop(done)
            try:
                record, vectors = ray.get(done)
            except ray.exceptions.RayActorError as error:
                raise ParallelError(
                    f"chunk {job.chunk_number}: its Ray worker died {WORKER_RESTARTS + 1} times ({error}); "
                    "the finished chunks are kept, rerun the same command to resume"
                ) from None
            except ray.exceptions.RayTaskError as error:  # re-raise the stage's own typed error
                raise (error.cause if isinstance(error.cause, Exception) else error) from None
            write(job, record, vectors)
            advance(len(job.examples) + len(job.rejected), record.tokens)
            if queue:
                submit(actor)


class RayChunkWorker:
    """The state of one Ray build actor: the model, loaded once, and a `chunks.ChunkSketcher`."""

    def __init__(self, settings, device: str, threads: int | None) -> None:
        from rapidin_index.chunks import ChunkSketcher
        from rapidin_index.models import load_model, select_parameters

        if threads is not None:
            torch.set_num_threads(threads)  # one CPU per actor: N actors must not fight over N cores
        self.device = torch.device(device)
        loaded = load_model(settings.model, self.device)
        selected = select_parameters(loaded.model, settings.model)
        self.chunk_sketcher = ChunkSketcher(loaded, selected, settings, self.device)

    def ready(self) -> str:
        return f"pid {os.getpid()} on {self.device}"

    def compute(self, job) -> tuple[ChunkRecord, np.ndarray]:
        return self.chunk_sketcher.compute(job, _crash_hook(job.chunk_number))


def _crash_hook(chunk_number: int):
    """An ``advance`` callback; under fault injection it SIGKILLs this process after the chunk's first batch."""
    marker = os.environ.get(RAY_CRASH_MARKER_ENV)
    if not marker or os.environ.get(RAY_CRASH_ON_CHUNK_ENV) != str(chunk_number):
        return lambda rows, tokens: None

    def advance(rows: int, tokens: int) -> None:
        if tokens == 0:  # the rejected rows' call, before any batch
            return
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    return advance


# --------------------------------------------------------------------------- queries over partitions of an index


def partition_index_by_rows(cpu_index: faiss.Index, count: int) -> list[faiss.Index]:
    """Split an ``IndexIDMap2(IndexFlatIP)`` into ``count`` contiguous row ranges (ids kept).

    Briefly holds a second copy of the vectors; for indexes larger than RAM, build with ``--num-shards``
    and give each `RayPartitionActor` a build shard's own vectors file instead.
    """
    if count < 1:
        raise ParallelError(f"the number of partitions must be at least 1, got {count}")
    ids, vectors = vector_index.stored_vectors(cpu_index)
    partitions = []
    for rows in np.array_split(np.arange(len(ids)), count):
        partition = vector_index.new_index(cpu_index.d, vector_index.vector_dtype_of(cpu_index))
        vector_index.add_vectors(partition, vectors[rows], ids[rows])
        partitions.append(partition)
    return partitions


def partitions_to_gpus(partitions: list[faiss.Index]) -> list[faiss.Index]:
    """Each partition on its own GPU (round robin over the GPUs faiss-gpu sees), for `PartitionedSearch`."""
    gpus = faiss_gpu_count()
    if gpus == 0:
        raise ParallelError(
            "FAISS sees no GPU: install faiss-gpu in place of faiss-cpu, or keep CPU partitions"
        )
    resources = [faiss.StandardGpuResources() for _ in range(gpus)]
    return [faiss.index_cpu_to_gpu(resources[n % gpus], n % gpus, s) for n, s in enumerate(partitions)]


class RayPartitionActor:
    """The state of one Ray query actor: a FAISS partition, read from a vectors file on that machine (e.g. a
    build shard folder's ``vectors-gNNNN.faiss``) or built from ``(ids, vectors)`` sent by the driver."""

    def __init__(self, source: str | Path | tuple[np.ndarray, np.ndarray]) -> None:
        if isinstance(source, (str, Path)):
            self.index = vector_index.load_index(source)
        else:
            ids, vectors = source
            self.index = vector_index.new_index(vectors.shape[1])
            vector_index.add_vectors(self.index, vectors, ids)

    def shape(self) -> tuple[int, int]:
        return self.index.ntotal, self.index.d

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(vectors, k)


def start_partition_actors(sources: list, **options) -> list:
    """One `RayPartitionActor` per source (a path or ``(ids, vectors)``); ``options`` go to Ray (num_cpus, ...)."""
    actor = import_ray().remote(RayPartitionActor).options(**options)
    return [actor.remote(source) for source in sources]


class PartitionedSearch:
    """Exact inner-product top-k over partitions: FAISS indexes (CPU or GPU) and/or `RayPartitionActor` handles.

    Every partition returns its own top-k and the global top-k is taken from their union, which is exact: a
    row in the global top-k is in its partition's top-k. It has the ``search`` / ``ntotal`` / ``d`` surface of
    a ``faiss.Index``, so retrieval can search it in place of one (harmful = search with ``-vectors``).
    """

    def __init__(self, partitions: list) -> None:
        if not partitions:
            raise ParallelError("PartitionedSearch needs at least one partition")
        self.partitions = list(partitions)
        shapes = [s.shape.remote() if _is_actor(s) else (s.ntotal, s.d) for s in self.partitions]
        if any(_is_actor(s) for s in self.partitions):
            ray = import_ray()
            shapes = [ray.get(s) if isinstance(s, ray.ObjectRef) else s for s in shapes]
        self.sizes = [size for size, _ in shapes]
        dims = {dimension for _, dimension in shapes}
        if len(dims) != 1:
            raise ParallelError(f"the partitions hold vectors of different lengths: {sorted(dims)}")
        self.d = dims.pop()
        self.ntotal = sum(self.sizes)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k] float32, ids [q, k] int64), best first; padded like FAISS (-1) past ``ntotal``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # [q, d]
        asked = [
            (partition, min(k, size))
            for partition, size in zip(self.partitions, self.sizes, strict=True)
            if size
        ]
        remote = [(partition, n) for partition, n in asked if _is_actor(partition)]
        if remote:  # fan out first, the queries stored once for every actor
            ray = import_ray()
            shared = ray.put(vectors)
            remote = [partition.search.remote(shared, n) for partition, n in remote]
        parts = [partition.search(vectors, n) for partition, n in asked if not _is_actor(partition)]
        parts += ray.get(remote) if remote else []
        return merge_top_k(parts, k, len(vectors))


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int, queries: int):
    """The global top-k of per-partition (scores, ids) lists: by score, best first; equal scores by id."""
    scores = np.concatenate([np.zeros((queries, 0), np.float32)] + [s for s, _ in parts], axis=1)
    ids = np.concatenate([np.zeros((queries, 0), np.int64)] + [i for _, i in parts], axis=1)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]  # [q, min(k, candidates)]
    scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    missing = k - scores.shape[1]
    if missing > 0:  # fewer rows than k: pad as faiss.IndexFlatIP does
        scores = np.pad(scores, ((0, 0), (0, missing)), constant_values=np.finfo(np.float32).min)
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=-1)
    return scores.astype(np.float32), ids.astype(np.int64)


def _is_actor(partition) -> bool:
    return hasattr(getattr(partition, "search", None), "remote")
