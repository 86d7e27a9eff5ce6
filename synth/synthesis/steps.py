"""Step rules (per-image optimizers) and stopping rules.

Both work row-wise on a tensor holding every image's parameters, so an image that has
stopped is frozen exactly (no momentum drift) and an image's trajectory depends only on
its own gradients: results do not depend on which other images share the batch.

Step rules (``SynthesisConfig.optimizer``):

``adam``  Adam (Kingma & Ba 2015) with per-image bias correction
``sgd``   plain gradient descent
``nsgd``  gradient descent with each image's gradient normalized to unit RMS (a fixed
          step length in parameter space, whatever the objective's scale)

Stopping rules decide after each step which of the active images stop:

:class:`PlateauStopper`   the (smoothed) objective has not improved for ``patience`` steps
:class:`ValueStopper`     the clean-image objective reached a per-image value (benchmarks)
"""

from __future__ import annotations

from typing import Callable

import torch


Rows = "torch.Tensor | slice"


def as_rows(rows: torch.Tensor) -> torch.Tensor | slice:
    """A contiguous ascending index tensor as a slice (views instead of copies), else itself."""
    n = rows.numel()
    if n and int(rows[-1]) - int(rows[0]) + 1 == n and (n == 1 or bool((rows[1:] > rows[:-1]).all())):
        return slice(int(rows[0]), int(rows[0]) + n)
    return rows


