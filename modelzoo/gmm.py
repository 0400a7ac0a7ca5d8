"""Analytic oracle: a Gaussian-mixture data distribution whose exact denoiser E[x0 | x_sigma] is known in closed form.

Plain torch, no host. The state follows ComfyUI's sigma convention for both families:
  x = a(sigma) * x0 + sigma * eps,   a = 1 for EPS / V_PREDICTION (VE-scaled state), a = 1 - sigma for CONST (flow).
Every component is isotropic, N(mu_k, s_k^2 I), so given component k
  x | k ~ N(a mu_k, (a^2 s_k^2 + sigma^2) I),   E[x0 | x, k] = mu_k + a s_k^2 / (a^2 s_k^2 + sigma^2) (x - a mu_k).
The exact probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma is solved to near machine precision by
`exact_ode_solution`, the ground truth for every solver and schedule claim.
"""
import math

import numpy as np
import torch
from scipy.integrate import solve_ivp


class GaussianMixture:
    """A fixed, seeded mixture in `shape` (one sample's shape, e.g. (4, 8, 8)).

    `flow=True` selects the CONST (rectified-flow) state convention, else the VE-scaled EPS/V convention.
    """

    def __init__(self, shape=(4, 8, 8), components=6, seed=0, spread=1.0, scale_range=(0.05, 0.3)):
        g = torch.Generator().manual_seed(seed)
        self.shape = tuple(shape)
        dim = math.prod(self.shape)
        self.means = torch.randn(components, dim, generator=g, dtype=torch.float64) * spread
        lo, hi = scale_range
        self.stds = lo + (hi - lo) * torch.rand(components, generator=g, dtype=torch.float64)
        self.log_weights = torch.log_softmax(torch.randn(components, generator=g, dtype=torch.float64) * 0.5, 0)

    def denoise(self, x, sigma, flow):
        """Exact E[x0 | x] for a batch x of shape (B, *shape) at noise level sigma (scalar or (B,))."""
        dtype = x.dtype
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(xf.shape[0], 1)
        a = (1.0 - sigma) if flow else torch.ones_like(sigma)
        var = a ** 2 * self.stds[None, :] ** 2 + sigma ** 2                     # (B, K)
        diff2 = (xf[:, None, :] - a[:, :, None] * self.means[None]).pow(2).sum(-1)  # (B, K)
        dim = xf.shape[1]
        logp = self.log_weights[None] - 0.5 * diff2 / var - 0.5 * dim * torch.log(var)
        resp = torch.softmax(logp, dim=1)                                         # (B, K)
        gain = a * self.stds[None, :] ** 2 / var                                  # (B, K)
        per_component = self.means[None] + gain[:, :, None] * (xf[:, None, :] - a[:, :, None] * self.means[None])
        x0 = (resp[:, :, None] * per_component).sum(1)
        return x0.reshape(x.shape).to(dtype)

    def sample(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=g)
        z = torch.randn(n, self.means.shape[1], generator=g, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).reshape(n, *self.shape)


def exact_ode_solution(gmm, x_start, sigma_start, sigma_end=0.0, flow=False, rtol=1e-11, atol=1e-11):
    """Integrate the PF-ODE from sigma_start to sigma_end for every sample of x_start, in float64.

    Integrates dx/du = x - D(x, sigma) in u = log(sigma), where the field is smooth, down to a floor of 1e-7 when
    sigma_end is 0; there the exact endpoint is D(x, sigma_floor), off by O(sigma_floor) at most.
    """
    floor = 1e-7
    target = max(float(sigma_end), floor)
    x0 = x_start.to(torch.float64).reshape(x_start.shape[0], -1)
    out = torch.empty_like(x0)
    for i in range(x0.shape[0]):
        def field(u, y):
            xt = torch.from_numpy(y).reshape(1, *gmm.shape)
            return (xt - gmm.denoise(xt, math.exp(u), flow)).reshape(-1).numpy()

        sol = solve_ivp(field, (math.log(sigma_start), math.log(target)), x0[i].numpy(),
                        method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE failed: {sol.message}")
        y = torch.from_numpy(np.ascontiguousarray(sol.y[:, -1]))
        if sigma_end == 0.0:
            y = gmm.denoise(y.reshape(1, *gmm.shape), target, flow).reshape(-1)
        out[i] = y
    return out.reshape(x_start.shape)
