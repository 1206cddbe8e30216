"""High-norm ("artifact") patch tokens (Darcet, Oquab, Mairal & Bojanowski 2024, "Vision Transformers Need
Registers", ICLR): large, well-trained ViTs recycle a few low-information patch tokens as global scratch
space; their output norm is far above the rest (a bimodal norm histogram, Fig. 3) and they draw the
spiky attention artifacts in [CLS] maps. Registers were proposed to take that role.

`token_norms` reads the block-output norms recorded by ``capture(..., token_norms=True)`` (``(num_layers,
batch, N)``, before the final norm) and flags outlier *patch* tokens per layer (prefix tokens are left out of
the fit: registers and [CLS] are expected to be large):

- ``threshold=T``: a token is an artifact iff its norm ``> T`` (Darcet et al. use 150 for DINOv2 ViT-g);
- otherwise a two-component 1-D Gaussian mixture is fitted per layer by EM (`fit_gmm_1d`) on the patch
  norms of all images; tokens above the point where the high component's weighted density overtakes the
  low one's (`gmm_threshold`) are artifacts, provided the components are separated: Ashman's
  ``D = sqrt(2) |mu_2 - mu_1| / sqrt(s_1^2 + s_2^2) >= min_separation`` (default 2, the usual criterion for a
  clean split), the mixture explains the norms better than one Gaussian by the Bayesian information
  criterion (``BIC = -2 log L + k ln n``, ``k = 5`` vs ``2``: EM always finds *some* split, even in a
  unimodal layer), and the high component is a minority (weight ``< 0.5``; Darcet et al. report about 2% of
  tokens); otherwise the layer gets no artifacts (threshold ``inf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError


@dataclass
class GaussianMixture1D:
    """Two 1-D Gaussians, sorted by mean: ``weights``, ``means``, ``stds`` each ``(2,)`` float64."""

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    log_likelihood: float = math.nan  # of the data it was fitted on

    @property
    def separation(self) -> float:
        """Ashman's D between the two components."""
        m, s = self.means, self.stds
        return float(math.sqrt(2.0) * abs(m[1] - m[0]) / torch.sqrt(s[0] ** 2 + s[1] ** 2).clamp_min(1e-300))

    def log_weighted_density(self, x: torch.Tensor) -> torch.Tensor:
        """``log(pi_k N(x; mu_k, s_k))`` for each component: ``(n, 2)``."""
        x = x.double()[:, None]
        return (self.weights.log() - self.stds.log() - 0.5 * math.log(2 * math.pi)
                - 0.5 * ((x - self.means) / self.stds) ** 2)


def fit_gmm_1d(x: torch.Tensor, iters: int = 500, tol: float = 1e-10) -> GaussianMixture1D:
    """Two-component 1-D Gaussian mixture by EM (initialised by 2-means from the min and max).

    Variances are floored at ``1e-6 * var(x)`` (plus a tiny constant) so a component cannot collapse.
    """
    x = x.detach().double().reshape(-1).cpu()
    if x.numel() < 2:
        raise VitscopeError("norms", f"{x.numel()} values cannot fit a mixture", "pass at least 2 values")
    floor = 1e-6 * float(x.var()) + 1e-12
    centres = torch.stack([x.min(), x.max()])
    for _ in range(50):  # 2-means
        lab = (x - centres[0]).abs() > (x - centres[1]).abs()
        new = torch.stack([x[~lab].mean() if (~lab).any() else centres[0], x[lab].mean() if lab.any() else centres[1]])
        if torch.equal(new, centres):
            break
        centres = new
    lab = (x - centres[0]).abs() > (x - centres[1]).abs()
    resp = torch.stack([(~lab).double(), lab.double()], dim=1)  # (n, 2)
    prev = -math.inf
    gmm = GaussianMixture1D(torch.full((2,), 0.5, dtype=torch.float64), centres, torch.ones(2, dtype=torch.float64))
    for _ in range(iters):
        nk = resp.sum(dim=0).clamp_min(1e-12)  # M step
        means = (resp * x[:, None]).sum(dim=0) / nk
        var = (resp * (x[:, None] - means) ** 2).sum(dim=0) / nk
        gmm = GaussianMixture1D(nk / x.numel(), means, var.clamp_min(floor).sqrt())
        logp = gmm.log_weighted_density(x)  # E step
        ll = torch.logsumexp(logp, dim=1)
        resp = (logp - ll[:, None]).exp()
        total = float(ll.sum())
        if abs(total - prev) <= tol * abs(total):
            break
        prev = total
    order = torch.argsort(gmm.means)
    fitted_ll = float(torch.logsumexp(gmm.log_weighted_density(x), dim=1).sum())
    return GaussianMixture1D(gmm.weights[order], gmm.means[order], gmm.stds[order], fitted_ll)


