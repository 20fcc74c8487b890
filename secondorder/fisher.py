"""Monte-Carlo Fisher: labels sampled from the model's predictive distribution.

The empirical Fisher uses the gradients of the loss on the *true* labels. The Fisher
proper is an expectation over labels drawn from the model itself,
``F = E_x E_{y ~ p(y|x)} [∇ log p(y|x) ∇ log p(y|x)ᵀ]``; one sampled label per example
gives an unbiased estimate of it (Martens & Grosse, 2015, §5). For K-FAC this means a
second backward pass, of the loss of sampled labels, that feeds the ``G`` statistics
(the input statistics ``A`` come from the forward pass and are the same either way).

Likelihoods (``outputs`` has the examples along its leading dimension):

* ``"categorical"``: ``outputs`` are logits ``(n, C)`` or ``(n, ..., C)``, softmax over
  the last dimension; targets are class indices of shape ``outputs.shape[:-1]``; the
  loss is the cross-entropy.
* ``"bernoulli"``: ``outputs`` are logits of any shape ``(n, ...)``; targets are 0/1
  drawn from ``sigmoid(outputs)``; the loss is the binary cross-entropy with logits.
* ``"gaussian"``: ``outputs`` are means ``(n, ...)``; targets are
  ``outputs + sigma * N(0, 1)``; the loss is ``0.5 ||y - mean||² / sigma²``.

The loss is the negative log-likelihood of one example (summed over every output
dimension and position, constants dropped) *averaged over the n examples*: the
convention under which K-FAC's ``G = n Σ g gᵀ`` is the per-example average of the
outer products of per-example gradients. With it the expected ``G`` of one row is
``diag(p) - p pᵀ`` (categorical), ``diag(p (1 - p))`` (Bernoulli) and ``I / sigma²``
(Gaussian): the Fisher of the likelihood with respect to the layer output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: the likelihoods :func:`sample_targets` and :func:`sampled_loss` know
LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


def check_likelihood(likelihood: str) -> str:
    """``likelihood`` if it is one of :data:`LIKELIHOODS`, else ``ValueError``."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return likelihood


def check_sigma(sigma: float) -> float:
    """The Gaussian standard deviation as a float if finite and > 0, else ``ValueError``."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def _check_outputs(outputs: Tensor, likelihood: str) -> None:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"outputs must be a Tensor, got {type(outputs).__name__}")
    if not outputs.is_floating_point():
        raise TypeError(f"outputs must be floating point, got {outputs.dtype}")
    least = 2 if likelihood == "categorical" else 1
    if outputs.dim() < least or outputs.shape[0] == 0:
        shape = "(n, C) or (n, ..., C) logits" if least == 2 else "(n, ...) with n >= 1"
        raise ValueError(
            f"{likelihood} outputs must have shape {shape} (examples first), "
            f"got {tuple(outputs.shape)}"
        )


@torch.no_grad()
def sample_targets(
    outputs: Tensor,
    likelihood: str,
    generator: torch.Generator | None = None,
    *,
    sigma: float = 1.0,
) -> Tensor:
    """Targets drawn from the predictive distribution the ``outputs`` parametrise.

    Args:
        outputs (Tensor): the model's outputs, examples along the leading dimension
            (logits for ``"categorical"`` and ``"bernoulli"``, means for ``"gaussian"``).
        likelihood (str): ``"categorical"``, ``"bernoulli"`` or ``"gaussian"``.
        generator (torch.Generator, optional): the random source, on the outputs'
            device (default: None, PyTorch's global generator).
        sigma (float, optional): standard deviation of the Gaussian (default: 1).

    Returns:
        No gradient history. ``"categorical"``: class indices (``torch.long``) of shape
        ``outputs.shape[:-1]``; ``"bernoulli"``: 0./1. of the outputs' shape and dtype;
        ``"gaussian"``: ``outputs + sigma * ε``, ``ε ~ N(0, I)``, of the outputs' shape.
    """
    check_likelihood(likelihood)
    _check_outputs(outputs, likelihood)
    outputs = outputs.detach()
    if likelihood == "categorical":
        # float32 at least: multinomial needs probabilities it can normalise reliably
        dtype = torch.promote_types(outputs.dtype, torch.float32)
        probs = torch.softmax(outputs.to(dtype).reshape(-1, outputs.shape[-1]), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator)
        return labels.reshape(outputs.shape[:-1])
    if likelihood == "bernoulli":
        return torch.bernoulli(torch.sigmoid(outputs), generator=generator)
    sigma = check_sigma(sigma)
    noise = torch.randn(
        outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device
    )
    return outputs + sigma * noise


def sampled_loss(
    outputs: Tensor,
    likelihood: str,
    generator: torch.Generator | None = None,
    *,
    sigma: float = 1.0,
) -> Tensor:
    """The loss of labels sampled by :func:`sample_targets`, differentiable in ``outputs``.

    The negative log-likelihood of each example, summed over its output dimensions
    and positions (constants dropped), averaged over the ``n`` examples of the leading
    dimension. Its gradient with respect to the outputs is ``1/n`` times the
    per-example score, as K-FAC's mean-over-the-batch convention expects.

    Args:
        outputs, likelihood, generator, sigma: as for :func:`sample_targets`.

    Returns:
        A scalar tensor.
    """
    targets = sample_targets(outputs, likelihood, generator, sigma=sigma)
    n = outputs.shape[0]
    if likelihood == "categorical":
        logits = outputs.reshape(-1, outputs.shape[-1])
        return F.cross_entropy(logits, targets.reshape(-1), reduction="sum") / n
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum") / n
    sigma = check_sigma(sigma)
    return 0.5 * (targets - outputs).square().sum() / (sigma * sigma * n)
