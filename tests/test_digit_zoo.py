"""The digit model zoo (modelzoo/digit_models.py) in the real host: every trained architecture loads through the
Digit Model node and samples recognisable digits through one graph shape (Digit Model -> KSampler -> Digit Latent
to Image), the SD3 file loads through the stock UNETLoader and samples the same, and wrong inputs fail with errors
that name the node and what it works with. Plus the exact latent round trip of every pixel-unshuffle family, and the
real TAESD-family round trip of the real-latent ones (those need ../shared/models/taesd and skip without it)."""
import shutil

import pytest
import torch

from graphs import sink
from modelzoo import digit_models, mnist_unet

DIGITS = "0123456789" * 2
TRAINED = [(name, prediction) for name, arch in digit_models.ARCHITECTURES.items() for prediction in arch.predictions]
PIXEL_UNSHUFFLE = [name for name, arch in digit_models.ARCHITECTURES.items() if not arch.vae]
REAL_LATENT = [name for name, arch in digit_models.ARCHITECTURES.items() if arch.vae]


def _graph(architecture, prediction="auto", digits=DIGITS, latent_architecture=None, seed=11, model=None,
           positive=None):
    batch = len(digits)
    vae = digit_models.ARCHITECTURES[architecture].vae
    decoder = {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}}} if vae else {}
    return {
        **decoder,
        "model": model or {"class_type": "QuickstepDigitModel",
                           "inputs": {"prediction": prediction, "architecture": architecture}},
        "positive": positive or {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": digits}},
        "negative": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": ""}},
        "latent": {"class_type": "QuickstepEmptyDigitLatent",
                   "inputs": {"batch_size": batch, "architecture": latent_architecture or architecture}},
        "out": {"class_type": "KSampler",
                "inputs": {"model": ["model", 0], "seed": seed, "steps": 20, "cfg": 3.0, "sampler_name": "dpmpp_2m",
                           "scheduler": "karras", "positive": ["positive", 0], "negative": ["negative", 0],
                           "latent_image": ["latent", 0], "denoise": 1.0}},
        "image": {"class_type": "QuickstepDigitToImage",
                  "inputs": {"samples": ["out", 0], **({"vae": ["vae", 0]} if vae else {})}},
        "keep": sink("image"),
    }


@pytest.fixture(scope="module")
def read_digit():
    from bench.distilled import classifier
    net = classifier()

    def read(images):
        """Digits the MNIST classifier reads in IMAGE [N, 28, 28, 3]."""
        with torch.no_grad():
            return net((images[..., 0].unsqueeze(1) - 0.1307) / 0.3081).argmax(1)
    return read


@pytest.mark.parametrize("name,prediction", TRAINED)
def test_every_trained_model_draws_the_asked_digits_through_one_graph(inproc, read_digit, request, name, prediction):
    arch = digit_models.ARCHITECTURES[name]
    if arch.vae:
        request.getfixturevalue("real_taesd")
    result = inproc.run(_graph(name, prediction))
    latent = inproc.output(result, "out")["samples"]
    assert tuple(latent.shape) == arch.latent_shape(len(DIGITS))
    images = inproc.output(result, "image")
    frames = max(1, arch.frames)
    assert images.shape == (len(DIGITS) * frames, 28, 28, 3)
    wanted = torch.tensor([int(d) for d in DIGITS]).repeat_interleave(frames)
    accuracy = (read_digit(images) == wanted).float().mean().item()
    print(f"{name} ({prediction}): the classifier reads {accuracy:.2f} of {len(wanted)} sampled digits")
    assert accuracy >= 0.8


# SD3 only (pixel and TAESD3 latents): comfy/model_detection.py fixes the other families' sizes (modelzoo/README.md).
STOCK_LOADABLE = [name for name, arch in digit_models.ARCHITECTURES.items() if arch.stock_loader]


@pytest.mark.parametrize("name", STOCK_LOADABLE)
def test_a_detectable_file_loads_through_the_stock_unet_loader_and_samples_the_same(inproc, host_base, request, name):
    if digit_models.ARCHITECTURES[name].vae:
        request.getfixturevalue("real_taesd")
    source = digit_models.weights_path(name)
    shutil.copyfile(source, host_base / "models" / "diffusion_models" / source.name)
    stock = {"class_type": "UNETLoader", "inputs": {"unet_name": source.name, "weight_dtype": "default"}}
    through_loader = inproc.output(inproc.run(_graph(name, digits="3817", model=stock)), "out")["samples"]
    through_node = inproc.output(inproc.run(_graph(name, digits="3817")), "out")["samples"]
    assert torch.allclose(through_loader, through_node, atol=1e-5)


def _error(inproc, graph):
    result = inproc.run(graph, check=False)
    assert result.status == "error"
    return result.error()["exception_message"]


def test_a_latent_of_another_family_is_refused_naming_the_latent_node(inproc):
    message = _error(inproc, _graph("flux", digits="12", latent_architecture="sd15"))
    assert "Digit Model" in message and "Empty Digit Latent" in message and "'flux'" in message
    assert "[B, 16, 8, 8]" in message and "[2, 1, 32, 32]" in message


@pytest.mark.parametrize("name", ["sd15", "sd3", "wan21"])
def test_conditioning_of_another_model_is_refused_naming_digit_conditioning(inproc, name):
    """Text-encoder-like conditioning (768-wide tokens, no pooled vector) used to fail deep in the network with a
    matrix-shape error or KeyError: 'pooled_output'."""
    other = {"class_type": "QuickstepTestConditioning", "inputs": {"arch": "sd15", "seed": 0, "context_dim": 768}}
    message = _error(inproc, _graph(name, digits="1", positive=other))
    assert "Digit Model" in message and "Digit Conditioning" in message and "[1, 8, 768]" in message
    assert "positive" in message


def test_a_missing_pooled_vector_is_refused_where_the_family_reads_one(inproc):
    no_pooled = {"class_type": "QuickstepTestConditioning", "inputs": {"arch": "sd15", "seed": 0, "context_dim": 64}}
    message = _error(inproc, _graph("sdxl", digits="1", positive=no_pooled))
    assert "Digit Conditioning" in message and "pooled_output of shape None" in message


def test_a_prediction_the_architecture_was_not_trained_for_is_refused(inproc):
    message = _error(inproc, _graph("flux", prediction="eps", digits="1"))
    assert "Digit Model" in message and "prediction = 'eps'" in message and "'flow'" in message


def test_a_damaged_file_or_one_of_another_architecture_is_refused_naming_the_file(inproc, tmp_path):
    damaged = tmp_path / "digit_flux.safetensors"
    damaged.write_bytes(digit_models.weights_path("flux").read_bytes()[:5000])
    with pytest.raises(ValueError, match="digit_flux.safetensors"):
        digit_models.load_digit_model("flux", path=damaged)
    with pytest.raises(ValueError, match=r"digit_sd3\.safetensors holds the sd3 digit model"):
        digit_models.load_digit_model("flux", path=digit_models.weights_path("sd3"))


def test_digit_latent_to_image_refuses_a_latent_of_no_digit_family(inproc):
    graph = {"latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "image": {"class_type": "QuickstepDigitToImage", "inputs": {"samples": ["latent", 0]}},
             "keep": sink("image")}
    message = _error(inproc, graph)
    assert "Digit Latent to Image" in message and "[1, 4, 8, 8]" in message


def test_a_real_latent_needs_its_vae_and_a_pixel_latent_refuses_one(inproc, real_taesd):
    graph = _graph("sd15_taesd", digits="1")
    del graph["image"]["inputs"]["vae"]
    message = _error(inproc, graph)
    assert "Digit Latent to Image" in message and "taesd latent space" in message and "VAE Loader (taesd)" in message
    graph = _graph("sd3", digits="1")
    graph["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taef1"}}
    graph["image"]["inputs"]["vae"] = ["vae", 0]
    message = _error(inproc, graph)
    assert "Digit Latent to Image" in message and "leave vae unconnected" in message