class StepRule:
    """Row-wise optimizer over ``params`` (N, ...): ``step(rows, grads)`` lowers the loss.

    Args:
        params: every image's parameters (updated in place).
        lr: step size.
    """

    def __init__(self, params: torch.Tensor, lr: float) -> None:
        self.params = params
        self.lr = float(lr)
        self.t = torch.zeros(params.shape[0], dtype=torch.long, device=params.device)
        self.calls = 0  # step() calls so far: a bound on every row's step count, known without a device sync

    def step(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Update ``params[rows]`` with ``grads`` (len(rows), ...) of the loss."""
        r = as_rows(rows)
        self.t[r] += 1
        self.calls += 1
        d = self._delta(r, grads.to(self.params.dtype))
        if isinstance(r, slice):
            self.params[r].sub_(d)
        else:
            self.params[r] = self.params[r] - d

    def _delta(self, rows: torch.Tensor | slice, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _bshape(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.view((-1,) + (1,) * (ndim - 1))


class Adam(StepRule):
    """Adam with per-row state and bias correction (``betas``, ``eps`` as in torch.optim.Adam)."""

    def __init__(self, params: torch.Tensor, lr: float, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, lr)
        self.b1, self.b2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.m = torch.zeros_like(params)
        self.v = torch.zeros_like(params)
        self._tables: dict[float, torch.Tensor] = {}

    def _correction(self, beta: float, t: torch.Tensor) -> torch.Tensor:
        """``1 - beta**t`` (float64) looked up by step count.

        ``beta ** tensor`` is computed by a vectorized kernel that, on CPU, rounds
        differently with the tensor's length (0.99 ** 30 differs in the last bit between
        16 rows and 11), so an image's update would depend on how many images share its
        chunk; a table of Python floats does not.
        """
        table = self._tables.get(beta)
        need = self.calls + 1
        if table is None or table.shape[0] < need:
            n = max(need, 2 * (0 if table is None else table.shape[0]), 256)
            table = torch.tensor([1.0 - beta**k for k in range(n)], dtype=torch.float64, device=t.device)
            self._tables[beta] = table
        return table[t]

    def _delta(self, rows: torch.Tensor | slice, g: torch.Tensor) -> torch.Tensor:
        view = isinstance(rows, slice)
        m = self.m[rows].mul_(self.b1).add_(g, alpha=1 - self.b1)
        v = self.v[rows].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        if not view:
            self.m[rows], self.v[rows] = m, v
        t = self.t[rows]
        bc1 = _bshape(self._correction(self.b1, t).to(g.dtype), g.ndim)
        bc2 = _bshape(self._correction(self.b2, t).to(g.dtype), g.ndim)
        denom = (v / bc2).sqrt_().add_(self.eps)
        return (m / denom).mul_(self.lr / bc1)


class SGD(StepRule):
    def _delta(self, rows: torch.Tensor | slice, g: torch.Tensor) -> torch.Tensor:
        return self.lr * g


class NormalizedSGD(StepRule):
    def _delta(self, rows: torch.Tensor | slice, g: torch.Tensor) -> torch.Tensor:
        rms = g.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
        return self.lr * g / _bshape(rms, g.ndim)


STEP_RULES = {"adam": Adam, "sgd": SGD, "nsgd": NormalizedSGD}


def build_step_rule(name: str, params: torch.Tensor, lr: float, *, betas: tuple[float, float] | None = None) -> StepRule:
    """A step rule by name (adam, sgd, nsgd); ``betas`` for adam."""
    if name not in STEP_RULES:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(STEP_RULES)}")
    if name == "adam" and betas is not None:
        return Adam(params, lr, betas=betas)
    return STEP_RULES[name](params, lr)


Evaluate = Callable[[torch.Tensor], torch.Tensor]


class Stopper:
    """Decides which active images stop after a step."""

    def start(self, n: int, device: torch.device) -> None:
        """Called once before the first step with the number of images."""

    def __call__(self, step: int, rows: torch.Tensor, objective: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        """Which of ``rows`` stop.

        Args:
            step: the 0-based step just taken.
            rows: (n,) indices of the images that took it.
            objective: (n,) their objective values during the step (under transforms).
            evaluate: ``rows -> (n,)`` clean-image objective of the current images (costs a
                forward pass; use sparingly).

        Returns:
            (n,) bool.
        """
        raise NotImplementedError


class PlateauStopper(Stopper):
    """Stop an image when its EMA-smoothed objective has not improved for ``patience`` steps.

    An improvement counts when it exceeds ``min_delta * (|best| + 1)``.
    """

    def __init__(self, patience: int, min_delta: float, min_steps: int, smoothing: float) -> None:
        self.patience, self.min_delta, self.min_steps, self.smoothing = int(patience), float(min_delta), int(min_steps), float(smoothing)

    def start(self, n: int, device: torch.device) -> None:
        self.ema = torch.full((n,), float("nan"), device=device)
        self.best = torch.full((n,), -float("inf"), device=device)
        self.since = torch.zeros(n, dtype=torch.long, device=device)

    def __call__(self, step: int, rows: torch.Tensor, objective: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        obj = objective.detach().float()
        prev = self.ema[rows]
        ema = torch.where(torch.isnan(prev), obj, self.smoothing * prev + (1 - self.smoothing) * obj)
        self.ema[rows] = ema
        best = self.best[rows]
        better = ema > best + self.min_delta * (best.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0) + 1)
        self.best[rows] = torch.where(better, ema, best)
        self.since[rows] = torch.where(better, torch.zeros_like(self.since[rows]), self.since[rows] + 1)
        if step + 1 < self.min_steps:
            return torch.zeros_like(better)
        return self.since[rows] >= self.patience


class ValueStopper(Stopper):
    """Stop an image once its clean-image objective reaches ``values[i]`` (checked every ``every`` steps).

    After the run, ``reached`` (N,) says which images got there and ``value_at_stop`` holds
    the last clean value checked.
    """

    def __init__(self, values: torch.Tensor, every: int = 4) -> None:
        self.values = torch.as_tensor(values, dtype=torch.float32)
        self.every = int(every)

    def start(self, n: int, device: torch.device) -> None:
        if self.values.shape != (n,):
            raise ValueError(f"ValueStopper needs {n} values, got {tuple(self.values.shape)}")
        self.values = self.values.to(device)
        self.reached = torch.zeros(n, dtype=torch.bool, device=device)
        self.value_at_stop = torch.full((n,), float("nan"), device=device)

    def __call__(self, step: int, rows: torch.Tensor, objective: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        if (step + 1) % self.every:
            return torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        v = evaluate(rows).float()
        done = v >= self.values[rows]
        self.reached[rows] = done
        self.value_at_stop[rows] = v
        return done
