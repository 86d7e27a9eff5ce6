"""Naturalistic images that need no download: a textured dead-leaves model.

The dead-leaves (occlusion) model stacks opaque shapes ("leaves") at random positions,
each hiding what lies behind it. With leaf sizes drawn from a power law ``p(r) ~ r^-3``
the images are scale invariant and their amplitude spectrum falls roughly as ``1/f``,
like photographs of natural scenes. Here the leaves are

* ellipses, rounded rectangles and oriented bars (superellipses of varied aspect ratio),
  some with a wobbly outline (blobs with convex and concave curvature);
* curved bars (annulus sectors), giving curved contours and corners;

with varied orientation, size, luminance (and, for RGB, colour), each optionally textured
with an isotropic or oriented pink-noise (``1/f``) texture. Each image then gets its own
mean luminance and contrast, a smooth illumination field, and a mild optical blur.

Randomness: images come in fixed blocks of ``BLOCK`` images, each drawn from
``numpy.random.default_rng(derive_seed(seed, "natural-block", k))``, so image ``i``
depends only on ``(seed, i, size, grayscale)``, not on ``n`` or ``batch``, and the first
``m`` images of ``generate_natural_images(n)`` equal ``generate_natural_images(m)``.
The grayscale image is the luminance of the RGB image drawn with the same seed.

Example:
    >>> x = generate_natural_images(8, size=64, seed=3)
    >>> tuple(x.shape), x.dtype
    ((8, 1, 64, 64), torch.float32)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from synth.runtime import derive_seed

log = logging.getLogger(__name__)

#: images per block of random draws (the unit of reproducibility)
BLOCK = 16
#: number of leaves per image (painted back to front; a pink-noise background shows through gaps)
N_LEAVES = 200
#: pink-noise texture fields per image (isotropic, oriented, fine grain)
N_TEXTURES = 3
#: leaf sizes: p(r) ~ r^-LEAF_ALPHA for r in [LEAF_MIN, LEAF_MAX] * image size
LEAF_MIN, LEAF_MAX, LEAF_ALPHA = 0.03, 0.45, 2.4
_ELLIPSE, _SUPER4, _SUPER8, _BLOB, _CURVED = range(5)


@dataclass(frozen=True)
class _Leaves:
    """Per-leaf parameters of a batch of images, each (N, L) float64 unless noted."""

    cx: np.ndarray
    cy: np.ndarray
    r: np.ndarray  # size (pixels): semi-major axis, or arc chord half-length of a curved bar
    theta: np.ndarray
    kind: np.ndarray  # int: _ELLIPSE, _SUPER4, _SUPER8, _BLOB, _CURVED
    aspect: np.ndarray  # semi-minor / semi-major axis, or bar width / r for curved bars
    wobble: np.ndarray  # (N, L, 3) amplitudes of cos(k phi) outline terms, k = 2, 3, 4 (blobs)
    wphase: np.ndarray  # (N, L, 3)
    arc: np.ndarray  # half-angle of a curved bar (radians)
    lum: np.ndarray
    rg: np.ndarray
    by: np.ndarray
    tex_amp: np.ndarray
    tex_k: np.ndarray  # int in [0, N_TEXTURES)


@dataclass(frozen=True)
class _ImageParams:
    """Per-image parameters, each (N,) float64."""

    mean: np.ndarray
    contrast: np.ndarray
    blur: np.ndarray  # Gaussian sigma in pixels
    illum: np.ndarray  # amplitude of the smooth illumination field
    bg_amp: np.ndarray
    tex_theta: np.ndarray
    tex_kappa: np.ndarray
    tint_rg: np.ndarray
    tint_by: np.ndarray


def _power_law(rng: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float, alpha: float) -> np.ndarray:
    """Samples of p(r) ~ r^-alpha on [lo, hi] by inverse CDF."""
    u = rng.random(shape)
    a = 1.0 - alpha
    return (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)


def _draw_block(rng: np.random.Generator, n: int, size: int) -> tuple[_Leaves, _ImageParams, np.ndarray]:
    """All random draws of one block (the order of draws is part of the seed contract)."""
    L = N_LEAVES
    img = _ImageParams(
        mean=rng.uniform(0.3, 0.65, n),
        contrast=rng.uniform(0.09, 0.24, n),
        blur=rng.choice([0.3, 0.5, 0.7, 1.0], n, p=[0.4, 0.3, 0.2, 0.1]),
        illum=rng.uniform(0.0, 0.3, n),
        bg_amp=rng.uniform(0.5, 1.2, n),
        tex_theta=rng.uniform(0, np.pi, n),
        tex_kappa=rng.uniform(1.0, 4.0, n),
        tint_rg=rng.normal(0, 0.04, n),
        tint_by=rng.normal(0, 0.06, n),
    )
    sat = rng.uniform(0.03, 0.14, n)[:, None]
    r = _power_law(rng, (n, L), LEAF_MIN * size, LEAF_MAX * size, LEAF_ALPHA)
    # shapes: ellipses, rounded rectangles, rectangles, bars, blobs, curved bars
    shape = rng.choice(6, (n, L), p=[0.28, 0.14, 0.12, 0.16, 0.14, 0.16])
    kind = np.array([_ELLIPSE, _SUPER4, _SUPER8, _SUPER4, _BLOB, _CURVED])[shape]
    aspect = np.select(
        [shape <= 2, shape == 3, shape == 4],
        [rng.uniform(0.35, 1.0, (n, L)), rng.uniform(0.08, 0.25, (n, L)), rng.uniform(0.6, 1.0, (n, L))],
        rng.uniform(0.12, 0.35, (n, L)),
    )
    wob = rng.uniform(0.0, 0.25, (n, L, 3)) * (kind == _BLOB)[..., None] * np.array([1.0, 0.7, 0.5])
    leaves = _Leaves(
        cx=rng.uniform(-0.1 * size, 1.1 * size, (n, L)),
        cy=rng.uniform(-0.1 * size, 1.1 * size, (n, L)),
        r=r,
        theta=rng.uniform(0, 2 * np.pi, (n, L)),
        kind=kind,
        aspect=aspect,
        wobble=wob,
        wphase=rng.uniform(0, 2 * np.pi, (n, L, 3)),
        arc=rng.uniform(0.5, 1.4, (n, L)),
        lum=rng.standard_normal((n, L)),
        rg=rng.standard_normal((n, L)) * sat,
        by=rng.standard_normal((n, L)) * sat,
        tex_amp=rng.uniform(0.0, 0.8, (n, L)) * (rng.random((n, L)) < 0.6),
        tex_k=rng.integers(0, N_TEXTURES, (n, L)),
    )
    # white noise for: N_TEXTURES textures, background, illumination
    noise = rng.standard_normal((n, N_TEXTURES + 2, size, size), dtype=np.float32)
    return leaves, img, noise


def _freq_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    return fy.expand(size, fx.shape[1]), fx.expand(size, fx.shape[1])


def _noise_fields(noise: torch.Tensor, img: _ImageParams) -> torch.Tensor:
    """Filter white noise into unit-variance fields: textures, background, illumination.

    Shape:
        noise: (N, N_TEXTURES + 2, S, S); returns the same shape.
    """
    n, k, s, _ = noise.shape
    fy, fx = _freq_grid(s)
    f = torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / s)
    phi = torch.atan2(fy, fx)
    spec = torch.fft.rfft2(noise)
    filt = torch.empty(n, k, *f.shape)
    filt[:, 0] = f ** -1.0  # isotropic pink texture
    th = torch.as_tensor(img.tex_theta, dtype=torch.float32).view(n, 1, 1)
    kap = torch.as_tensor(img.tex_kappa, dtype=torch.float32).view(n, 1, 1)
    orient = torch.exp(kap * (torch.cos(2 * (phi - th)) - 1))
    filt[:, 1] = orient * f ** -0.8 * (f > 2.0 / s)  # oriented (grain, grass, bark)
    filt[:, 2] = f ** -1.3  # mottled, cloudy
    filt[:, 3] = f ** -1.0  # pink background
    filt[:, 4] = torch.exp(-((f * s / 2.0) ** 2))  # smooth illumination (a few cycles/image)
    out = torch.fft.irfft2(spec * filt, s=(s, s))
    out = out - out.mean(dim=(2, 3), keepdim=True)
    return out / out.std(dim=(2, 3), keepdim=True).clamp_min(1e-8)


def _bucket_sizes(max_side: int) -> list[int]:
    sizes, b = [], 3.0
    while True:
        sizes.append(int(math.ceil(b)))
        if sizes[-1] >= max_side:
            return sizes
        b *= 1.41


def _inside(kind: int, dx: torch.Tensor, dy: torch.Tensor, P: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which pixels lie inside leaves of one shape kind.

    Shape:
        dx: (m, 1, b) and dy: (m, b, 1) pixel offsets from the leaf centres; P: (m, 1, 1) each.
        returns: (m, b, b) bool.
    """
    if kind == _CURVED:
        # arc of radius R through the leaf centre, bulging along -v, half-angle `arc`, width w
        u = P["c"] * dx + P["s"] * dy
        vv = P["R"] - (P["c"] * dy - P["s"] * dx)
        d2 = u * u + vv * vv
        return (d2 >= P["rin2"]) & (d2 <= P["rout2"]) & (vv > 0) & (u.abs() <= P["tan"] * vv)
    # coordinates scaled by the semi-axes
    U = P["ca"] * dx + P["sa"] * dy
    V = P["cb"] * dy - P["sb"] * dx
    U2, V2 = U * U, V * V
    if kind == _ELLIPSE:
        return U2 + V2 <= 1.0
    if kind == _SUPER4:
        return U2 * U2 + V2 * V2 <= 1.0
    if kind == _SUPER8:
        U2, V2 = U2 * U2, V2 * V2
        return U2 * U2 + V2 * V2 <= 1.0
    # blob: ellipse with a wobbly outline, rho <= 1 + sum_k w_k cos(k phi + ph_k), k = 2, 3, 4
    rho2 = U2 + V2
    inv = torch.rsqrt(rho2.clamp_min(1e-12))
    c1, s1 = U * inv, V * inv
    c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
    c3, s3 = c1 * c2 - s1 * s2, s1 * c2 + c1 * s2
    c4, s4 = c2 * c2 - s2 * s2, 2 * c2 * s2
    bound = 1.0 + P["wc2"] * c2 + P["ws2"] * s2 + P["wc3"] * c3 + P["ws3"] * s3 + P["wc4"] * c4 + P["ws4"] * s4
    return rho2 <= bound * bound


