"""Weight-space EK-FAC on the query side: ``P H^-1 g_q`` against the stored rows ``P LN(g_i)``, rows unchanged.

The sketch P is a JL map, so ``<P H^-1 g_q, P LN(g_i)> ~ <H^-1 g_q, LN(g_i)>``: influence with EK-FAC's
curvature H on the query side, scored by the same FAISS inner-product search over the same stored vectors.
A query's whole-model gradient g (plain, not layer-normalised) is formed exactly (`GradientSketcher` with
the exact projector), preconditioned tensor by tensor in weight space, then sketched with the index's own
projector.

Fit (`fit --kind ekfac-weights`, a pass over the index's own rows with its model; each row's JSON is in
the index). For every attributed ``nn.Linear`` weight W [out, in] (kronfluence's modules):

* ``A = E[a a^T]`` over the tokens of the batches (the layer's inputs) and ``S = E[d d^T]`` (the gradients
  of its outputs), the loss of each row its mean response-token cross-entropy; labels ``sampled`` from the
  model (the true Fisher, kronfluence's default) or ``empirical`` (the rows' own);
* eigenbases ``Q_A``, ``Q_S``; EK-FAC's eigenvalues ``Lambda = E_rows[(Q_S^T G_n Q_A)^2]`` from each row's
  own gradient G_n (with the same kind of labels);
* ``H^-1 G = Q_S [(Q_S^T G Q_A) / (Lambda + lambda)] Q_A^T``, ``lambda = damping x mean(Lambda)`` per tensor
  (``damping`` 3 by default on a sketched index, 0.3 on exact vectors: measured; kronfluence's heuristic
  is 0.1);
* the vocabulary head (`output_head`) is the exception: the diagonal ``E_rows[g^2]``, not a vocabulary x
  vocabulary eigenbasis.

Every other attributed tensor (norm weights, biases, embeddings, a tied head) has a diagonal,
``g / (E[g_n^2] + lambda)``, ``lambda = damping x mean(E[g_n^2])``, but is left out of the query by default
(``tensors="linear"``: kronfluence's modules; with them in, LDS fell from 0.52 to 0.45 at damping 3). On a
layer-normalised index each tensor's ``H^-1 g`` is multiplied by the rows' mean gradient norm there, as
the Lambda pass measures it (with its labels: sampled by default): the stored rows lost their norms, the
query gives them back on average (at damping 3, both changes together: LDS 0.44 -> 0.52 alone, 0.51 -> 0.57
summed with the Fisher).

The sketch costs this preconditioner more than the Fisher: scored against the exact plain gradients the
same factors give LDS 0.60-0.64 (kronfluence's level), against the exact layer-normalised rows 0.53-0.56,
and against the stored K = 2^16 sketches 0.34-0.48 (0.52 with the defaults); the sketch-space Fisher has
no such loss (it is fitted to the sketches themselves). BENCHMARKS.md, "Issue 23: weight-space EK-FAC on the query side".
On an index of exact vectors without layer norm (``build --k 0 --normalize none``) the score is
``<H^-1 g_q, g_i>`` itself, kronfluence's influence: LDS 0.709 against kronfluence's 0.639 on the same
models (`exact_vectors_hint` tells a fit on any other index).

``fisher+ekfac-weights``: both this and the sketch-space Fisher (`precondition`, query norms), as ONE query
vector. A per-query z-score of the scores ``s_i = <q, x_i>`` is ``(s_i - m(q)) / sigma(q)`` with m, sigma
the mean and standard deviation over the stored rows; the mean is the same for every row, so the sum of
the two z-scores ranks exactly as ``<q_1 / sigma_1 + q_2 / sigma_2, x_i>``. sigma is measured on the
stored rows themselves (all of them up to ``SIGMA_ROWS`` = 1,024, else that many spread evenly over the
index; read once per opened index, float16).

Stored as ``ekfac-weights-gNNNN.npz`` (versioned, listed with its checksums in the manifest's files, like
``fisher-gNNNN.npz``); an append or merge drops it as it drops the Fisher.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rapidin_index.errors import PreconditionError

FORMAT_VERSION = 1
WEIGHTS_KIND = "ekfac-weights"
COMBINED_KIND = "fisher+ekfac-weights"
KINDS = (WEIGHTS_KIND, COMBINED_KIND)
DEFAULT_DAMPING = 3.0
"""lambda = DEFAULT_DAMPING x mean(Lambda) of each tensor on a sketched index: the best LDS of the sum (and near
the best alone) on the K = 2^16 benchmark, 0.3 / 1 / 3 / 10 tried (BENCHMARKS.md, issue 23: weight-space
EK-FAC). Far above kronfluence's: the sketch's own error grows with the weight the query gives to the
low-curvature directions."""
EXACT_DAMPING = 0.3
"""The same on an index of exact vectors (K = 0), which has no sketch error to trade against: LDS 0.664 / 0.684
/ 0.703 / 0.709 at 0.01 / 0.03 / 0.1 / 0.3 on the benchmark's rows without layer norm (kronfluence 0.639;
BENCHMARKS.md, "Exact vectors")."""
LABELS = ("sampled", "empirical")
DEFAULT_LABELS = "sampled"
TENSORS = ("linear", "all")
DEFAULT_TENSORS = "linear"
"""linear: only the nn.Linear weights' H^-1 g reaches the query (kronfluence's modules; the diagonal tensors
are left out); all: every attributed tensor, the others with their diagonal."""
SIGMA_ROWS = 1024
"""The combination's per-query standard deviations are measured on at most this many stored rows."""
HEADS = ("diagonal", "kronecker")
DEFAULT_HEAD = "diagonal"
"""The vocabulary head's curvature: diagonal (``E_rows[g^2]``: LDS 0.709 against 0.670 on exact vectors,
0.584 against 0.572 summed with the Fisher at K = 2^16, no vocabulary x vocabulary eigenbasis) or kronecker
(EK-FAC like every other nn.Linear: a K = 2^16 index's ekfac-weights backdoor auPRC@10 0.986 against 0.775).
BENCHMARKS.md, "Issue 23: exact vectors and the head's curvature"."""
DAMPING_RULE = (
    "lambda = damping x mean(Lambda_W) of each weight tensor W (mean(E[g^2]) for a diagonal one); damping "
    f"{DEFAULT_DAMPING:g} on a sketched index, {EXACT_DAMPING:g} on exact vectors (K = 0) unless given"
)


