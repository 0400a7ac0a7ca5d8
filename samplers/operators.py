"""Degradation operators for restoration guidance (plain torch + kornia; no ComfyUI).

Every operator acts on a batch x of shape [B, C, H, W] (a pixel-space latent or decoded image, values in [-1, 1])
and offers
  forward(x)  = A x           the clean measurement (differentiable: DPS and RED-diff back-propagate through it)
and, for the linear ones (`LinearOperator`, `linear = True`),
  adjoint(y)  = A^T y         (<A x, y> = <x, A^T y> for the flat Euclidean inner product)
  pinv(y)     = A^+ y         the Moore-Penrose pseudo-inverse, where it exists in closed form (`has_pinv`)
  gram_solve(v, r2, s2) = A^T (r2 A A^T + s2 I)^{-1} v     (PiGDM's likelihood vector; s2 = 0 gives A^+ v / r2)
plus `sigma_y`, the std of the additive Gaussian measurement noise (same units as x), used by DDNM+ and PiGDM.

Operators and their closed forms:
  Blur           circular convolution (periodic boundary) with a normalised kernel: Gaussian or motion (kornia's
                 kernels) or a given one; computed with the FFT, so A is diagonal in the Fourier basis: A^T multiplies
                 by conj(K), A^+ by 1/K where |K| > cutoff and 0 elsewhere (the truncated-SVD pseudo-inverse; the
                 identities hold exactly for that truncated operator and up to `cutoff` for the blur itself).  cutoff
                 defaults to 1e-3 for sigma_y = 0 and to 5 sigma_y (at most 0.5) for noisy measurements, so that A^+
                 does not amplify the noise by more than ~1/(5 sigma_y).  Reflect padding is not offered: its adjoint
                 and pseudo-inverse have no cheap exact form.
  Downsample     average pooling by 2/4/8 (the block average is its own anti-alias filter); A^T = nearest
                 upsample / f^2, A^+ = nearest upsample (A A^+ = I: exact).
  Inpaint        elementwise mask m in {0, 1} (1 = known); the measurement keeps the image's shape with zeros in
                 the unknown region; A^T = A^+ = multiply by m.
  Grayscale      mean over channels (colorization); A^T y = y repeated / C, A^+ y = y repeated (A A^+ = I).
  JPEG           kornia's differentiable JPEG codec at a quality (not linear: forward only, no adjoint and no
                 pseudo-inverse, so only DPS and RED-diff accept it).  Single-channel images go through the codec as
                 grey RGB.
"""
import abc
import math

import torch
import torch.nn.functional as F

KINDS = ("super_resolution", "inpaint", "gaussian_blur", "motion_blur", "grayscale", "jpeg")


class OperatorError(ValueError):
    """A measurement or mask that does not fit the operator, or a missing pseudo-inverse."""


class Operator(abc.ABC):
    """A degradation y = A(x) + sigma_y z; linear operators add the adjoint, the pseudo-inverse and PiGDM's solve."""
    name = "operator"
    has_pinv = False
    linear = False

    def __init__(self, sigma_y=0.0):
        if not (isinstance(sigma_y, (int, float)) and math.isfinite(sigma_y) and sigma_y >= 0):
            raise OperatorError(f"{self.name}: sigma_y = {sigma_y!r} must be a finite number >= 0")
        self.sigma_y = float(sigma_y)

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

    @abc.abstractmethod
    def forward(self, x):
        """A(x), differentiable."""

    def pinv(self, y):
        raise OperatorError(f"{self.name} has no pseudo-inverse")

    def __repr__(self):
        return f"{type(self).__name__}({self.describe()})"

    def describe(self):
        return f"sigma_y={self.sigma_y}"


class LinearOperator(Operator):
    has_pinv = True
    linear = True

    @property
    def pinv_noise_gain(self):
        """Largest factor by which A^+ scales white measurement noise (its largest inverse singular value)."""
        return 1.0

    @abc.abstractmethod
    def adjoint(self, y):
        """A^T y."""

    def project_range(self, x):
        """A^+ A x: the component of x that the measurement sees (an orthogonal projector)."""
        return self.pinv(self.forward(x))

    @abc.abstractmethod
    def gram_solve(self, v, r2, s2):
        """A^T (r2 A A^T + s2 I)^{-1} v for a measurement-shaped v (r2 > 0, s2 >= 0)."""


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

    def gram_solve(self, v, r2, s2):             # A A^T = I / f^2
        return self.adjoint(v / (r2 / self.factor ** 2 + s2))

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
        mask = self.mask.to(device=t.device, dtype=t.dtype)
        # a mask made under the host's inference mode cannot be saved for autograd (DPS / PiGDM backward passes)
        return mask.clone() if mask.is_inference() and not torch.is_inference_mode_enabled() else mask

    def forward(self, x):
        return x * self._m(x)

    adjoint = forward
    pinv = forward

    def gram_solve(self, v, r2, s2):             # A A^T = diag(m) on the image-shaped measurement
        return self.forward(v) / (r2 + s2)

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


