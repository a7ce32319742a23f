"""The projector contract the gradient stage relies on, and `make_projector`, which picks the
implementation a `SketchSettings` names."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from rapidin_index.factors import OuterFactors
from rapidin_index.settings import SketchSettings, resolve_algorithm, resolve_sketch_dim
from rapidin_index.sketch.exact import ExactProjector
from rapidin_index.sketch.kron import KRON_ALGORITHM, RapidGradKronProjector
from rapidin_index.sketch.ts import TS_ALGORITHM, RapidGradTSProjector
from rapidin_index.sketch.v1 import RapidGradV1Projector
from rapidin_index.sketch.v2 import RapidGradV2Projector


@runtime_checkable
class Projector(Protocol):
    """Adds the sketch of a materialised gradient block into a [batch, K] float32 output."""

    output_dim: int

    def new_output(self, batch: int) -> torch.Tensor:
        """[batch, output_dim] float32 zeros on the projector's device."""

    def project_block(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        """out += the sketch of ``block`` ([batch, n], coordinates [offset, offset + n) of the gradient)."""


@runtime_checkable
class RowProjector(Projector, Protocol):
    """Also sketches an embedding's gradient from its looked-up rows, never [vocab, C] of it."""

    def project_rows(self, out: torch.Tensor, ids: torch.Tensor, cols: torch.Tensor, offset: int) -> None:
        """out += the sketch of the block at ``offset`` whose row ``ids[:, t]`` gets ``cols[:, t]``."""


@runtime_checkable
class FactorProjector(Projector, Protocol):
    """Also sketches a weight matrix's per-example gradient from its outer-product factors."""

    def project_factors(
        self, out: torch.Tensor, factors: list[OuterFactors], offset: int, scale: torch.Tensor | None = None
    ) -> None:
        """out += scale[b] * sketch(sum of the factors' outer products) of the 2-D block at ``offset``."""


@runtime_checkable
class NormingFactorProjector(FactorProjector, Protocol):
    """A factor projector that also returns the block's squared norm from the same pass (rapidgrad-ts)."""

    def sketch_factors(self, factors: list[OuterFactors], offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(unscaled sketch [batch, K], squared Frobenius norms [batch] float64) of the factors' sum."""


def make_projector(
    settings: SketchSettings,
    gradient_dim: int,
    device: torch.device | str = "cpu",
    blocks: list | None = None,
) -> Projector:
    """The projector of ``settings``: exact (K = 0), rapidgrad-v2, rapidgrad-v1, rapidgrad-ts or -kron.

    ``blocks`` (the `capture.GradientBlock` list, in order) is for algorithms that hash by a block's
    shape rather than by flat position (rapidgrad-ts); the flat ones ignore it. 'auto' resolves from them
    as a build resolves it (:func:`settings.resolve_algorithm`; no blocks: rapidgrad-v2).
    """
    settings = resolve_algorithm(resolve_sketch_dim(settings, gradient_dim), blocks or [])
    if settings.exact:
        return ExactProjector(gradient_dim, device)
    if settings.algorithm == TS_ALGORITHM:
        return RapidGradTSProjector(settings, gradient_dim, device, blocks=blocks)
    if settings.algorithm == KRON_ALGORITHM:
        return RapidGradKronProjector(settings, gradient_dim, device, blocks=blocks)
    if settings.algorithm == "rapidgrad-v1":
        return RapidGradV1Projector(settings, gradient_dim, device)
    return RapidGradV2Projector(settings, gradient_dim, device)