def default_damping(sketch_dim: int) -> float:
    """The damping multiple a fit uses when none is given: `EXACT_DAMPING` for exact vectors (K = 0), else
    `DEFAULT_DAMPING` (the sketch's error, amplified by H^-1, wants more)."""
    return EXACT_DAMPING if sketch_dim == 0 else DEFAULT_DAMPING


def weights_file(generation: int) -> str:
    return f"ekfac-weights-g{generation:04d}.npz"


def exact_vectors_hint(manifest) -> str | None:
    """What to change where an index holds sketches or layer-normalised rows: weight-space EK-FAC predicts
    retraining best against exact vectors that keep their norms (LDS 0.709 against 0.528 on the K = 2^16
    layer-normalised benchmark index; kronfluence 0.639). None where the index already holds those."""
    changes = []
    if manifest.sketch["sketch_dim"] != 0:
        changes.append("--k 0")
    if manifest.normalize != "none":
        changes.append("--normalize none")
    if not changes:
        return None
    return (
        "note: weight-space EK-FAC predicts retraining best against exact vectors that keep their norms "
        f"(build {' '.join(changes)}, --params naming the nn.Linear weights, the only ones the query uses: "
        "LDS 0.71 against 0.53 on a K = 2^16 layer-normalised index, BENCHMARKS.md); that stores D floats "
        "a row, so it suits LoRA adapters and small models"
    )


def is_weight_kind(kind: str | None) -> bool:
    return kind in KINDS


# --------------------------------------------------------------------------- the factors


@dataclass
class TensorFactors:
    """One attributed tensor at [offset, offset + numel) of the flat gradient."""

    offset: int
    numel: int
    eigenvalues: np.ndarray  # [out, in] Lambda (Kronecker), or [numel] E[g^2] (diagonal); float32
    damping: float  # lambda (absolute)
    basis_out: np.ndarray | None = None  # Q_S [out, out] float32; None: diagonal
    basis_in: np.ndarray | None = None  # Q_A [in, in] float32
    scale: float = 1.0  # the query's H^-1 g here is multiplied by it (0: the tensor is left out)

    @property
    def kronecker(self) -> bool:
        return self.basis_out is not None

    def apply(self, gradients: torch.Tensor) -> torch.Tensor:
        """scale x H^-1 of [n, numel] gradients, float32."""
        if self.scale == 0:
            return torch.zeros_like(gradients)
        values = (torch.from_numpy(self.eigenvalues).to(gradients.device) + self.damping) / self.scale
        if not self.kronecker:
            return gradients / values
        out, inside = self.eigenvalues.shape
        basis_out = torch.from_numpy(self.basis_out).to(gradients.device)
        basis_in = torch.from_numpy(self.basis_in).to(gradients.device)
        rotated = basis_out.T @ gradients.reshape(-1, out, inside) @ basis_in
        return (basis_out @ (rotated / values) @ basis_in.T).reshape(gradients.shape[0], -1)


