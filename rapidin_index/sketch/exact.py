"""K = 0: no sketch; the stored vector is the normalised gradient itself."""

from __future__ import annotations

import torch


class ExactProjector:
    """K = 0: the "sketch" is the normalised gradient itself, so scores are exact (for small models)."""

    def __init__(self, gradient_dim: int, device: torch.device | str = "cpu") -> None:
        self.gradient_dim = gradient_dim
        self.output_dim = gradient_dim
        self.device = torch.device(device)

    def project_block(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        out[:, offset : offset + block.shape[1]] += block.to(torch.float32)

    def project_rows(self, out: torch.Tensor, ids: torch.Tensor, cols: torch.Tensor, offset: int) -> None:
        """out += an embedding's gradient given by its looked-up rows (ids [batch, T], cols [batch, T, C])."""
        width = cols.shape[-1]
        target = offset + ids[:, :, None] * width + torch.arange(width, device=ids.device)  # [batch, T, C]
        target = target + torch.arange(out.shape[0], device=ids.device)[:, None, None] * out.shape[1]
        out.view(-1).index_add_(0, target.reshape(-1), cols.float().reshape(-1))

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.output_dim, dtype=torch.float32, device=self.device)
