"""ParaDiGMS (Shih et al. 2023): parallel-in-time sampling by Picard iteration over a sliding window.

The step map is the Euler / DDIM step Phi_i(x) = x + (sigma_{i+1} - sigma_i) d(x, sigma_i), so at convergence the
result is the sequential `sample_euler` result.  Each Picard round evaluates the model at every state of the window
in ONE call (the window's states concatenated along the batch, one sigma per batch element), then replaces the
window by cumulative sums of the drifts from the window start.  Slots whose change is below the tolerance are
accepted and the window slides past them.
"""
import torch

from .common import Run, check_float, check_int
from .frame import frame_of
from .solvers import _check_common, with_validation


def _check_paradigms(window=8, tolerance=0.1, stats=None):
    check_int("window", window, 1, 1024)
    check_float("tolerance", tolerance, 0.0, low_open=True)
    _check_common(stats=stats)


def step_noise_variances(frame, sigmas):
    """v_{i+1}: the variance the DDPM (ancestral) step i would inject, in state units; the tolerance is measured
    against it, as in the reference (which uses it for ODE samplers too).  Computed in Frame-B VE units
    (sigma_up^2 = s~_{i+1}^2 (s~_i^2 - s~_{i+1}^2) / s~_i^2, times alpha_{i+1}^2); a step landing on 0 reuses the
    smallest positive value so the last step keeps a finite scale."""
    variances = []
    for sigma_from, sigma_to in zip(sigmas[:-1], sigmas[1:]):
        ve_from, ve_to = frame.ve_sigma(sigma_from), frame.ve_sigma(sigma_to)
        kept = 1.0 if ve_from == float("inf") else 1.0 - (ve_to / ve_from) ** 2
        variances.append(ve_to ** 2 * kept * frame.alpha(sigma_to) ** 2)
    floor = min(v for v in variances if v > 0) if any(v > 0 for v in variances) else 1.0
    return [v if v > 0 else floor for v in variances]


@with_validation(_check_paradigms)
def sample_paradigms(model, x, sigmas, extra_args=None, callback=None, disable=None, window=8, tolerance=0.1,
                     stats=None):
    """ParaDiGMS over Euler steps.  Options: window (steps evaluated per round; memory grows with it), tolerance
    (RMS change per slot, in units of that step's DDPM noise std, compared as tolerance^2).  `stats` receives
    rounds (sequential model calls), nfe (state evaluations, what a sequential sampler would count) and steps."""
    _check_paradigms(window, tolerance, stats)
    run = Run(model, x, sigmas, extra_args, callback, disable, None)
    sig, n_steps, batch = run.sigmas, run.n_steps, run.x.shape[0]
    variances = step_noise_variances(frame_of(model), sig)
    # trajectory X_0..X_N; unknown states start as copies of the latest known one (the reference's init)
    states = [run.x] * (n_steps + 1)
    begin, rounds, evaluations = 0, 0, 0
    while begin < n_steps:
        end = min(begin + window, n_steps)
        size = end - begin
        window_states = torch.stack(states[begin:end])                           # (size, B, ...)
        sigma_column = torch.tensor(sig[begin:end], dtype=run.x.dtype, device=run.x.device)
        denoised = run.denoiser(window_states.flatten(0, 1), sigma_column.repeat_interleave(batch))
        denoised = denoised.view_as(window_states)
        rounds, evaluations = rounds + 1, evaluations + size
        steps = torch.tensor([sig[i + 1] - sig[i] for i in range(begin, end)], dtype=run.x.dtype,
                             device=run.x.device)
        shape = (size,) + (1,) * (window_states.dim() - 1)
        drifts = steps.view(shape) * (window_states - denoised) / sigma_column.view(shape)
        new_states = states[begin] + torch.cumsum(drifts, 0)                    # X_{begin+1..end}
        old_states = torch.stack(states[begin + 1:end + 1])
        change = (new_states - old_states).flatten(2).pow(2).mean(-1).amax(-1)  # worst sample per slot
        scale = torch.tensor(variances[begin:end], dtype=change.dtype, device=change.device)
        failed = torch.nonzero(change > tolerance ** 2 * scale)
        first_failed = int(failed[0]) if failed.numel() else size
        for offset in range(size):
            states[begin + 1 + offset] = new_states[offset]
        advance = min(first_failed + 1, size)
        run.report(begin + advance - 1, states[begin + advance], denoised[advance - 1])
        begin += advance
        new_end = min(begin + window, n_steps)
        for slot in range(end + 1, new_end + 1):     # slots entering the window start from the last known state
            states[slot] = states[end]
    if stats is not None:
        stats.update(rounds=rounds, nfe=evaluations, model_calls=run.denoiser.nfe, steps=n_steps)
    return states[n_steps].to(run.input_dtype)
