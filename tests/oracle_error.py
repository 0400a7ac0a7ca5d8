"""Error of a graph's sampled latent against the exact ODE solution of the oracle, from the same start."""
import torch

from modelzoo.gmm import exact_ode_solution


def exact_for(patcher, sigmas, seed, shape):
    import comfy.sample
    noise = comfy.sample.prepare_noise(torch.zeros(shape), seed)
    x_start = patcher.model.model_sampling.noise_scaling(sigmas[0], noise, torch.zeros(shape),
                                                         max_denoise=True).double()
    return exact_ode_solution(patcher.model.diffusion_model.gmm, x_start, float(sigmas[0]),
                              flow=patcher.model.diffusion_model.flow)


def rms_error(sampled, exact):
    return (sampled.double() - exact).pow(2).flatten(1).mean(1).sqrt().mean().item()
