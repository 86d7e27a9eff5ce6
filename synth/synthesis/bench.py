"""Speed benchmark: synth's batched synthesis vs lucent's ``render_vis``, one target at a time.

Both sides optimize the same one-hot population objective (log-softmax over sites of
responses z-scored by natural-image statistics, for one target site) on the same fixed,
seeded stand-in surrogate (:class:`StandInSurrogate`: a small random conv stack with a
factorized readout over ``n_sites`` sites), at the same image size (RGB), with the same
robustness transforms: lucent's own functions ``pad(12, grey 0.5)``, ``jitter(8)``,
``random_scale(0.9 .. 1.1)``, ``jitter(4)`` (its ``standard_transforms`` without
``random_rotate``, whose code needs kornia < 0.4). Applied to synth's batch, these
functions draw one set of random parameters per step for the whole batch, exactly as
they do for lucent's batch of one. No display constraints or priors on either side.

(b) lucent: ``render_vis`` for each target in turn, ``steps`` Adam steps (lr 0.05) on its
    own Fourier / decorrelated-colour parameterization (``param.image``); the final
    image's clean objective (no transforms, fp32) is recorded per target.
(a) synth: all targets in one batched run, each image stopping as soon as its clean
    objective (fp32) reaches lucent's value for that target (checked every
    ``check_every`` steps), or at ``steps`` (then it counts as not reached). Where the
    steps come from: a steeper Fourier preconditioning (1/f^2), Adam with a higher step
    size (0.8) and shorter memory (betas 0.8, 0.99), per-image stopping with finished
    images dropped from the batch, batching, and bf16 autocast of the model.

Speed-up = lucent's total wall time / synth's total wall time (both including set-up;
process CPU time is reported too, as it is less sensitive to other jobs on shared CPUs).
The last line written is ``speedup_vs_lucent: X``.

Run: ``synth bench synthesis --device cpu`` (spec settings: 224 px, 64 sites, 256 steps);
``--n-sites 8 --steps 64`` for a quick check.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from synth.errors import UserError
from synth.runtime import derive_seed, resolve_device, torch_generator
from synth.synthesis.config import ConstraintsConfig
from synth.synthesis.constraints import Display
from synth.synthesis.jobs import Job, ObjectiveContext
from synth.synthesis.objectives import ObjectiveInputs, one_hot
from synth.synthesis.params import PARAMS
from synth.synthesis.steps import ValueStopper

log = logging.getLogger(__name__)


class StandInSurrogate(nn.Module):
    """A fixed, seeded stand-in surrogate: random conv stack + factorized readout.

    Four ReLU conv layers (strides 2, 2, 2, 1) on normalized input, average-pooled to a
    ``grid`` x ``grid`` map (so any input size works), then per site a Gaussian spatial
    mask times a feature weight vector, and a softplus.

    Args:
        n_sites: number of sites S.
        channels: input channels (1 or 3).
        width: channels of the four conv layers.
        grid: readout grid size.
        seed: all weights are drawn from this seed.

    Shape:
        ``(B, channels, H, W)`` in [0, 1] -> ``(B, S)`` > 0.
    """

    def __init__(self, n_sites: int = 64, *, channels: int = 3, width: tuple[int, ...] = (16, 32, 64, 64), grid: int = 14, seed: int = 0) -> None:
        super().__init__()
        g = torch_generator(derive_seed(seed, "bench", "stand-in"))
        layers: list[nn.Module] = []
        c = channels
        for co, k, s in zip(width, (7, 3, 3, 3), (2, 2, 2, 1)):
            conv = nn.Conv2d(c, co, k, s, k // 2)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (c * k * k)))
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
            c = co
        self.core = nn.Sequential(*layers)
        self.grid = int(grid)
        yy, xx = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
        cy = torch.rand(n_sites, generator=g) * (grid * 0.5) + grid * 0.25
        cx = torch.rand(n_sites, generator=g) * (grid * 0.5) + grid * 0.25
        sig = torch.rand(n_sites, generator=g) * 1.5 + 1.0
        m = torch.exp(-((yy - cy.view(-1, 1, 1)) ** 2 + (xx - cx.view(-1, 1, 1)) ** 2) / (2 * sig.view(-1, 1, 1) ** 2))
        self.register_buffer("mask", m / m.flatten(1).sum(1).view(-1, 1, 1))
        self.register_buffer("weight", torch.randn(n_sites, c, generator=g) / math.sqrt(c))
        self.out = nn.Identity()  # lucent hooks its output by this name
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.core((x - 0.45) / 0.25)
        f = F.adaptive_avg_pool2d(f, self.grid)
        r = torch.einsum("nchw,shw,sc->ns", f, self.mask.to(f.dtype), self.weight.to(f.dtype))
        return self.out(F.softplus(r.float()))

    def receptive_fields(self) -> torch.Tensor:
        """(S, grid, grid) spatial masks scaled to max 1."""
        return self.mask / self.mask.flatten(1).amax(1).view(-1, 1, 1)


def pink_noise_images(n: int, size: int, channels: int, seed: int) -> torch.Tensor:
    """Seeded 1/f-noise images (N, C, size, size) in [0, 1] (natural-image stand-ins)."""
    g = torch_generator(derive_seed(seed, "bench", "natural"))
    w = torch.randn(n, channels, size, size, generator=g)
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    f = torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / size)
    x = torch.fft.irfft2(torch.fft.rfft2(w) / f, s=(size, size))
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    x = x / x.std(dim=(1, 2, 3), keepdim=True)
    return (0.45 + 0.18 * x).clamp(0, 1)


def _check_lucent() -> Any:
    try:
        from lucent.optvis import param as lparam
        from lucent.optvis import render, transform
    except ModuleNotFoundError as err:
        raise UserError(
            f"the benchmark needs torch-lucent: {err}; install with `pip install ipython decorator` and "
            "`pip install --no-deps torch-lucent==0.1.8` (it pins an old kornia; the parts used here work with current kornia)"
        ) from None
    return lparam, render, transform


class SharedDrawTransforms:
    """Wrap lucent's transform functions for a batch: one random draw per step for the whole batch.

    The same functions (and so exactly the same transforms) as lucent applies to its batch
    of one; randomness comes from NumPy's global generator, as in lucent (seeded here).
    """

    n_random = 0

    def __init__(self, fns: list[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.fns = list(fns)

    def __call__(self, x: torch.Tensor, u: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        for f in self.fns:
            x = f(x)
        return x


def lucent_transforms(ltransform: Any) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """lucent's ``standard_transforms`` without ``random_rotate`` (which needs kornia < 0.4)."""
    scales = [1 + (i - 5) / 50.0 for i in range(11)]
    return [ltransform.pad(12, mode="constant", constant_value=0.5), ltransform.jitter(8), ltransform.random_scale(scales), ltransform.jitter(4)]