def prefers_two_components(x: torch.Tensor, gmm: GaussianMixture1D) -> bool:
    """BIC of the mixture (5 parameters) below that of one Gaussian (2 parameters) on ``x``."""
    x = x.detach().double().reshape(-1)
    n = x.numel()
    sd = max(float(x.std(unbiased=False)), 1e-12)
    ll1 = float((-math.log(sd) - 0.5 * math.log(2 * math.pi) - 0.5 * ((x - x.mean()) / sd) ** 2).sum())
    return -2 * gmm.log_likelihood + 5 * math.log(n) < -2 * ll1 + 2 * math.log(n)


def gmm_threshold(gmm: GaussianMixture1D, upper: float) -> float:
    """Smallest ``x`` in ``[mu_low, upper]`` where ``pi_2 N_2(x) >= pi_1 N_1(x)`` (bisection); ``inf`` if none.

    For equal standard deviations ``s`` this is ``(mu_1 + mu_2) / 2 + s^2 ln(pi_1 / pi_2) / (mu_2 - mu_1)``.
    """
    def f(v: float) -> float:
        lp = gmm.log_weighted_density(torch.tensor([v], dtype=torch.float64))[0]
        return float(lp[1] - lp[0])

    lo, hi = float(gmm.means[0]), float(upper)
    if hi <= lo or f(hi) < 0:
        return math.inf
    if f(lo) >= 0:
        return lo
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) >= 0:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass
class ArtifactReport:
    """Per-layer artifact analysis of block-output token norms.

    Attributes:
        norms: ``(num_layers, batch, N)`` all token norms, as captured.
        patch_norms: ``(num_layers, batch, rows, cols)`` (a padded batch of images on different grids: NaN
            outside each image's grid, `Attentions.grids`).
        outliers: bool ``(num_layers, batch, rows, cols)``: artifact patch tokens.
        threshold: ``(num_layers,)`` norm above which a patch is an artifact (``inf``: none in that layer).
        share: ``(num_layers,)`` fraction of patch tokens flagged, over all images.
        mixtures: the fitted mixture per layer (``None`` with a fixed threshold).
    """

    norms: torch.Tensor
    patch_norms: torch.Tensor
    outliers: torch.Tensor
    threshold: torch.Tensor
    share: torch.Tensor
    mixtures: list[GaussianMixture1D] | None = None


def token_norms(
    attn: Attentions, *, threshold: float | None = None, min_separation: float = 2.0
) -> ArtifactReport:
    """Find high-norm patch tokens in every layer (see the module docstring).

    Args:
        attn: attentions captured with ``token_norms=True``.
        threshold: fixed norm threshold; default: fit a 2-component Gaussian mixture per layer.
        min_separation: smallest Ashman's D for the mixture to count as two populations (default 2).
    """
    if attn.token_norms is None:
        raise VitscopeError("attn", "has no token norms", "capture with vitscope.capture(..., token_norms=True)")
    norms = attn.token_norms.detach().float()  # (L, B, N)
    patches = _patch_norms(attn, norms)  # (L, B, rows, cols), NaN outside each image's grid in a padded batch
    L = norms.shape[0]
    thresholds = torch.full((L,), math.inf, dtype=torch.float64)
    mixtures: list[GaussianMixture1D] | None = None
    if threshold is not None:
        thresholds[:] = float(threshold)
    else:
        mixtures = []
        for layer in range(L):
            x = patches[layer].reshape(-1)
            x = x[~torch.isnan(x)]  # a padded batch: each image's own patches only
            gmm = fit_gmm_1d(x)
            mixtures.append(gmm)
            split = gmm.separation >= min_separation and float(gmm.weights[1]) < 0.5
            if split and prefers_two_components(x, gmm):
                thresholds[layer] = gmm_threshold(gmm, float(x.max()))
    outliers = patches.double() > thresholds[:, None, None, None].to(patches.device)  # NaN: never an outlier
    real = (~torch.isnan(patches)).reshape(L, -1).double().sum(dim=1)
    share = outliers.reshape(L, -1).double().sum(dim=1) / real
    return ArtifactReport(norms=norms, patch_norms=patches, outliers=outliers, threshold=thresholds,
                          share=share.cpu(), mixtures=mixtures)


def _patch_norms(attn: Attentions, norms: torch.Tensor) -> torch.Tensor:
    """Patch token norms ``(L, B, rows, cols)``; a padded batch's images each on their own grid, NaN-padded to
    the largest rows and columns."""
    if attn.grids is None:
        return attn.to_grid(norms)
    rows, cols = max(r for r, _ in attn.grids), max(c for _, c in attn.grids)
    out = torch.full((*norms.shape[:2], rows, cols), float("nan"), dtype=norms.dtype, device=norms.device)
    for b, (r, c) in enumerate(attn.grids):
        out[:, b, :r, :c] = norms[:, b, attn.num_prefix_tokens:attn.num_prefix_tokens + r * c].reshape(-1, r, c)
    return out


def outlier_threshold(norms: np.ndarray, k: float = 3.0) -> float:
    """Robust outlier cut for token norms: ``q75 + k * IQR`` (Tukey's far fence with ``k = 3``; Tukey 1977)."""
    q25, q75 = np.percentile(norms, [25, 75])
    return float(q75 + k * (q75 - q25))
