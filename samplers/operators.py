"""Linear degradation operators for restoration guidance (plain torch + kornia; no ComfyUI).

Every operator acts on a batch x of shape [B, C, H, W] (a pixel-space latent, values in [-1, 1] for the digit model)
and offers
  forward(x)  = A x           the clean measurement
  adjoint(y)  = A^T y         (<A x, y> = <x, A^T y> for the flat Euclidean inner product)
  pinv(y)     = A^+ y         the Moore-Penrose pseudo-inverse, where it exists in closed form (`has_pinv`)
plus `sigma_y`, the std of the additive Gaussian measurement noise (same units as x), used by DDNM+.

Operators and their closed forms:
  GaussianBlur   circular convolution (periodic boundary) computed with the FFT, so A is diagonal in the Fourier
                 basis: A^T multiplies by conj(K), A^+ by 1/K where |K| > cutoff and 0 elsewhere (the truncated-SVD
                 pseudo-inverse; the identities hold exactly for that truncated operator and up to `cutoff` for the
                 blur itself).  cutoff defaults to 1e-3 for sigma_y = 0 and to 5 sigma_y (at most 0.5) for noisy
                 measurements, so that A^+ does not amplify the noise by more than ~1/(5 sigma_y).  Reflect padding is not offered: its adjoint and pseudo-inverse have no cheap exact form.
  Downsample     average pooling by 2/4/8 (the block average is its own anti-alias filter); A^T = nearest
                 upsample / f^2, A^+ = nearest upsample (A A^+ = I: exact).
  Inpaint        elementwise mask m in {0, 1} (1 = known); the measurement keeps the image's shape with zeros in
                 the unknown region; A^T = A^+ = multiply by m.
  Grayscale      mean over channels (colorization); A^T y = y repeated / C, A^+ y = y repeated (A A^+ = I).
"""
import abc
import math

import torch
import torch.nn.functional as F

KINDS = ("super_resolution", "inpaint", "gaussian_blur", "grayscale")


class OperatorError(ValueError):
    """A measurement or mask that does not fit the operator, or a missing pseudo-inverse."""


class LinearOperator(abc.ABC):
    name = "operator"
    has_pinv = True

    def __init__(self, sigma_y=0.0):
        if not (isinstance(sigma_y, (int, float)) and math.isfinite(sigma_y) and sigma_y >= 0):
            raise OperatorError(f"{self.name}: sigma_y = {sigma_y!r} must be a finite number >= 0")
        self.sigma_y = float(sigma_y)

    @property
    def pinv_noise_gain(self):
        """Largest factor by which A^+ scales white measurement noise (its largest inverse singular value)."""
        return 1.0

    # shapes --------------------------------------------------------------------------------------------------------
    def measurement_shape(self, x_shape):
        return tuple(x_shape)

    def check_image(self, x_shape):
        """Raise OperatorError if images of x_shape cannot go through this operator."""
        if len(x_shape) != 4:
            raise OperatorError(f"{self.name}: expects images [B, C, H, W], got shape {tuple(x_shape)}")

    def check_measurement(self, y_shape, x_shape):
        """Raise OperatorError unless a measurement of y_shape belongs to images of x_shape (batch may broadcast)."""
        self.check_image(x_shape)
        want = self.measurement_shape(x_shape)
        if len(y_shape) != 4 or tuple(y_shape[1:]) != tuple(want[1:]) or y_shape[0] not in (1, x_shape[0]):
            raise OperatorError(f"{self.name}: measurement shape {tuple(y_shape)} does not match the operator; "
                                f"images {tuple(x_shape)} give measurements {tuple(want)} (channels, height, width)")

    # algebra -------------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, x):
        """A x."""

    @abc.abstractmethod
    def adjoint(self, y):
        """A^T y."""

    def pinv(self, y):
        raise OperatorError(f"{self.name} has no pseudo-inverse")

    def project_range(self, x):
        """A^+ A x: the component of x that the measurement sees (an orthogonal projector)."""
        return self.pinv(self.forward(x))

    def __repr__(self):
        return f"{type(self).__name__}({self.describe()})"

    def describe(self):
        return f"sigma_y={self.sigma_y}"