@pytest.mark.parametrize("name", REAL_LATENT)
def test_the_real_vae_round_trip_keeps_the_digits(inproc, real_taesd, read_digit, name):
    """Held-out digits through the real encoder and decoder of the family (what its model was trained on) still
    read as themselves: the latent space is a faithful one (measured 0.99 on 500 for TAESD and TAEF1)."""
    arch = digit_models.ARCHITECTURES[name]
    _, _, pixels, labels = mnist_unet.mnist_split()
    vae = digit_models.load_taesd(arch.vae, real_taesd)
    images = mnist_unet.mnist_to_latent(pixels[::25])                      # 20 digits, two of each class
    latent = digit_models.encode_digits(vae, images)
    assert tuple(latent.shape) == arch.latent_shape(len(images))
    digits = digit_models.latent_to_digits(latent, vae)
    read = read_digit(digits.unsqueeze(-1).expand(-1, -1, -1, 3))
    assert (read == torch.as_tensor(labels[::25])).float().mean() >= 0.95
    assert torch.equal(digit_models.empty_latent(name, 2), torch.zeros(arch.latent_shape(2)))


@pytest.mark.parametrize("name", PIXEL_UNSHUFFLE)
def test_the_latent_space_is_an_exact_inverse_of_the_pixels(name):
    arch = digit_models.ARCHITECTURES[name]
    train_pixels = mnist_unet.mnist_split()[0][:6]
    images = mnist_unet.mnist_to_latent(train_pixels)                       # [6, 1, 32, 32] in [-1, 1]
    latent = digit_models.training_latents(name, images, torch.Generator().manual_seed(0))
    assert tuple(latent.shape) == arch.latent_shape(6)
    decoded = digit_models.latent_to_images(latent)
    frames = max(1, arch.frames)
    assert decoded.shape == (6 * frames, 1, 32, 32)
    # Frame 1 of a clip (every frame of a still family) is the digit itself, exactly.
    still = decoded.reshape(6, frames, 1, 32, 32)[:, min(1, frames - 1)]
    assert torch.allclose(still, images, atol=1e-6)
    blank = digit_models.latent_to_images(digit_models.empty_latent(name, 2))
    assert torch.allclose(blank, torch.full_like(blank, -1.0), atol=1e-6)
