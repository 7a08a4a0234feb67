"""Calibration statistics of a linear layer's inputs, accumulated batch by batch.

The layer-by-layer engine owns the hooks; it feeds each captured input `x` of shape (..., in)
to `update`. Every leading position (batch x token) counts as one sample, so `nsamples` is a
token count. Both statistics keep a running *average* (rescale the old value, add the new
batch), which stays in a fixed numeric range however many tokens arrive, instead of a running
sum that grows without bound in float32.

- `HessianStat.hessian`  H = 2/n Σ xᵀx  (in, in), float32: the GPTQ/SparseGPT Hessian of the
  layer-wise objective ‖W X − Ŵ X‖².
- `InputNormStat.norms`  sqrt(1/n Σ x_j²) per input column (the RMS, not the raw ℓ2 norm), for
  Wanda/AWQ-style importance. The raw ℓ2 norm ‖X_j‖₂ is `norms * sqrt(nsamples)`; within one
  layer the two rank columns identically, and the RMS is comparable across layers that saw
  different token counts.

Statistics live on the device given at construction, or else on the device of the first batch.
"""

from __future__ import annotations

import torch

from memfit.errors import UserError


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, statistic expects {in_features}")
    return x.detach().reshape(-1, in_features)  # (n, in)


def _empty_error(what: str) -> UserError:
    return UserError(f"no calibration samples reached this layer, so its {what} is undefined; "
                     "give more calibration text or check that the layer is used in forward")


class HessianStat:
    """Running H = 2/n Σ xᵀx over all rows of every `update(x)`."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.device = device
        self.nsamples = 0
        self._h: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _rows(x, self.in_features)
        n = x.shape[0]
        if n == 0:
            return
        if self._h is None:
            dev = x.device if self.device is None else self.device
            self._h = torch.zeros(self.in_features, self.in_features, device=dev)
        x = x.to(self._h.device, torch.float32)
        total = self.nsamples + n
        self._h.mul_(self.nsamples / total)
        self._h.addmm_(x.T, x, alpha=2.0 / total)
        self.nsamples = total

    def isotropic(self) -> None:
        """No sample arrived (an expert no calibration token was routed to): assume white,
        unit-variance inputs, H = 2 I, under which GPTQ rounds to nearest and SparseGPT
        prunes by magnitude."""
        self._h = 2 * torch.eye(self.in_features, device=self.device)

    @property
    def hessian(self) -> torch.Tensor:
        """(in, in) float32, 2/n Σ xᵀx (the live buffer: clone before modifying)."""
        if self._h is None:
            raise _empty_error("Hessian")
        return self._h

    @property
    def norms(self) -> torch.Tensor:
        """(in,) float32 RMS per input column, sqrt(H_jj / 2): what InputNormStat.norms gives."""
        return (self.hessian.diagonal() / 2).sqrt()


class InputNormStat:
    """Running mean of x_j² per input column; `norms` is its square root (RMS per column)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.device = device
        self.nsamples = 0
        self._mean_sq: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _rows(x, self.in_features)
        n = x.shape[0]
        if n == 0:
            return
        if self._mean_sq is None:
            dev = x.device if self.device is None else self.device
            self._mean_sq = torch.zeros(self.in_features, device=dev)
        x = x.to(self._mean_sq.device, torch.float32)
        total = self.nsamples + n
        self._mean_sq.mul_(self.nsamples / total)
        self._mean_sq.add_(x.pow(2).sum(0), alpha=1.0 / total)
        self.nsamples = total

    def isotropic(self) -> None:
        """No sample arrived: unit mean square in every column (Wanda becomes magnitude)."""
        self._mean_sq = torch.ones(self.in_features, device=self.device)

    @property
    def mean_sq(self) -> torch.Tensor:
        """(in,) float32, 1/n Σ x_j²."""
        if self._mean_sq is None:
            raise _empty_error("input norm")
        return self._mean_sq

    @property
    def norms(self) -> torch.Tensor:
        """(in,) float32 RMS per column, sqrt(1/n Σ x_j²)."""
        return self.mean_sq.sqrt()
