"""The synthesis loop: a small loop around swappable pieces (like sinzlab/mei).

Pieces: parameterization (``params``), display constraints (``constraints``), robustness
transforms (``transforms``), priors (``priors``), objectives (``objectives``), a per-image
step rule and stopping rules (``steps``), and the history kept per image.

One step for a chunk of images::

    p  (rows of the parameter tensor)
    x  = param(p)                       rendered, in [0, 1]   (priors may hook its gradient)
    y  = display(x, mask)               displayed: range, luminance, contrast, aperture, RF
    t  = transforms(y, u[step])         random jitter / scale / rotate (per-image draws)
    r  = model(t)                       (B, S) predicted responses
    loss_i = -objective_i(r, y) + sum(prior penalties_i(y))
    p_i <- step_rule(p_i, d loss_i / d p_i)

Reproducibility and batching: every image gets its own seeds (derived from its job's
seed) for its initialization and its transform draws, its own optimizer state and its own
stopping decision, and the loss is a sum of per-image terms. The model is called on
chunks of exactly ``batch_size`` images (the last chunk is padded with copies that do not
enter the loss), so every computation has the same shape whichever jobs share a batch.
On CPU, the same jobs therefore give bit-identical images whether they run in one batch or
are split into several (e.g. per-checkpoint batches), given the same torch build and
thread count. Exceptions: the ``diversity`` objective compares images of the same
objective and target within a run, so keep all seeds of a target in one batch; with
``batch_size: null`` (one model call for all active images, fastest on GPU) and on CUDA
results can differ in the last bits between batch compositions.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from synth.runtime import autocast, derive_seed, progress, resolve_device, resolve_precision, torch_generator
from synth.synthesis.config import SynthesisConfig
from synth.synthesis.constraints import Display, image_stats, quantize
from synth.synthesis.jobs import Job, ObjectiveContext, SynthesisResult
from synth.synthesis.objectives import Objective, ObjectiveInputs, build_objective, resolve_spec, spec_key, uses_coupling
from synth.synthesis.params import PARAMS, ImageParam
from synth.synthesis.priors import PRIORS, Prior
from synth.synthesis.steps import PlateauStopper, Stopper, as_rows, build_step_rule
from synth.synthesis.transforms import TransformPipeline, build_transforms

log = logging.getLogger(__name__)

#: static loss scale used with fp16 autocast (gradients are unscaled before the step)
FP16_LOSS_SCALE = 2.0**12


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and no parameter gradients for the duration; restores the flags after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


@dataclass
class _Plan:
    """Per-image static data of one run (all on the device)."""

    targets: torch.Tensor  # (N,) long
    objective_index: torch.Tensor  # (N,) long into objectives
    groups: torch.Tensor  # (N,) long (objective, target)
    masks: torch.Tensor | None  # (N, 1, H, W)
    background: torch.Tensor  # (N,)
    uniforms: torch.Tensor  # (N, steps, n_random)


class Synthesizer:
    """The loop with its pieces (build with :meth:`from_config` or assemble by hand).

    Args:
        model: ``images (B, C, H, W) -> (B, S)``; used frozen and in eval mode.
        param: the image parameterization.
        display: the display constraints.
        transforms: robustness transforms.
        priors: penalties / gradient preconditioners.
        context: natural-set statistics for objectives.
        objectives: aliases ``name -> spec`` for job objectives (``SynthesisConfig.objectives``).
        steps: maximum steps per image.
        lr: step size; optimizer: adam, sgd or nsgd.
        stoppers: stopping rules (an image stops when any says so).
        batch_size: images per model call (fixed chunk size), None: all at once.
        precision: fp32, bf16 or fp16 (autocast of the model; fp16 on CUDA only), or auto
            (bf16 where the device computes it natively, else fp32).
        device: where to run.
        compile: torch.compile the model.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        param: ImageParam,
        display: Display,
        transforms: TransformPipeline,
        priors: Sequence[Prior] = (),
        context: ObjectiveContext,
        objectives: dict[str, Any] | None = None,
        steps: int = 128,
        lr: float = 0.05,
        optimizer: str = "adam",
        stoppers: Sequence[Stopper] = (),
        batch_size: int | None = 16,
        precision: str = "fp32",
        device: torch.device | str = "cpu",
        compile: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        fixed_chunks: bool = True,
    ) -> None:
        self.betas = (float(betas[0]), float(betas[1]))
        self.fixed_chunks = bool(fixed_chunks)
        self.model = model
        self.device = resolve_device(device)
        self.param = param.to(self.device)
        self.display = display
        self.transforms = transforms
        self.priors = list(priors)
        self.context = context
        self.aliases = dict(objectives or {})
        self.steps = int(steps)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.stoppers = list(stoppers)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.precision = resolve_precision(precision, self.device)
        self.compile = bool(compile)
        self._forward: Callable[[torch.Tensor], torch.Tensor] = model
        self.nat_mean = context.natural_mean.to(self.device)
        self.nat_std = context.natural_std.to(self.device)
        self.site_ids = [str(s) for s in context.site_ids]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        cfg: SynthesisConfig,
        *,
        context: ObjectiveContext,
        image_size: int,
        channels: int,
        device: torch.device | str = "cpu",
        stoppers: Sequence[Stopper] | None = None,
    ) -> "Synthesizer":
        """Build every piece from a :class:`SynthesisConfig`."""
        dev = resolve_device(device)
        param = PARAMS.build(cfg.param, key="synthesis.param", channels=channels, size=image_size)
        display = Display(cfg.constraints, size=image_size, context=context, device=dev)
        transforms = build_transforms(cfg.transforms)
        priors = [PRIORS.build(p, key=f"synthesis.priors[{i}]") for i, p in enumerate(cfg.priors)]
        if stoppers is None:
            st = cfg.stopping
            stoppers = [PlateauStopper(st.patience, st.min_delta, st.min_steps, st.smoothing)] if st.rule == "plateau" else []
        return cls(
            model,
            param=param,
            display=display,
            transforms=transforms,
            priors=priors,
            context=context,
            objectives=cfg.objectives,
            steps=cfg.steps,
            lr=cfg.lr,
            optimizer=cfg.optimizer,
            stoppers=stoppers,
            batch_size=cfg.batch_size,
            precision=cfg.precision,
            device=dev,
            compile=cfg.compile,
            betas=cfg.betas,
        )

    # ------------------------------------------------------------------ helpers
    def _chunks(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """Split rows into model calls of exactly ``batch_size`` (padded by repeating the first row)."""
        n = rows.shape[0]
        if self.batch_size is None or n == 0:
            return [(rows, n)] if n else []
        out = []
        for i in range(0, n, self.batch_size):
            c = rows[i : i + self.batch_size]
            real = c.shape[0]
            if real < self.batch_size and self.fixed_chunks:
                c = torch.cat([c, c[:1].expand(self.batch_size - real)])
            out.append((c, real))
        return out

    def _model(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            r = self._forward(images)
        return r.float()

    def _plan(self, jobs: Sequence[Job], objectives: list[Objective], keys: list[str]) -> _Plan:
        n = len(jobs)
        n_sites = len(self.site_ids)
        targets = torch.tensor([int(j.target_site) for j in jobs], dtype=torch.long)
        bad = [(j.stimulus_id, int(j.target_site)) for j in jobs if not 0 <= int(j.target_site) < n_sites]
        if bad:
            raise ValueError(f"job {bad[0][0]}: target_site {bad[0][1]} out of range for {n_sites} sites")
        key_index = {k: i for i, k in enumerate(keys)}
        oi = torch.tensor([key_index[spec_key(resolve_spec(j.objective, self.aliases))] for j in jobs], dtype=torch.long)
        group_ids: dict[tuple[int, int], int] = {}
        groups = torch.tensor([group_ids.setdefault((int(o), int(t)), len(group_ids)) for o, t in zip(oi, targets)], dtype=torch.long)
        k = self.transforms.n_random
        u = torch.empty(n, self.steps, k)
        for i, j in enumerate(jobs):
            g = torch_generator(derive_seed(int(j.seed), "synthesis", "transforms"))
            u[i] = torch.rand((self.steps, k), generator=g)
        targets = targets.to(self.device)
        masks = self.display.mask(targets)
        bg = torch.full((n,), float(self.display.background), device=self.device)
        return _Plan(targets, oi.to(self.device), groups.to(self.device), masks, bg, u.to(self.device))

    def _inputs(self, plan: _Plan, rows: torch.Tensor, r: torch.Tensor, y: torch.Tensor, snapshot: torch.Tensor | None) -> ObjectiveInputs:
        return ObjectiveInputs(
            responses=r,
            images=y,
            target=plan.targets[rows],
            natural_mean=self.nat_mean,
            natural_std=self.nat_std,
            site_ids=self.site_ids,
            background=plan.background[rows],
            group=plan.groups[rows],
            snapshot=snapshot,
            snapshot_group=plan.groups if snapshot is not None else None,
            index=rows,
        )

    def _objective(self, objectives: list[Objective], plan: _Plan, rows: torch.Tensor, inputs: ObjectiveInputs) -> torch.Tensor:
        oi = plan.objective_index[rows]
        present = torch.unique(oi).tolist()
        if len(present) == 1:
            return objectives[present[0]](inputs)
        val = None
        for k in present:
            v = objectives[k](inputs)
            val = torch.where(oi == k, v, torch.zeros_like(v) if val is None else val)
        return val

    def _render(self, p: torch.Tensor, plan: _Plan, rows: torch.Tensor, *, iters: int | None = None, precondition: bool = False) -> torch.Tensor:
        x = self.param(p)
        if precondition:
            for pr in self.priors:
                x = pr.precondition(x)
        mask = None if plan.masks is None else plan.masks[rows]
        return self.display(x, mask, iters=iters)

    def images(self, params: torch.Tensor, plan: _Plan, rows: torch.Tensor, *, iters: int | None = None) -> torch.Tensor:
        """Displayed images of ``rows`` (no grad), computed in fixed-size chunks."""
        out = []
        with torch.no_grad():
            for c, real in self._chunks(rows):
                out.append(self._render(params[c], plan, c, iters=iters)[:real])
        return torch.cat(out) if out else params.new_zeros((0, self.param.channels, self.param.size, self.param.size))

    def evaluate_images(self, images: torch.Tensor, plan: _Plan, rows: torch.Tensor, objectives: list[Objective], snapshot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean objective (n,) and responses (n, S) of given images of ``rows`` (no transforms, fp32)."""
        vals, resp = [], []
        pos = torch.arange(rows.shape[0], device=rows.device)
        with torch.no_grad():
            for c, real in self._chunks(pos):
                r = self._forward(images[c]).float()  # clean values always in fp32
                rr = rows[c]
                v = self._objective(objectives, plan, rr, self._inputs(plan, rr, r, images[c], snapshot))
                vals.append(v[:real])
                resp.append(r[:real])
        return torch.cat(vals), torch.cat(resp)

    # ------------------------------------------------------------------ the loop
    def run(self, jobs: Sequence[Job], *, desc: str = "synthesis", init_images: torch.Tensor | None = None) -> SynthesisResult:
        """Synthesize one image per job (see module docstring).

        Args:
            jobs: what to make.
            desc: progress bar label.
            init_images: optional ``(N, C, H, W)`` images in [0, 1], one per job, to start
                from (e.g. natural images); the parameterization's random initial values
                are added on top. None: start from those random values alone (noise).
        """
        t0 = time.perf_counter()
        jobs = list(jobs)
        n = len(jobs)
        if n == 0:
            raise ValueError("no jobs to synthesize")
        if init_images is not None:
            want = (n, self.param.channels, self.param.size, self.param.size)
            if tuple(init_images.shape) != want:
                raise ValueError(f"init_images must have shape {want} (one image per job), got {tuple(init_images.shape)}")
        ids = [j.stimulus_id for j in jobs]
        if len(set(ids)) != n:
            dup = next(s for s in ids if ids.count(s) > 1)
            raise ValueError(f"duplicate stimulus_id {dup!r} in jobs")
        dev = self.device
        specs = [resolve_spec(j.objective, self.aliases) for j in jobs]
        keys = sorted({spec_key(s) for s in specs})
        first = {spec_key(s): s for s in specs}
        objectives = [build_objective(first[k], key="objective") for k in keys]
        coupled = any(uses_coupling(first[k]) for k in keys)
        plan = self._plan(jobs, objectives, keys)

        params = torch.stack([self.param.init(torch_generator(derive_seed(int(j.seed), "synthesis", "init"))) for j in jobs]).to(dev)
        if init_images is not None:
            params = params + self.param.encode(init_images.to(dev))
        rule = build_step_rule(self.optimizer, params, self.lr, betas=self.betas)
        for s in self.stoppers:
            s.start(n, dev)
        hist = {k: torch.full((n, self.steps), float("nan"), device=dev) for k in ("loss", "objective", "target_response")}
        steps_run = torch.zeros(n, dtype=torch.long, device=dev)
        active = torch.ones(n, dtype=torch.bool, device=dev)
        all_rows = torch.arange(n, device=dev)
        snapshot = self.images(params, plan, all_rows) if coupled else None
        scale = FP16_LOSS_SCALE if self.precision == "fp16" else 1.0

        def evaluate(rows: torch.Tensor) -> torch.Tensor:
            imgs = self.images(params, plan, rows)
            return self.evaluate_images(imgs, plan, rows, objectives, snapshot)[0]

        with frozen(self.model):
            if self.compile:
                self._forward = torch.compile(self.model)
            bar = progress(range(self.steps), desc=desc, total=self.steps)
            for step in bar:
                rows = all_rows[active]
                if rows.numel() == 0:
                    break
                new_snap = snapshot.clone() if coupled else None
                step_obj = torch.empty(rows.shape[0], device=dev)
                pos = 0
                for c, real in self._chunks(rows):
                    p = params[as_rows(c)].detach().requires_grad_(True)
                    y = self._render(p, plan, c, precondition=True)
                    t = self.transforms(y, plan.uniforms[c, step], plan.background[c])
                    r = self._model(t)
                    obj = self._objective(objectives, plan, c, self._inputs(plan, c, r, y, snapshot))
                    loss_i = -obj
                    for pr in self.priors:
                        pen = pr.penalty(y, plan.background[c])
                        if pen is not None:
                            loss_i = loss_i + pen
                    (loss_i[:real].sum() * scale).backward()
                    g = p.grad[:real]
                    if scale != 1.0:
                        g = torch.nan_to_num(g / scale, nan=0.0, posinf=0.0, neginf=0.0)
                    cr = c[:real]
                    rule.step(cr, g)
                    hist["loss"][cr, step] = loss_i[:real].detach().float()
                    hist["objective"][cr, step] = obj[:real].detach().float()
                    hist["target_response"][cr, step] = r[:real].detach().gather(1, plan.targets[cr].view(-1, 1)).squeeze(1)
                    step_obj[pos : pos + real] = obj[:real].detach().float()
                    pos += real
                    if coupled:
                        new_snap[cr] = y[:real].detach()
                steps_run[rows] += 1
                if coupled:
                    snapshot = new_snap
                stop = torch.zeros(rows.shape[0], dtype=torch.bool, device=dev)
                for s in self.stoppers:
                    stop |= s(step, rows, step_obj, evaluate)
                if bool(stop.any()):
                    active[rows[stop]] = False

            # final images: more projection rounds, quantized as saved, evaluated clean
            final = self.images(params, plan, all_rows, iters=self.display.cfg.final_iters)
            u8 = quantize(final)
            saved = u8.permute(0, 3, 1, 2).float() / 255.0
            snap_final = saved if coupled else None
            obj_final, resp = self.evaluate_images(saved, plan, all_rows, objectives, snap_final)
            self._forward = self.model
        lum, con = image_stats(saved)
        self.display.check(lum.cpu(), con.cpu(), ids)
        seconds = time.perf_counter() - t0
        steps_np = steps_run.cpu().numpy()
        log.info(
            "synthesized %d images in %.1f s (steps: mean %.1f, max %d; final objective mean %.3f)",
            n, seconds, float(steps_np.mean()), int(steps_np.max()), float(obj_final.mean()),
        )
        return SynthesisResult(
            stimulus_id=np.asarray(ids),
            images=u8.cpu().numpy(),
            luminance=lum.cpu().numpy().astype(np.float64),
            contrast=con.cpu().numpy().astype(np.float64),
            objective_value=obj_final.cpu().numpy().astype(np.float64),
            target_response=resp.gather(1, plan.targets.view(-1, 1)).squeeze(1).cpu().numpy().astype(np.float64),
            predicted=resp.cpu().numpy(),
            steps=steps_np,
            history={k: v.cpu().numpy().astype(np.float32) for k, v in hist.items()},
            info={
                "seconds": seconds,
                "device": str(dev),
                "precision": self.precision,
                "batch_size": self.batch_size,
                "optimizer": self.optimizer,
                "lr": self.lr,
                "target_luminance": self.display.luminance,
                "target_contrast": self.display.contrast,
                "background": self.display.background,
            },
        )


def synthesize(
    model: nn.Module,
    jobs: Sequence[Job],
    cfg: SynthesisConfig,
    *,
    context: ObjectiveContext,
    image_size: int,
    channels: int,
    device: torch.device | str = "cpu",
    stoppers: Sequence[Stopper] | None = None,
    init_images: torch.Tensor | None = None,
) -> SynthesisResult:
    """Synthesize one image per job, all jobs in one batched optimization.

    Args:
        model: surrogate ``(B, C, H, W) in [0, 1] -> (B, S)``; used in eval mode with
            frozen parameters (its flags are restored afterwards).
        jobs: what to make (stimulus id, objective spec, target site index, seed).
        cfg: the synthesis config.
        context: natural-set statistics (z-scoring, luminance, contrast, RFs).
        image_size: display size (square) in pixels; channels: 1 (grayscale) or 3 (RGB).
        device: cpu, cuda, cuda:N or a torch.device.
        stoppers: replace the config's stopping rules (e.g. a ValueStopper).
        init_images: optional ``(N, C, H, W)`` starting images in [0, 1], one per job
            (see :meth:`Synthesizer.run`); None starts from noise.

    Returns:
        :class:`SynthesisResult` in job order, images uint8 (N, H, W, C) as they will be
        saved; achieved values and the final objective are measured on those uint8 images.

    Results depend only on the jobs and cfg (see the module docstring on batching).
    """
    syn = Synthesizer.from_config(model, cfg, context=context, image_size=image_size, channels=channels, device=device, stoppers=stoppers)
    return syn.run(jobs, init_images=init_images)