def stroke_mask(height, width, strokes=3, thickness=None, seed=0):
    """[H, W] mask (1 = known) with `strokes` seeded free-hand brush strokes unknown: each a thick polyline of four
    random points, what a user paints over a damaged area; thickness defaults to a tenth of the smaller side."""
    generator = torch.Generator().manual_seed(int(seed))
    radius = (thickness or max(2, min(height, width) // 10)) / 2
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    unknown = torch.zeros(height, width, dtype=torch.bool)
    scale = torch.tensor([height - 1, width - 1], dtype=torch.float32)
    for _ in range(strokes):
        points = torch.rand(4, 2, generator=generator) * scale
        for a, b in zip(points[:-1], points[1:]):
            # distance of every pixel to the segment a-b
            d = b - a
            t = (((rows - a[0]) * d[0] + (cols - a[1]) * d[1]) / d.pow(2).sum().clamp_min(1e-6)).clamp(0, 1)
            unknown |= (rows - a[0] - t * d[0]) ** 2 + (cols - a[1] - t * d[1]) ** 2 <= radius ** 2
    return (~unknown).float()


class Blur(LinearOperator):
    """Circular convolution with a normalised 2-D kernel (odd size), diagonal in the Fourier basis."""
    name = "blur"

    def __init__(self, kernel, sigma_y=0.0, cutoff=None):
        super().__init__(sigma_y)
        kernel = torch.as_tensor(kernel, dtype=torch.float64)
        if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
            raise OperatorError(f"{self.name}: the kernel must be square with an odd size, got {tuple(kernel.shape)}")
        if not torch.isfinite(kernel).all() or (kernel < 0).any() or kernel.sum() <= 0:
            raise OperatorError(f"{self.name}: the kernel must hold finite values >= 0 with a positive sum")
        if cutoff is None:      # noisy y: drop components whose 1/|K| would amplify the noise more than 1/(5 sigma_y)
            cutoff = 1e-3 if self.sigma_y == 0 else min(0.5, max(1e-3, 5.0 * self.sigma_y))
        self.kernel = (kernel / kernel.sum()).float()
        self.kernel_size, self.cutoff = kernel.shape[0], float(cutoff)
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
        # spectra made under the host's inference mode cannot be saved for autograd: one set per mode
        key = (h, w, str(device), torch.is_inference_mode_enabled())
        if key not in self._spectra:
            padded = torch.zeros(h, w, dtype=torch.float64)
            padded[:self.kernel_size, :self.kernel_size] = self.kernel.double()
            # centre the kernel at (0, 0) so the circular convolution does not shift the image
            padded = torch.roll(padded, shifts=(-(self.kernel_size // 2), -(self.kernel_size // 2)), dims=(0, 1))
            spectrum = torch.fft.fft2(padded)
            kept = spectrum.abs() > self.cutoff
            inverse = torch.where(kept, 1.0 / torch.where(kept, spectrum, torch.ones_like(spectrum)),
                                  torch.zeros_like(spectrum))
            self._spectra[key] = (spectrum.to(device), inverse.to(device), kept.to(device))
        return self._spectra[key]

    def _apply(self, x, factor):
        out = torch.fft.ifft2(torch.fft.fft2(x.double()) * factor).real
        return out.to(x.dtype)

    def forward(self, x):
        return self._apply(x, self._spectrum(*x.shape[-2:], x.device)[0])

    def adjoint(self, y):
        return self._apply(y, self._spectrum(*y.shape[-2:], y.device)[0].conj())

    def pinv(self, y):
        return self._apply(y, self._spectrum(*y.shape[-2:], y.device)[1])

    def gram_solve(self, v, r2, s2):
        """conj(K) / (r2 |K|^2 + s2); without noise the components under the cutoff are dropped as in A^+."""
        spectrum, _, kept = self._spectrum(*v.shape[-2:], v.device)
        power = r2 * spectrum.abs() ** 2 + s2
        factor = torch.where(kept | (s2 > 0), spectrum.conj() / torch.where(power > 0, power, torch.ones_like(power)),
                             torch.zeros_like(spectrum))
        return self._apply(v, factor)

    def describe(self):
        return f"kernel={self.kernel_size}, sigma_y={self.sigma_y}"


class GaussianBlur(Blur):
    name = "gaussian blur"

    def __init__(self, kernel_size=9, blur_sigma=2.0, sigma_y=0.0, cutoff=None):
        if not (isinstance(kernel_size, int) and kernel_size >= 3 and kernel_size % 2 == 1):
            raise OperatorError(f"{self.name}: kernel_size = {kernel_size!r} must be an odd integer >= 3")
        if not (math.isfinite(blur_sigma) and blur_sigma > 0):
            raise OperatorError(f"{self.name}: blur_sigma = {blur_sigma!r} must be a finite number > 0")
        import kornia
        self.blur_sigma = float(blur_sigma)
        kernel = kornia.filters.get_gaussian_kernel2d((kernel_size,) * 2, (self.blur_sigma,) * 2)[0]
        super().__init__(kernel, sigma_y, cutoff)

    def describe(self):
        return f"kernel={self.kernel_size}, blur_sigma={self.blur_sigma}, sigma_y={self.sigma_y}"


class MotionBlur(Blur):
    """A straight motion streak of kernel_size pixels at `angle` degrees; direction in [-1, 1] weights its ends."""
    name = "motion blur"

    def __init__(self, kernel_size=9, angle=30.0, direction=0.0, sigma_y=0.0, cutoff=None):
        if not (isinstance(kernel_size, int) and kernel_size >= 3 and kernel_size % 2 == 1):
            raise OperatorError(f"{self.name}: kernel_size = {kernel_size!r} must be an odd integer >= 3")
        if not (math.isfinite(angle) and math.isfinite(direction) and -1.0 <= direction <= 1.0):
            raise OperatorError(f"{self.name}: angle = {angle!r} must be finite and direction = {direction!r} in "
                                f"[-1, 1]")
        import kornia
        self.angle, self.direction = float(angle), float(direction)
        kernel = kornia.filters.get_motion_kernel2d(kernel_size, self.angle, self.direction)[0]
        super().__init__(kernel, sigma_y, cutoff)

    def describe(self):
        return f"kernel={self.kernel_size}, angle={self.angle}, direction={self.direction}, sigma_y={self.sigma_y}"


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

    def gram_solve(self, v, r2, s2):             # A A^T = I / C
        return self.adjoint(v / (r2 / self.channels + s2))

    def describe(self):
        return f"channels={self.channels}, sigma_y={self.sigma_y}"


class JPEG(Operator):
    """kornia's differentiable JPEG codec (quality 1-100) on images in [-1, 1]."""
    name = "jpeg"

    def __init__(self, quality=50, sigma_y=0.0):
        super().__init__(sigma_y)
        if not (isinstance(quality, (int, float)) and 1 <= quality <= 100):
            raise OperatorError(f"{self.name}: quality = {quality!r} must be in [1, 100]")
        self.quality = float(quality)

    def check_image(self, x_shape):
        super().check_image(x_shape)
        if x_shape[1] not in (1, 3):
            raise OperatorError(f"{self.name}: JPEG codes 1- or 3-channel images, got {x_shape[1]} channels")

    def forward(self, x):
        from kornia.enhance import jpeg_codec_differentiable
        rgb = ((x.float() + 1) / 2).clamp(0, 1)
        if x.shape[1] == 1:
            rgb = rgb.expand(-1, 3, -1, -1)
        coded = jpeg_codec_differentiable(rgb, torch.tensor([self.quality], device=x.device))
        if x.shape[1] == 1:
            coded = coded.mean(dim=1, keepdim=True)
        return (coded * 2 - 1).to(x.dtype)

    def describe(self):
        return f"quality={self.quality:g}, sigma_y={self.sigma_y}"


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


def ssim(x, ref):
    """SSIM (kornia, 7x7 Gaussian window, data range 1) of images in [-1, 1] mapped to [0, 1], batch mean."""
    from kornia.metrics import ssim as kornia_ssim
    a, b = ((x.float() + 1) / 2).clamp(0, 1), ((ref.float() + 1) / 2).clamp(0, 1)
    return float(kornia_ssim(a, b, 7).mean())


def consistency(op, x, y):
    """RMS of A(x) - y per measurement element (same units as sigma_y)."""
    return float((op.forward(x.float()) - y.float()).pow(2).mean().sqrt())