def apply_factors(factors: list[TensorFactors], gradients: torch.Tensor) -> torch.Tensor:
    """scale_t x H^-1 g for flat gradients [n, D] (every tensor's coordinates in the index's order)."""
    out = gradients.to(torch.float32).clone()
    for tensor in factors:
        span = slice(tensor.offset, tensor.offset + tensor.numel)
        out[:, span] = tensor.apply(out[:, span])
    return out


def linear_modules(model: nn.Module, blocks) -> dict[str, nn.Linear]:
    """{block name: its nn.Linear} for the attributed weights that one nn.Linear alone uses (a weight tied
    to an embedding keeps a diagonal)."""
    users: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            users.setdefault(id(parameter), []).append(module)
    found = {}
    for block in blocks:
        modules = users.get(id(block.parameter), [])
        if len(modules) == 1 and isinstance(modules[0], nn.Linear) and modules[0].weight is block.parameter:
            found[block.name] = modules[0]
    return found


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection (the vocabulary head), or None: its curvature is the diagonal
    ``E[g_n^2]``, not Kronecker factors (see `fit_factors`)."""
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def sampled_labels(model: nn.Module, batch, generator: torch.Generator):
    """The batch with each scored label drawn from the model's own next-token distribution."""
    from rapidin_index.data import IGNORE_INDEX
    from rapidin_index.losses import Batch

    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    probabilities = torch.softmax(logits.float(), dim=-1)
    draws = torch.multinomial(
        probabilities.reshape(-1, probabilities.shape[-1]).cpu(), 1, generator=generator
    )
    draws = draws.reshape(logits.shape[:2]).to(batch.labels.device)
    labels = batch.labels.clone()
    scored = labels[:, 1:] != IGNORE_INDEX
    labels[:, 1:] = torch.where(scored, draws, labels[:, 1:])
    return Batch(batch.input_ids, batch.attention_mask, labels)