class Downsample(LinearOperator):
    name = "super-resolution downsample"

    def __init__(self, factor=4, sigma_y=0.0):
        super().__init__(sigma_y)
        if factor not in (2, 4, 8):
            raise OperatorError(f"{self.name}: factor = {factor!r} must be 2, 4 or 8")
        self.factor = int(factor)

    def check_image(self, x_shape):
        super().check_image(x_shape)
        if x_shape[-1] % self.factor or x_shape[-2] % self.factor:
            raise OperatorError(f"{self.name}: image size {x_shape[-2]}x{x_shape[-1]} is not divisible by the "
                                f"factor {self.factor}")

    def measurement_shape(self, x_shape):
        return (*x_shape[:-2], x_shape[-2] // self.factor, x_shape[-1] // self.factor)

    def forward(self, x):
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor ** 2

    def pinv(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest")

    def describe(self):
        return f"factor={self.factor}, sigma_y={self.sigma_y}"


class Inpaint(LinearOperator):
    name = "inpainting mask"

    def __init__(self, mask, sigma_y=0.0):
        super().__init__(sigma_y)
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.dim() == 2:                  # [H, W]
            mask = mask[None, None]
        elif mask.dim() == 3:                # [B, H, W] (ComfyUI MASK layout)
            mask = mask[:, None]
        if mask.dim() != 4:
            raise OperatorError(f"{self.name}: mask must be [H, W], [B, H, W] or [B, C, H, W], got "
                                f"{tuple(mask.shape)}")
        self.mask = (mask > 0.5).float()

    def check_image(self, x_shape):
        super().check_image(x_shape)
        m = self.mask.shape
        if tuple(m[-2:]) != tuple(x_shape[-2:]) or m[0] not in (1, x_shape[0]) or m[1] not in (1, x_shape[1]):
            raise OperatorError(f"{self.name}: mask shape {tuple(m)} does not fit images {tuple(x_shape)} "
                                f"(masks are not resized: give one of the image's height and width)")

    def _m(self, t):
        return self.mask.to(device=t.device, dtype=t.dtype)

    def forward(self, x):
        return x * self._m(x)

    adjoint = forward
    pinv = forward

    def describe(self):
        return f"known={self.mask.mean().item():.3f}, sigma_y={self.sigma_y}"


def box_mask(height, width, fraction=0.5, side="bottom"):
    """[H, W] mask with the `side` `fraction` of the image unknown (0) and the rest known (1)."""
    mask = torch.ones(height, width)
    rows, cols = round(height * fraction), round(width * fraction)
    if side == "bottom":
        mask[height - rows:] = 0
    elif side == "top":
        mask[:rows] = 0
    elif side == "left":
        mask[:, :cols] = 0
    elif side == "right":
        mask[:, width - cols:] = 0
    elif side == "center":
        r0, c0 = (height - rows) // 2, (width - cols) // 2
        s = math.sqrt(fraction)
        rows, cols = round(height * s), round(width * s)
        r0, c0 = (height - rows) // 2, (width - cols) // 2
        mask[r0:r0 + rows, c0:c0 + cols] = 0
    else:
        raise OperatorError(f"box mask: side = {side!r} must be top, bottom, left, right or center")
    return mask


def random_mask(height, width, fraction=0.5, seed=0):
    """[H, W] mask with a seeded random `fraction` of the pixels unknown."""
    generator = torch.Generator().manual_seed(int(seed))
    return (torch.rand(height, width, generator=generator) >= fraction).float()


class GaussianBlur(LinearOperator):
    name = "gaussian blur"

    def __init__(self, kernel_size=9, blur_sigma=2.0, sigma_y=0.0, cutoff=None):
        super().__init__(sigma_y)
        if cutoff is None:      # noisy y: drop the components whose 1/|K| would amplify the noise more than ~4x
            cutoff = 1e-3 if self.sigma_y == 0 else min(0.5, max(1e-3, 5.0 * self.sigma_y))
        if not (isinstance(kernel_size, int) and kernel_size >= 3 and kernel_size % 2 == 1):
            raise OperatorError(f"{self.name}: kernel_size = {kernel_size!r} must be an odd integer >= 3")
        if not (math.isfinite(blur_sigma) and blur_sigma > 0):
            raise OperatorError(f"{self.name}: blur_sigma = {blur_sigma!r} must be a finite number > 0")
        self.kernel_size, self.blur_sigma, self.cutoff = int(kernel_size), float(blur_sigma), float(cutoff)
        try:
            import kornia
            self.kernel = kornia.filters.get_gaussian_kernel2d((self.kernel_size,) * 2,
                                                               (self.blur_sigma,) * 2)[0].float()
        except ImportError:
            r = torch.arange(self.kernel_size, dtype=torch.float64) - self.kernel_size // 2
            g = torch.exp(-r ** 2 / (2 * self.blur_sigma ** 2))
            k = torch.outer(g, g)
            self.kernel = (k / k.sum()).float()
        self._spectra = {}

    @property
    def pinv_noise_gain(self):
        return 1.0 / self.cutoff

    def check_image(self, x_shape):
        super().check_image(x_shape)
        if min(x_shape[-2:]) < self.kernel_size:
            raise OperatorError(f"{self.name}: image {x_shape[-2]}x{x_shape[-1]} is smaller than the kernel "
                                f"{self.kernel_size}")

    def _spectrum(self, h, w, device):
        key = (h, w, str(device))
        if key not in self._spectra:
            k = self.kernel.double()
            padded = torch.zeros(h, w, dtype=torch.float64)
            padded[:self.kernel_size, :self.kernel_size] = k
            # centre the kernel at (0, 0) so the circular convolution does not shift the image
            padded = torch.roll(padded, shifts=(-(self.kernel_size // 2), -(self.kernel_size // 2)), dims=(0, 1))
            spectrum = torch.fft.fft2(padded)
            magnitude = spectrum.abs()
            inverse = torch.where(magnitude > self.cutoff, 1.0 / torch.where(magnitude > self.cutoff, spectrum,
                                                                              torch.ones_like(spectrum)),
                                  torch.zeros_like(spectrum))
            self._spectra[key] = (spectrum.to(device), inverse.to(device))
        return self._spectra[key]

    def _apply(self, x, which):
        h, w = x.shape[-2:]
        spectrum, inverse = self._spectrum(h, w, x.device)
        factor = {"forward": spectrum, "adjoint": spectrum.conj(), "pinv": inverse}[which]
        out = torch.fft.ifft2(torch.fft.fft2(x.double()) * factor).real
        return out.to(x.dtype)

    def forward(self, x):
        return self._apply(x, "forward")

    def adjoint(self, y):
        return self._apply(y, "adjoint")

    def pinv(self, y):
        return self._apply(y, "pinv")

    def describe(self):
        return f"kernel={self.kernel_size}, blur_sigma={self.blur_sigma}, sigma_y={self.sigma_y}"


class Grayscale(LinearOperator):
    name = "grayscale (colorization)"

    def __init__(self, channels=3, sigma_y=0.0):
        super().__init__(sigma_y)
        if not (isinstance(channels, int) and channels >= 1):
            raise OperatorError(f"{self.name}: channels = {channels!r} must be an integer >= 1")
        self.channels = int(channels)

    def check_image(self, x_shape):
        super().check_image(x_shape)
        if x_shape[1] != self.channels:
            raise OperatorError(f"{self.name}: built for {self.channels}-channel images, got {x_shape[1]} channels")

    def measurement_shape(self, x_shape):
        return (x_shape[0], 1, *x_shape[2:])

    def forward(self, x):
        return x.mean(dim=1, keepdim=True)

    def adjoint(self, y):
        return y.expand(-1, self.channels, -1, -1) / self.channels

    def pinv(self, y):
        return y.expand(-1, self.channels, -1, -1).contiguous()

    def describe(self):
        return f"channels={self.channels}, sigma_y={self.sigma_y}"


def add_noise(y, sigma_y, seed=0):
    """y + sigma_y * z with seeded z (the measurement noise of a test degradation)."""
    if sigma_y <= 0:
        return y.clone()
    generator = torch.Generator().manual_seed(int(seed))
    return y + sigma_y * torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device, y.dtype)


def psnr(x, ref):
    """PSNR in dB of images in [-1, 1] mapped to [0, 1] (data range 1), averaged over the batch."""
    a, b = ((x.float() + 1) / 2).clamp(0, 1), ((ref.float() + 1) / 2).clamp(0, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def consistency(op, x, y):
    """RMS of A(x) - y per measurement element (same units as sigma_y)."""
    return float((op.forward(x.float()) - y.float()).pow(2).mean().sqrt())
