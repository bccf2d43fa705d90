"""Sparse Variational Dropout linear layer (Molchanov, Ashukha & Vetrov 2017)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.sparsity import log_alpha, sparse_vd_kl
from ._common import check_features, check_linear, copy_bias
from ._fast import (
    csr_linear,
    device_key,
    grad_needed,
    layer_cache,
    prepare_forward,
    sparse_is_faster,
    sparse_supported,
    to_csr,
    tokens_of,
    use_cache,
)
from .pruned import PrunedLinear

__all__ = ["SparseVDLinear", "model_kl"]


class SparseVDLinear(nn.Module):
    """A linear layer with a fully factorised Gaussian posterior ``w_ij ~ N(theta_ij, sigma_ij^2)``.

    Trained by maximising the ELBO ``sum log p(y | x, w) - KL(q || p)`` with the log-uniform prior
    ``p(|w|) ∝ 1/|w|``; :meth:`kl` gives the paper's approximation of the KL term. In training mode the local
    reparameterisation trick samples pre-activations: ``y ~ N(x theta^T + b, (x^2) sigma^2^T)``. In eval mode
    the layer is deterministic: ``y = x (theta * 1[log alpha <= threshold])^T + b`` with
    ``log alpha = log sigma^2 - log theta^2``; weights with ``log alpha > threshold`` are zero. Without autograd
    that eval weight is cached until ``theta``, ``log sigma^2`` or ``threshold`` change, and a cached CSR copy is
    used instead when the cost model predicts the sparse kernel to be faster (see :meth:`forward_path` and
    :mod:`compressed_transformer.layers._fast`).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        threshold: ``log alpha`` above which a weight is dropped at eval (3 in the paper, i.e. ``alpha > ~20``).
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        threshold: float = 3.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        self.theta = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.log_sigma2 = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self, log_sigma2_init: float = -10.0) -> None:
        """``nn.Linear``'s default init for ``theta`` and the bias; ``log sigma^2`` set to ``log_sigma2_init``."""
        nn.init.kaiming_uniform_(self.theta, a=math.sqrt(5))
        nn.init.constant_(self.log_sigma2, log_sigma2_init)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, threshold: float = 3.0, log_sigma2_init: float = -10.0
    ) -> SparseVDLinear:
        """Start from a trained ``nn.Linear``: ``theta = W``, ``log sigma^2 = log_sigma2_init`` (near-deterministic).

        ``linear`` is not modified.
        """
        check_linear(linear, cls.__name__)
        with torch.no_grad():
            weight = linear.weight.detach()
            layer = cls(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                threshold=threshold,
                device=weight.device,
                dtype=weight.dtype,
            )
            layer.theta.copy_(weight)
            layer.log_sigma2.fill_(log_sigma2_init)
            copy_bias(layer.bias, linear)
        return layer

    def log_alpha(self) -> torch.Tensor:
        """``log alpha`` of every weight, ``(out_features, in_features)``, clamped to ``[-10, 10]``."""
        return log_alpha(self.theta, self.log_sigma2)

    def mask(self) -> torch.Tensor:
        """Weights kept at eval: ``log alpha <= threshold`` (``bool``)."""
        return self.log_alpha() <= self.threshold

    def kl(self) -> torch.Tensor:
        """Approximate ``KL(q || p)`` summed over the layer's weights (Molchanov et al. 2017, eq. 14)."""
        return sparse_vd_kl(self.log_alpha())

    @property
    def sparsity(self) -> float:
        """Fraction of weights dropped at eval."""
        with torch.no_grad():
            return 1.0 - float(self.mask().sum()) / self.theta.numel()

    def to_dense(self) -> torch.Tensor:
        """The eval-mode weight ``theta * mask``, ``(out_features, in_features)``."""
        return self.theta * self.mask()

    @property
    def weight(self) -> torch.Tensor:
        """The eval-mode weight ``theta * mask`` (computed; in eval mode without autograd, the cached copy the
        forward uses)."""
        if use_cache(self, grad_needed([self.theta, self.log_sigma2])):
            return self._eval_weight()[0]
        return self.to_dense()

    def to_pruned(self) -> PrunedLinear:
        """The equivalent deterministic :class:`PrunedLinear` (same eval-mode output)."""
        with torch.no_grad():
            layer = PrunedLinear(
                self.in_features,
                self.out_features,
                self.bias is not None,
                device=self.theta.device,
                dtype=self.theta.dtype,
            )
            layer.weight.copy_(self.theta)
            layer.set_mask_(self.mask())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def num_stored_params(self) -> int:
        """Weights kept at eval plus bias (``log sigma^2`` is not needed for inference)."""
        bias = self.out_features if self.bias is not None else 0
        with torch.no_grad():
            return int(self.mask().sum()) + bias

    def _eval_weight(self) -> tuple[torch.Tensor, int]:
        """The cached eval-mode weight and its number of nonzeros."""

        def build() -> tuple[torch.Tensor, int]:
            weight = self.to_dense()
            return weight, int(torch.count_nonzero(weight))

        return layer_cache(self).get("eval", [self.theta, self.log_sigma2], build, (self.threshold,))

    def use_sparse(self, tokens: int) -> bool:
        """Whether an eval-mode forward without autograd uses the CSR kernel for ``tokens`` input vectors."""
        if not sparse_supported(self.theta) or tokens == 0:  # see PrunedLinear
            return False
        nnz = self._eval_weight()[1]
        return sparse_is_faster(device_key(self.theta), tokens, self.in_features, self.out_features, nnz)

    def forward_path(self, tokens: int, *, train: bool = False) -> str:
        """``"csr"`` or ``"dense"`` (eval mode), or ``"sampled"`` (training mode): the path for ``tokens``."""
        if train:
            return "sampled"
        return "csr" if self.use_sparse(tokens) else "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = tokens_of(x, self.in_features)
        if not self.training:
            if not prepare_forward(self, [self.theta, self.log_sigma2, self.bias]):
                return F.linear(x, self.to_dense(), self.bias)
            weight, _ = self._eval_weight()
            if self.use_sparse(tokens):
                key = (self.threshold,)
                csr = layer_cache(self).get("csr", [self.theta, self.log_sigma2], lambda: to_csr(weight), key)
                return csr_linear(x, csr, self.bias)
            return F.linear(x, weight, self.bias)
        prepare_forward(self, [self.theta, self.log_sigma2, self.bias])  # drops the eval cache
        mean = F.linear(x, self.theta, self.bias)
        var = F.linear(x * x, torch.exp(self.log_sigma2))
        return mean + torch.sqrt(var + 1e-8) * torch.randn_like(mean)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={self.threshold}"
        )


def model_kl(model: nn.Module) -> torch.Tensor:
    """Total KL term of every :class:`SparseVDLinear` in ``model`` (a zero tensor when there is none)."""
    terms = [m.kl() for m in model.modules() if isinstance(m, SparseVDLinear)]
    if not terms:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack(terms).sum()