class _Covariances:
    """A = E[a a^T], S = E[d d^T] of each hooked nn.Linear over the unpadded tokens of the batches."""

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.sums = {
            name: [
                torch.zeros(m.in_features, m.in_features, dtype=torch.float64),
                torch.zeros(m.out_features, m.out_features, dtype=torch.float64),
            ]
            for name, m in modules.items()
        }
        self.tokens = 0

    def hook(self, name: str):
        def forward(module, inputs, output):
            self.inputs[name] = inputs[0].detach()
            self.outputs[name] = output
            return None

        return forward

    def add(self, model: nn.Module, batch) -> None:
        from rapidin_index.losses import token_losses

        handles = [m.register_forward_hook(self.hook(name)) for name, m in self.modules.items()]
        parameters = [m.weight for m in self.modules.values()]
        wanted = [p.requires_grad for p in parameters]
        try:
            for parameter in parameters:
                parameter.requires_grad_(True)  # the outputs must be in the graph
            losses, scored = token_losses(model, batch)  # every position: the head's A counts them all
            losses = losses.sum(dim=1) / scored.sum(dim=1)
            names = list(self.modules)
            gradients = torch.autograd.grad(losses.sum(), [self.outputs[name] for name in names])
        finally:
            for handle in handles:
                handle.remove()
            for parameter, flag in zip(parameters, wanted, strict=True):
                parameter.requires_grad_(flag)
        mask = batch.attention_mask.bool()
        for name, gradient in zip(names, gradients, strict=True):
            a = self.inputs[name][mask].double().cpu()  # [tokens, in]
            d = gradient[mask].double().cpu()  # [tokens, out]
            self.sums[name][0] += a.T @ a
            self.sums[name][1] += d.T @ d
        self.tokens += int(mask.sum())
        self.inputs.clear()
        self.outputs.clear()

    def bases(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{name: (Q_S [out, out], Q_A [in, in])} float32."""
        out = {}
        for name, (a, s) in self.sums.items():
            _, basis_in = torch.linalg.eigh(a / max(self.tokens, 1))
            _, basis_out = torch.linalg.eigh(s / max(self.tokens, 1))
            out[name] = (basis_out.float().numpy(), basis_in.float().numpy())
        return out


def fit_factors(
    model: nn.Module,
    blocks,
    exact_sketcher,
    batches: list,
    labels: str = DEFAULT_LABELS,
    damping: float = DEFAULT_DAMPING,
    seed: int = 0,
    tensors: str = DEFAULT_TENSORS,
    row_norms: bool = True,
    head: str = DEFAULT_HEAD,
) -> list[TensorFactors]:
    """EK-FAC factors of every attributed tensor from ``batches`` (`losses.Batch`, each row's mean
    response-token loss); ``exact_sketcher``: a `GradientSketcher` over ``blocks`` with the exact projector
    and no normalisation (each row's own gradient).

    With ``head="diagonal"`` (the default, `HEADS`) the vocabulary head (`output_head`), an nn.Linear, gets
    the diagonal ``E[g_n^2]`` instead of Kronecker factors: its output side's eigenbasis is vocabulary x
    vocabulary (9.7 GB for a 49k vocabulary, and most of a query's cost on the LDS benchmark's 2,000), and
    on that benchmark the diagonal predicts retraining better (`DEFAULT_HEAD`).

    Each tensor's ``scale``: 0 for a diagonal tensor other than the head with ``tensors="linear"``
    (kronfluence's modules only), times, with ``row_norms``, the rows' mean gradient norm in that tensor
    with ``labels`` (on a layer-normalised index the stored rows lost it: the query puts it back on
    average)."""
    if labels not in LABELS:
        raise PreconditionError(f"--labels {labels!r} is not one of {', '.join(LABELS)}")
    if tensors not in TENSORS:
        raise PreconditionError(f"tensors {tensors!r} is not one of {', '.join(TENSORS)}")
    if head not in HEADS:
        raise PreconditionError(f"--head {head!r} is not one of {', '.join(HEADS)}")
    if damping <= 0:
        raise PreconditionError(f"--damping must be > 0 (a multiple of the mean eigenvalue), got {damping}")
    if not batches:
        raise PreconditionError("the index holds no rows: there is nothing to fit EK-FAC from")
    generator = torch.Generator().manual_seed(seed)

    def labelled(batch):
        return sampled_labels(model, batch, generator) if labels == "sampled" else batch

    linear = linear_modules(model, blocks)
    diagonal_head = output_head(model) if head == "diagonal" else None
    kronecker = {name: module for name, module in linear.items() if module is not diagonal_head}
    covariances = _Covariances(kronecker)
    if kronecker:
        for batch in batches:
            covariances.add(model, labelled(batch))
    bases = covariances.bases()
    sums = {block.name: torch.zeros(block.parameter.shape, dtype=torch.float64) for block in blocks}
    norms = {block.name: 0.0 for block in blocks}
    rows = 0
    for batch in batches:
        flat = exact_sketcher.sketch(labelled(batch)).vectors.cpu()  # [batch, D]: each row's own gradient
        rows += flat.shape[0]
        for block in blocks:
            gradient = flat[:, block.offset : block.offset + block.numel].double()
            norms[block.name] += float(gradient.norm(dim=1).sum())
            if block.name in kronecker:
                basis_out, basis_in = (torch.from_numpy(m).double() for m in bases[block.name])
                shape = (-1, *block.parameter.shape)
                sums[block.name] += (basis_out.T @ gradient.reshape(shape) @ basis_in).square().sum(0)
            else:
                sums[block.name] += gradient.square().sum(0).reshape(block.parameter.shape)
    factors = []
    for block in blocks:
        values = (sums[block.name] / rows).float()
        mean = float(values.mean())
        lam = damping * mean if mean > 0 else damping
        scale = norms[block.name] / rows if row_norms else 1.0
        if block.name in kronecker:
            basis_out, basis_in = bases[block.name]
            factors.append(
                TensorFactors(block.offset, block.numel, values.numpy(), lam, basis_out, basis_in, scale)
            )
        else:
            scale = 0.0 if tensors == "linear" and block.name not in linear else scale
            factors.append(
                TensorFactors(block.offset, block.numel, values.reshape(-1).numpy(), lam, scale=scale)
            )
    return factors


# --------------------------------------------------------------------------- the file


def save_factors(path: Path, factors: list[TensorFactors]) -> None:
    from rapidin_index.files import atomic_file

    arrays = {
        "version": np.array([FORMAT_VERSION]),
        "offsets": np.array([[f.offset, f.numel] for f in factors], dtype=np.int64).reshape(-1, 2),
        "kronecker": np.array([int(f.kronecker) for f in factors], dtype=np.int64),
        "damping": np.array([f.damping for f in factors], dtype=np.float64),
        "scale": np.array([f.scale for f in factors], dtype=np.float64),
    }
    for number, tensor in enumerate(factors):
        arrays[f"eigenvalues_{number}"] = tensor.eigenvalues
        if tensor.kronecker:
            arrays[f"out_{number}"], arrays[f"in_{number}"] = tensor.basis_out, tensor.basis_in
    with atomic_file(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)


def load_factors(path: Path, gradient_dim: int) -> list[TensorFactors]:
    """The factors of an ``ekfac-weights`` file, checked: version, shapes, and tensors that tile the gradient."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            version = int(stored["version"][0])
            if version > FORMAT_VERSION:
                raise PreconditionError(
                    f"{path.name} is weight-space EK-FAC format {version}; this rapidin-index reads up to "
                    f"{FORMAT_VERSION}: upgrade rapidin-index"
                )
            factors = []
            for number, (offset, numel) in enumerate(stored["offsets"]):
                values = stored[f"eigenvalues_{number}"]
                damping = float(stored["damping"][number])
                if stored["kronecker"][number]:
                    basis_out, basis_in = stored[f"out_{number}"], stored[f"in_{number}"]
                    if values.shape != (basis_out.shape[0], basis_in.shape[0]):
                        raise PreconditionError(f"{path.name}: tensor {number}'s bases do not match it")
                else:
                    basis_out = basis_in = None
                if values.size != numel:
                    raise PreconditionError(f"{path.name}: tensor {number} does not cover its span")
                scale = float(stored["scale"][number])
                factors.append(
                    TensorFactors(int(offset), int(numel), values, damping, basis_out, basis_in, scale)
                )
    except (OSError, KeyError, ValueError) as error:
        raise PreconditionError(
            f"{path.name} is not a readable EK-FAC file ({str(error)[:120]}); refit it: rapidin-index fit "
            f"--index {path.parent} --kind {WEIGHTS_KIND}"
        ) from None
    position = 0
    for tensor in sorted(factors, key=lambda f: f.offset):
        if tensor.offset != position:
            break
        position += tensor.numel
    if position != gradient_dim:
        raise PreconditionError(
            f"{path.name} does not cover this index's {gradient_dim:,} gradient dims; refit it"
        )
    return factors


# --------------------------------------------------------------------------- an index's fit


def exact_sketcher(index):
    """A `GradientSketcher` over the index's tensors that returns each row's plain gradient [rows, D]."""
    from rapidin_index.gradients import GradientSketcher
    from rapidin_index.sketch.exact import ExactProjector

    sketcher = GradientSketcher(
        index.loaded.model,
        index.blocks,
        ExactProjector(index.manifest.sketch["gradient_dim"], index.device),
        "none",
    )
    if index.sketcher.self_checked:
        sketcher.take_self_check(index.sketcher.backward_path)
    return sketcher


def project(projector, gradients: torch.Tensor, factors: list[TensorFactors] | None = None) -> torch.Tensor:
    """The index's sketch of plain flat gradients [n, D] -> [n, K] (no normalisation). With ``factors``
    (their offsets), a tensor whose scale is 0 is skipped (its coordinates are zero) and, on rapidgrad-kron,
    each matrix is sketched by the count-sketch matmuls (`sketch_matrix`) instead of a scatter."""
    gradients = gradients.to(torch.float32)
    out = projector.new_output(gradients.shape[0])
    if factors is None:
        projector.project_block(out, gradients.to(out.device), 0)
        return out
    for tensor in factors:
        if tensor.scale == 0:
            continue
        part = gradients[:, tensor.offset : tensor.offset + tensor.numel].to(out.device)
        segment = projector.segment(tensor.offset) if hasattr(projector, "sketch_matrix") else None
        if segment is not None and segment.rows > 1 and segment.rows * segment.cols == tensor.numel:
            matrix = part.reshape(len(part), segment.rows, segment.cols)
            projector.add_segment_sketch(out, projector.sketch_matrix(matrix, tensor.offset), tensor.offset)
        else:
            projector.project_block(out, part, tensor.offset)
    return out


class WeightPreconditioner:
    """``ekfac-weights`` at query time: each query's plain gradient, H^-1 in weight space, then sketched."""

    weight_space = True

    def __init__(self, factors: list[TensorFactors], record: dict) -> None:
        self.factors = factors
        self.record = record
        self._sketcher = None

    def gradients(self, index, queries, per_token: bool, sketch) -> tuple[torch.Tensor, np.ndarray]:
        """([n, D] plain gradients of the query vectors ``sketch`` (retrieval's query sketching, given by
        `retrieval.sketch_queries`) makes, losses): ``sketch`` run with the exact sketcher in the index's."""
        if self._sketcher is None:
            self._sketcher = exact_sketcher(index)
        own = index.sketcher
        index.sketcher = self._sketcher
        try:
            vectors, losses = sketch(index, queries, per_token)
        finally:
            index.sketcher = own
        return torch.from_numpy(vectors), losses

    def sketch_queries(self, index, queries, per_token: bool, sketch) -> tuple[np.ndarray, np.ndarray]:
        gradients, losses = self.gradients(index, queries, per_token, sketch)
        vectors = project(index.sketcher.projector, apply_factors(self.factors, gradients), self.factors)
        return vectors.cpu().numpy(), losses


class CombinedPreconditioner(WeightPreconditioner):
    """``fisher+ekfac-weights``: ``q_1 / sigma_1 + q_2 / sigma_2`` with q_1 the Fisher's query (query norms)
    and q_2 the weight-space EK-FAC's, sigma each one's score deviation over the stored rows."""

    def __init__(self, factors, record, fisher) -> None:
        super().__init__(factors, record)
        self.fisher = fisher
        self.rows = None  # `sample_rows`, read on first use

    def sketch_queries(self, index, queries, per_token: bool, sketch) -> tuple[np.ndarray, np.ndarray]:
        gradients, losses = self.gradients(index, queries, per_token, sketch)
        projector = index.sketcher.projector
        every = [dataclasses.replace(f, scale=1.0) for f in self.factors]  # offsets: every tensor
        fisher = self.fisher.apply(project(projector, gradients, every).cpu().numpy())
        ekfac = project(projector, apply_factors(self.factors, gradients), self.factors).cpu().numpy()
        if self.rows is None:
            self.rows = sample_rows(index)
        return combine([fisher, ekfac], self.rows), losses


def sample_rows(index, limit: int = SIGMA_ROWS) -> np.ndarray:
    """Stored vectors [m, K] float16: all rows up to ``limit``, else ``limit`` spread evenly."""
    stored = index.stored_index
    positions = np.unique(np.linspace(0, stored.count - 1, min(limit, stored.count)).round().astype(np.int64))
    return np.asarray(stored.read_positions(positions), dtype=np.float16)


def combine(queries: list[np.ndarray], rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """sum_j q_j / sigma_j, sigma_j [n] the standard deviation of q_j's scores over ``rows`` [m, K]."""
    stacked = np.concatenate(queries).astype(np.float32)  # [parts * n, K]
    scores = np.concatenate(
        [rows[start : start + chunk].astype(np.float32) @ stacked.T for start in range(0, len(rows), chunk)]
    )  # [m, parts * n]
    sigma = scores.astype(np.float64).std(axis=0)
    sigma = np.where(sigma > 0, sigma, 1.0).reshape(len(queries), -1)  # [parts, n]
    out = np.zeros_like(queries[0], dtype=np.float32)
    for vectors, deviation in zip(queries, sigma, strict=True):
        out += (vectors / deviation[:, None]).astype(np.float32)
    return out


def load_weight_preconditioner(index_dir: Path, manifest, kind: str, verified: bool = False):
    """The fitted ``ekfac-weights`` (or, for ``fisher+ekfac-weights``, the combination), checksum-checked
    (``verified``: as `precondition.checked_fit_file`)."""
    record = manifest.precondition or {}
    weights = record if record.get("kind") == WEIGHTS_KIND else record.get("weights")
    if not weights:
        raise PreconditionError(
            f"{index_dir} has no weight-space EK-FAC fit (an append or merge drops it); fit it with: "
            f"rapidin-index fit --index {index_dir} --kind {kind}, or query with --precondition none"
        )
    from rapidin_index.precondition import checked_fit_file, load_preconditioner

    name = weights_file(manifest.generation)
    path = checked_fit_file(index_dir, manifest, name, f"--index {index_dir} --kind {kind}", verified)
    factors = load_factors(path, manifest.sketch["gradient_dim"])
    if kind == WEIGHTS_KIND:
        return WeightPreconditioner(factors, record)
    fisher = load_preconditioner(index_dir, manifest, "fisher", verified)
    return CombinedPreconditioner(factors, record, fisher)