class _Clock:
    """Wall and process CPU time (the latter is robust to other jobs on shared CPUs)."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev

    def __enter__(self) -> "_Clock":
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def bench_synthesis(
    device: str = "cpu",
    image_size: int = 224,
    n_sites: int = 64,
    steps: int = 256,
    seed: int = 0,
    write: Callable[[str], None] | None = None,
    *,
    temperature: float = 1.0,
    lr: float = 0.8,
    betas: tuple[float, float] = (0.8, 0.99),
    decay_power: float = 2.0,
    precision: str = "bf16",
    batch_size: int | None = None,
    check_every: int = 4,
    lucent_lr: float = 0.05,
) -> dict[str, Any]:
    """Time synth (all targets batched) against lucent (one target at a time); see module docstring.

    Args:
        device: cpu, cuda or cuda:0 (lucent itself always uses cuda:0 when CUDA exists).
        image_size: image size (square).
        n_sites: sites of the stand-in surrogate = number of targets.
        steps: lucent's steps per target (and synth's step limit).
        seed: seed of the surrogate, natural stand-ins and both sides' random draws.
        write: called with each output line (default: log.info).
        temperature: one-hot softmax temperature.
        lr, betas: synth's Adam settings; lucent_lr: lucent's Adam step size (its default 0.05).
        decay_power: synth's Fourier spectrum decay (1/f^decay_power).
        precision: synth's model precision during optimization: fp32 or bf16 (autocast; on
            CPU it needs AVX512-BF16/AMX to be faster). Objective values are always fp32.
        batch_size: synth's images per model call (default 16 on CPU, all on CUDA).
        check_every: synth checks the clean objective every this many steps.

    Returns:
        dict with both wall and CPU times, per-target objective values and the speed-up.
    """
    out = write or (lambda s: log.info("%s", s))
    dev = resolve_device(device)
    lparam, render, ltransform = _check_lucent()
    if dev.type == "cuda" and dev.index not in (None, 0):
        raise UserError("lucent always runs on cuda:0; use --device cuda or cuda:0")
    if batch_size is None and dev.type == "cpu":
        batch_size = 16

    model = StandInSurrogate(n_sites, channels=3, seed=seed).to(dev)
    nat = pink_noise_images(64, image_size, 3, seed)
    with torch.no_grad():
        pred = torch.cat([model(nat[i : i + 16].to(dev)).cpu() for i in range(0, nat.shape[0], 16)])
    ctx = ObjectiveContext.from_predictions([f"site{i:03d}" for i in range(n_sites)], pred, nat)
    mean, std = ctx.natural_mean.to(dev), ctx.natural_std.to(dev)
    objective = one_hot(temperature=temperature)

    def clean_value(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            r = model(images.to(dev))
            inp = ObjectiveInputs(responses=r, images=images, target=targets.to(dev), natural_mean=mean, natural_std=std,
                                  site_ids=ctx.site_ids, background=torch.full((images.shape[0],), 0.5, device=dev))
            return objective(inp).float().cpu()

    threads = torch.get_num_threads()
    out(f"device: {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{threads} torch CPU threads'})")
    out(f"surrogate: seeded stand-in (4 conv layers + factorized readout), {n_sites} sites; images {image_size}px RGB")
    out(f"objective (both): one_hot = log-softmax over sites of z-scored responses (T={temperature}) of the target; "
        "values are of the clean final image (no transforms, fp32)")
    out("transforms (both): lucent's own pad(12, grey 0.5), jitter(8), random_scale(0.9..1.1), jitter(4)")

    # ---------------------------------------------------------------- (b) lucent
    lucent_values = torch.empty(n_sites)
    with _Clock(dev) as t_lucent:
        for s in range(n_sites):
            np.random.seed(derive_seed(seed, "bench", "lucent", s))
            torch.manual_seed(derive_seed(seed, "bench", "lucent", s))
            tgt = torch.tensor([s])

            def obj_f(hook: Any, tgt: torch.Tensor = tgt) -> torch.Tensor:
                r = hook("out")
                z = (r - mean) / std
                return -F.log_softmax(z / temperature, dim=1).gather(1, tgt.to(r.device).view(-1, 1)).sum()

            imgs = render.render_vis(
                model, obj_f, param_f=lambda: lparam.image(image_size, decorrelate=True, fft=True),
                optimizer=lambda p: torch.optim.Adam(p, lr=lucent_lr), transforms=lucent_transforms(ltransform),
                thresholds=(steps,), preprocess=False, progress=False, show_image=False, fixed_image_size=image_size,
            )
            final = torch.from_numpy(np.ascontiguousarray(imgs[-1])).permute(0, 3, 1, 2).float()
            lucent_values[s] = clean_value(final, tgt)[0]
    out(f"lucent render_vis: {n_sites} targets one at a time, {steps} steps each (Adam lr {lucent_lr}, Fourier + "
        f"decorrelated colour): wall {t_lucent.wall:.1f} s, cpu {t_lucent.cpu:.1f} s; objective mean "
        f"{lucent_values.mean():.4f} (min {lucent_values.min():.4f}, max {lucent_values.max():.4f})")

    # ---------------------------------------------------------------- (a) synth
    from synth.synthesis.engine import Synthesizer

    with _Clock(dev) as t_synth:
        np.random.seed(derive_seed(seed, "bench", "synth"))
        param = PARAMS.build({"name": "fourier", "decay_power": decay_power}, channels=3, size=image_size)
        display = Display(ConstraintsConfig(luminance=None, contrast=None), size=image_size, context=ctx, device=dev)
        stopper = ValueStopper(lucent_values, every=check_every)
        syn = Synthesizer(
            model, param=param, display=display, transforms=SharedDrawTransforms(lucent_transforms(ltransform)), priors=(),
            context=ctx, steps=steps, lr=lr, betas=betas, optimizer="adam", stoppers=[stopper], batch_size=batch_size,
            fixed_chunks=False, precision=precision, device=dev,
        )
        spec = "one_hot" if temperature == 1.0 else {"name": "one_hot", "temperature": temperature}
        jobs = [Job(f"one_hot_{s}", spec, s, derive_seed(seed, "bench", "synth", s)) for s in range(n_sites)]
        res = syn.run(jobs, desc="bench synth")
    reached = int(stopper.reached.sum())
    at_stop = stopper.value_at_stop.cpu()
    u8 = torch.as_tensor(res.objective_value)
    reached_u8 = int((u8 >= lucent_values.double()).sum())
    out(f"synth: {n_sites} targets in one batched run (Adam lr {lr}, betas {tuple(betas)}, Fourier 1/f^{decay_power}, "
        f"{syn.precision}, {batch_size or 'all'} images per model call, stop when the clean objective >= lucent's, checked "
        f"every {check_every} steps, at most {steps}): wall {t_synth.wall:.1f} s, cpu {t_synth.cpu:.1f} s; "
        f"steps mean {res.steps.mean():.1f}, max {int(res.steps.max())}")
    out(f"synth reached lucent's value: {reached}/{n_sites} targets (float images; on the 8-bit images: {reached_u8}/{n_sites}); "
        f"objective at stop mean {at_stop.nan_to_num(float('nan')).mean():.4f}")
    speedup = t_lucent.wall / t_synth.wall
    out(f"speedup (cpu time): {t_lucent.cpu / max(t_synth.cpu, 1e-9):.2f}")
    out(f"speedup_vs_lucent: {speedup:.2f}")
    return {
        "device": str(dev),
        "threads": threads,
        "image_size": image_size,
        "n_sites": n_sites,
        "steps": steps,
        "lucent_seconds": t_lucent.wall,
        "lucent_cpu_seconds": t_lucent.cpu,
        "synth_seconds": t_synth.wall,
        "synth_cpu_seconds": t_synth.cpu,
        "lucent_objective": lucent_values.numpy().tolist(),
        "synth_objective_at_stop": at_stop.numpy().tolist(),
        "synth_objective_8bit": u8.numpy().tolist(),
        "synth_steps": res.steps.tolist(),
        "reached": reached,
        "reached_8bit": reached_u8,
        "speedup": speedup,
        "speedup_cpu": t_lucent.cpu / max(t_synth.cpu, 1e-9),
    }
