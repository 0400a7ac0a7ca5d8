"""Solvers on trained networks: the embedded digit model (through graphs in the host) and the real pretrained MNIST
DDPM from ../shared/models (wrapped as a host model; skipped, with that reason, where the folder is absent).
Errors on the digit model are against a 100-step DPM-Solver++(2M) reference from the same noise."""
import pytest
import torch

from testbed import mnist_ddpm


def _digit_graph(sampler, steps, scheduler="karras"):
    return {
        "model": {"class_type": "QuickstepDigitModel", "inputs": {"prediction": "eps"}},
        "pos": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": "01234567"}},
        "neg": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": ""}},
        "latent": {"class_type": "QuickstepEmptyDigitLatent", "inputs": {"batch_size": 8}},
        "out": {"class_type": "KSampler",
                "inputs": {"model": ["model", 0], "seed": 7, "steps": steps, "cfg": 2.0, "sampler_name": sampler,
                           "scheduler": scheduler, "positive": ["pos", 0], "negative": ["neg", 0],
                           "latent_image": ["latent", 0], "denoise": 1.0}},
        "keep": {"class_type": "PreviewAny", "inputs": {"source": ["out", 0]}},
    }


def _rms(a, b):
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt().mean().item()


def test_quickstep_solvers_are_closer_to_the_reference_on_the_digit_model(inproc):
    def sample(sampler, steps):
        return inproc.output(inproc.run(_digit_graph(sampler, steps)), "out")["samples"]
    reference = sample("qs_dpmpp_2m", 100)   # second order: 100 steps are ~1% of the 8-step errors
    euler = _rms(sample("euler", 8), reference)
    errors = {sampler: _rms(sample(sampler, 8), reference)
              for sampler in ("qs_dpmpp_2m", "qs_dpmpp_2m_unic", "qs_unipc_bh2")}
    print("digit model, 8 steps, RMS to 100-step reference:", {"euler": euler, **errors})
    # Measured: 2M 0.77x and 2M+UniC 0.82x of Euler's error; UniPC bh2 (order 3) is worse than Euler here (1.5x):
    # at 8 steps with CFG 2 on this small trained model the higher order overshoots (reported in the README).
    assert errors["qs_dpmpp_2m"] < 0.85 * euler and errors["qs_dpmpp_2m_unic"] < 0.9 * euler, (errors, euler)
    assert _rms(sample("qs_dpmpp_2m", 8), sample("dpmpp_2m", 8)) < 1e-4


@pytest.fixture(scope="module")
def ddpm(inproc):
    missing = mnist_ddpm.available()
    if missing:
        pytest.skip(missing)
    return mnist_ddpm.load_ddpm_model()


def test_ddpm_wrapper_is_exact_to_the_reference_loader(ddpm):
    assert mnist_ddpm.schedule_check(ddpm) < 1e-6
    assert max(mnist_ddpm.reference_check(ddpm).values()) < 1e-4


def test_quickstep_dpmpp_2m_matches_the_host_on_the_pretrained_ddpm(ddpm):
    """On a real trained network the same method gives the same numbers as the host's DPM-Solver++(2M)."""
    import comfy.sample
    import comfy.samplers
    latent = torch.zeros(8, *mnist_ddpm.LATENT_SHAPE)
    noise = comfy.sample.prepare_noise(latent, 5)
    cond = [[torch.zeros(1, 1, 1), {}]]

    def sample(sampler, steps):
        sigmas = comfy.samplers.calculate_sigmas(ddpm.get_model_object("model_sampling"), "exponential", steps)
        return comfy.sample.sample_custom(ddpm, noise, 1.0, comfy.samplers.sampler_object(sampler), sigmas, cond,
                                          cond, latent, disable_pbar=True, seed=5)
    ours, host = sample("qs_dpmpp_2m", 12), sample("dpmpp_2m", 12)
    assert torch.isfinite(ours).all()
    assert _rms(ours, host) < 1e-4
