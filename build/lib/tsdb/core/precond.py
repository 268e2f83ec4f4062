"""EDM preconditioning: the one place where the denoiser D is formed from the raw network F."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


class RawNetwork(Protocol):
    """F(x, c_in * z, c_noise): the network inside the preconditioner."""

    def __call__(self, context: Tensor, scaled_noisy: Tensor, c_noise: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Preconditioning:
    """EDM preconditioning coefficients for a given sigma_data."""

    sigma_data: float = 0.5

    def c_skip(self, sigma: Tensor) -> Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma**2 + self.sigma_data**2).sqrt()

    @staticmethod
    def c_noise(sigma: Tensor) -> Tensor:
        return sigma.log() / 4.0

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """w(sigma) = 1 / c_out^2 = (sigma^2 + sd^2) / (sigma * sd)^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, net: RawNetwork, context: Tensor, z: Tensor, sigma: Tensor) -> Tensor:
        """D(z, sigma | x) = c_skip z + c_out F(x, c_in z, c_noise).

        ``z`` is ``[batch, H]`` or ``[batch, samples, H]``; ``sigma`` is per series ``[batch]`` or
        per position ``[batch, H]``.
        """
        # per series [b] or per position [b, H], broadcast over samples [b, S, H] and positions
        s = sigma.reshape(sigma.shape[0], *([1] * (z.dim() - sigma.dim())), *sigma.shape[1:])
        f = net(context, self.c_in(s) * z, self.c_noise(sigma))
        return self.c_skip(s) * z + self.c_out(s) * f