def _render_ids(leaves: _Leaves, n: int, size: int) -> torch.Tensor:
    """Index of the front-most leaf covering each pixel (-1 where none).

    Leaves are grouped by shape kind and bounding-box size, so each is evaluated only on
    the pixels near it; depth order is the leaf index (later = in front), resolved by a
    scatter max.

    Returns:
        (n, size, size) int64 ids into the flattened (n * N_LEAVES) leaf arrays.
    """
    L = N_LEAVES
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32).reshape(-1)  # noqa: E731
    cx, cy, r, th = f32(leaves.cx), f32(leaves.cy), f32(leaves.r), f32(leaves.theta)
    aspect, arc = f32(leaves.aspect), f32(leaves.arc)
    wob = torch.as_tensor(leaves.wobble, dtype=torch.float32).reshape(-1, 3)
    wph = torch.as_tensor(leaves.wphase, dtype=torch.float32).reshape(-1, 3)
    kind = torch.as_tensor(leaves.kind).reshape(-1)
    c, s = torch.cos(th), torch.sin(th)
    a, b = r, r * aspect
    # axis-aligned half extents of each leaf (a superellipse fits in its rotated box)
    box_sq = kind != _ELLIPSE
    hx = torch.where(box_sq, (a * c).abs() + (b * s).abs(), torch.sqrt((a * c) ** 2 + (b * s) ** 2))
    hy = torch.where(box_sq, (a * s).abs() + (b * c).abs(), torch.sqrt((a * s) ** 2 + (b * c) ** 2))
    wsum = wob.sum(1)
    hx = torch.where(kind == _BLOB, a * (1 + wsum), hx)
    hy = torch.where(kind == _BLOB, a * (1 + wsum), hy)
    hx = torch.where(kind == _CURVED, r + b, hx)
    hy = torch.where(kind == _CURVED, r + b, hy)
    R = r / (2 * torch.sin(arc / 2))
    P_all = {
        "c": c, "s": s, "ca": c / a, "sa": s / a, "cb": c / b, "sb": s / b,
        "R": R, "rin2": (R - b / 2).clamp_min(0) ** 2, "rout2": (R + b / 2) ** 2, "tan": torch.tan(arc),
    }
    for k in range(3):
        P_all[f"wc{k + 2}"] = wob[:, k] * torch.cos(wph[:, k])
        P_all[f"ws{k + 2}"] = -wob[:, k] * torch.sin(wph[:, k])
    x0 = torch.round(cx).long()
    y0 = torch.round(cy).long()
    # drop leaves entirely outside the image
    keep = (x0 + hx + 1 >= 0) & (x0 - hx - 1 < size) & (y0 + hy + 1 >= 0) & (y0 - hy - 1 < size)
    sides = _bucket_sizes(2 * size + 8)
    bx = torch.bucketize(2 * torch.ceil(hx) + 3, torch.tensor(sides, dtype=torch.float32))
    by = torch.bucketize(2 * torch.ceil(hy) + 3, torch.tensor(sides, dtype=torch.float32))
    group = (kind * len(sides) + bx) * len(sides) + by
    group = torch.where(keep, group, -1)
    buf = torch.full((n * size * size,), -1, dtype=torch.long)
    order = torch.argsort(group)
    gs = group[order]
    uniq, counts = torch.unique_consecutive(gs, return_counts=True)
    start = 0
    for g, cnt in zip(uniq.tolist(), counts.tolist()):
        sel = order[start : start + cnt]
        start += cnt
        if g < 0:
            continue
        k, rest = divmod(g, len(sides) ** 2)
        wx, wy = sides[rest // len(sides)], sides[rest % len(sides)]
        offx = torch.arange(wx) - (wx - 1) // 2
        offy = torch.arange(wy) - (wy - 1) // 2
        px = x0[sel].view(-1, 1, 1) + offx.view(1, 1, wx)  # (m, 1, wx)
        py = y0[sel].view(-1, 1, 1) + offy.view(1, wy, 1)  # (m, wy, 1)
        dx = px - cx[sel].view(-1, 1, 1)
        dy = py - cy[sel].view(-1, 1, 1)
        P = {key: val[sel].view(-1, 1, 1) for key, val in P_all.items()}
        inside = _inside(k, dx, dy, P)
        inside &= ((px >= 0) & (px < size)) & ((py >= 0) & (py < size))
        flat = (sel // L).view(-1, 1, 1) * (size * size) + py.clamp(0, size - 1) * size + px.clamp(0, size - 1)
        val = torch.where(inside, sel.view(-1, 1, 1), -1)
        buf.scatter_reduce_(0, flat.reshape(-1), val.reshape(-1), reduce="amax")
    return buf.view(n, size, size)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur in the Fourier domain (periodic boundary; mild sigmas only).

    Shape:
        x: (N, C, S, S); sigma: (N,) pixels.
    """
    s = x.shape[-1]
    fy, fx = _freq_grid(s)
    f2 = fx**2 + fy**2
    h = torch.exp(-2 * math.pi**2 * sigma.view(-1, 1, 1, 1) ** 2 * f2)
    return torch.fft.irfft2(torch.fft.rfft2(x) * h, s=(s, s))


def _render(leaves: _Leaves, img: _ImageParams, noise: np.ndarray, size: int, grayscale: bool) -> torch.Tensor:
    n = noise.shape[0]
    fields = _noise_fields(torch.from_numpy(noise), img)
    ids = _render_ids(leaves, n, size)
    bg = ids < 0
    t = lambda a: torch.as_tensor(a, dtype=torch.float32).reshape(n, -1)  # noqa: E731
    mean = torch.as_tensor(img.mean, dtype=torch.float32).view(n, 1, 1)
    con = torch.as_tensor(img.contrast, dtype=torch.float32).view(n, 1, 1)
    local = torch.where(bg, 0, ids - torch.arange(n).view(n, 1, 1) * N_LEAVES).view(n, -1)  # leaf index within its image
    gat = lambda a: torch.gather(t(a), 1, local).view(n, size, size)  # noqa: E731
    lum = gat(leaves.lum)
    tex_amp = gat(leaves.tex_amp)
    tex_k = torch.gather(torch.as_tensor(leaves.tex_k).reshape(n, -1), 1, local).view(n, 1, size, size)
    tex = torch.gather(fields[:, :N_TEXTURES], 1, tex_k).squeeze(1)
    bg_amp = torch.as_tensor(img.bg_amp, dtype=torch.float32).view(n, 1, 1)
    # luminance in units of the image contrast around its mean
    z = torch.where(bg, bg_amp * fields[:, N_TEXTURES] * 0.7, lum + tex_amp * tex)
    illum = 1.0 + torch.as_tensor(img.illum, dtype=torch.float32).view(n, 1, 1) * fields[:, N_TEXTURES + 1]
    L = (mean + con * z) * illum
    chans = [L]
    if not grayscale:
        rg = torch.where(bg, torch.zeros(()), gat(leaves.rg)) + torch.as_tensor(img.tint_rg, dtype=torch.float32).view(n, 1, 1)
        by = torch.where(bg, torch.zeros(()), gat(leaves.by)) + torch.as_tensor(img.tint_by, dtype=torch.float32).view(n, 1, 1)
        rg, by = rg * L * 2, by * L * 2  # chroma scales with luminance (surfaces reflect light)
        chans = [L - by / 3 + rg / 2, L - by / 3 - rg / 2, L + 2 * by / 3]
    x = torch.stack(chans, dim=1)
    x = _gaussian_blur(x, torch.as_tensor(img.blur * size / 112.0, dtype=torch.float32))
    return x.clamp_(0.0, 1.0)


def generate_natural_images(n: int, *, size: int = 112, grayscale: bool = True, seed: int = 0, batch: int = 256) -> torch.Tensor:
    """Generate naturalistic (textured dead-leaves) images.

    Args:
        n: number of images.
        size: side in pixels (square images; leaf sizes scale with it).
        grayscale: one luminance channel, else RGB with coloured leaves.
        seed: images depend only on (seed, index, size, grayscale).
        batch: images rendered together (memory vs. speed; does not change the images).

    Returns:
        (n, C, size, size) float32 in [0, 1], C = 1 if grayscale else 3.
    """
    if n < 0 or size < 8 or batch < 1:
        raise ValueError(f"expected n >= 0, size >= 8, batch >= 1; got n={n}, size={size}, batch={batch}")
    c = 1 if grayscale else 3
    out = torch.empty(n, c, size, size, dtype=torch.float32)
    blocks_per_batch = max(1, batch // BLOCK)
    n_blocks = -(-n // BLOCK)
    for b0 in range(0, n_blocks, blocks_per_batch):
        draws = []
        for k in range(b0, min(n_blocks, b0 + blocks_per_batch)):
            rng = np.random.default_rng(derive_seed(seed, "natural-block", k))
            draws.append(_draw_block(rng, BLOCK, size))
        leaves = _Leaves(**{f: np.concatenate([getattr(d[0], f) for d in draws]) for f in _Leaves.__dataclass_fields__})
        img = _ImageParams(**{f: np.concatenate([getattr(d[1], f) for d in draws]) for f in _ImageParams.__dataclass_fields__})
        noise = np.concatenate([d[2] for d in draws])
        x = _render(leaves, img, noise, size, grayscale)
        i0 = b0 * BLOCK
        m = min(n - i0, x.shape[0])
        out[i0 : i0 + m] = x[:m]
    return out
