"""Real V4 sessions (Cowley et al. 2023) with per-neuron "digital twins" as follow-up recorder.

The compact models published with the data (one small CNN per recorded neuron of
sessions 190923 and 201025) stand in for the follow-up recording: each is calibrated to
its neuron with a linear fit on the session's natural images, and ``record`` draws
spike counts around the calibrated rate (Poisson, or with the trial spread measured on
recorded single trials: ``synth.populations.trialnoise``).

Rule: a session's own twins are only its follow-up recorder; they are never used to fit
or select its surrogate (the surrogate sees only the recorded natural responses).

Twin architecture (input N x 3 x 112 x 112, RGB 0..255 minus the channel means
116.222, 109.270, 100.381)::

    layer 0     5x5 conv ('same', bias) -> BatchNorm -> ReLU                 112 x 112
    layers 1-2  pad (l1, r3, t1, b3) -> 5x5 depthwise stride 2 -> 1x1 conv (bias)
                -> BatchNorm -> ReLU                                          56, 28
    layers 3-4  5x5 depthwise ('same') -> 1x1 conv (bias) -> BatchNorm -> ReLU  28
    readout     permute to N x H x W x C -> flatten -> linear (1 unit)

BatchNorm is in inference mode. The models were trained in Keras (BatchNorm epsilon
1e-3), but the published torch files already carry that epsilon inside
``running_var`` (every one of the 14,535 stored variances is >= 1.0e-3, with the density
piling up just above 1.0e-3, as ``var + 1e-3`` would), and the authors' own PyTorch class
uses torch's default epsilon 1e-5. So ``BN_EPS = 1e-5`` here: on session 201025 it gives
a median r of 0.708 with the recorded responses (79 of 89 twins better) against 0.693
with 1e-3, which would count the Keras epsilon twice. ``bn_eps`` can be set. ``CompactTwin`` is this
architecture as written (it loads the published state dicts); ``TwinEnsemble`` computes
all twins of a session with BatchNorm folded into the convolutions, channels-last
memory and small image blocks (the 112 x 112 layer-0 maps then stay in cache), which is
several times faster on a CPU and agrees with ``CompactTwin`` to rounding.

Twin ``compact_model_<session>_neuron<k>.pt`` models row ``k`` (0-based) of the
session's response arrays, i.e. site ``"<session>_n<k:03d>"`` (checked on the data: the
0-based assignment gives the high correlations, see ``tests/populations/test_twins.py``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from synth.data import cowley
from synth.data.recordings import Recording
from synth.errors import ConfigError, DataError
from synth.populations.base import TARGETS, NaturalData
from synth.populations.trialnoise import FanoTable, draw_counts, measure_fano
from synth.runtime import array_sha256, derive_seed, file_sha256, progress

log = logging.getLogger(__name__)

#: Per-channel RGB means subtracted from 0..255 pixel values.
CHANNEL_MEANS = (116.222, 109.270, 100.381)
#: BatchNorm epsilon for the published torch files (Keras' 1e-3 is already in running_var;
#: see the module docstring).
BN_EPS = 1e-5
#: Keras' default BatchNormalization epsilon (what the models were trained with).
KERAS_BN_EPS = 1e-3
#: Input side length of the twins.
TWIN_SIZE = 112
#: Trial-noise models of ``TwinRecorder.record`` (``followup_noise``).
NOISES = ("poisson", "measured", "none")
#: Bump when the twin computation changes (invalidates cached twin outputs).
IMPL_VERSION = 2
_N_LAYERS = 5
#: Twin evaluations (images x twins) from which ``TwinRecorder.expected`` caches outputs.
_CACHE_MIN = 20000


def cache_dir() -> Path:
    """Cache folder for derived data: ``$SYNTH_CACHE_DIR`` or ``~/.cache/synth``."""
    return Path(os.environ.get("SYNTH_CACHE_DIR") or Path.home() / ".cache" / "synth")


# --------------------------------------------------------------------------- models


def channel_counts(state: dict[str, torch.Tensor]) -> list[int]:
    """Filters per layer (5 ints) read from a compact-model state dict."""
    counts = [int(state["layers.layer0_conv.weight"].shape[0])]
    counts += [int(state[f"layers.layer{i}_conv_point.weight"].shape[0]) for i in range(1, _N_LAYERS)]
    return counts


class CompactTwin(nn.Module):
    """One compact model, written as published (the reference implementation).

    Args:
        nums_filters: filters of layers 0..4 (``channel_counts(state)``).
        bn_eps: BatchNorm epsilon (see ``BN_EPS``).

    Shape:
        input: (N, 3, 112, 112) pixel values 0..255 minus ``CHANNEL_MEANS``.
        output: (N,)
    """

    def __init__(self, nums_filters: Sequence[int], *, bn_eps: float = BN_EPS):
        super().__init__()
        c = [int(n) for n in nums_filters]
        if len(c) != _N_LAYERS:
            raise ValueError(f"expected {_N_LAYERS} filter counts, got {c}")
        layers: dict[str, nn.Module] = {
            "layer0_conv": nn.Conv2d(3, c[0], 5, padding=2, bias=True),
            "layer0_bn": nn.BatchNorm2d(c[0], eps=bn_eps),
        }
        for i in range(1, _N_LAYERS):
            stride, pad = (2, 0) if i <= 2 else (1, 2)
            layers[f"layer{i}_conv_depth"] = nn.Conv2d(c[i - 1], c[i - 1], 5, stride=stride, padding=pad, groups=c[i - 1], bias=False)
            layers[f"layer{i}_conv_point"] = nn.Conv2d(c[i - 1], c[i], 1, bias=True)
            layers[f"layer{i}_bn"] = nn.BatchNorm2d(c[i], eps=bn_eps)
        layers["Beta"] = nn.Linear(c[-1] * 28 * 28, 1)
        self.layers = nn.ModuleDict(layers)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.layers
        h = F.relu(L["layer0_bn"](L["layer0_conv"](x)))
        for i in range(1, _N_LAYERS):
            if i <= 2:
                h = F.pad(h, (1, 3, 1, 3))  # left, right, top, bottom (Keras 'same', stride 2)
            h = F.relu(L[f"layer{i}_bn"](L[f"layer{i}_conv_point"](L[f"layer{i}_conv_depth"](h))))
        h = h.permute(0, 2, 3, 1).flatten(1)
        return L["Beta"](h)[:, 0]


def read_twin_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a compact-model state dict; DataError naming the file if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # RuntimeError, pickle errors, EOFError, zip errors...
        raise DataError(f"{path}: not a readable torch state dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a state dict, got {type(state).__name__}")
    need = ["layers.layer0_conv.weight", "layers.layer0_conv.bias", "layers.Beta.weight", "layers.Beta.bias"]
    for i in range(_N_LAYERS):
        need += [f"layers.layer{i}_bn.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        if i:
            need += [f"layers.layer{i}_conv_depth.weight", f"layers.layer{i}_conv_point.weight", f"layers.layer{i}_conv_point.bias"]
    missing = [k for k in need if k not in state]
    if missing:
        raise DataError(f"{path}: not a compact-model state dict (missing {missing[0]})")
    return state


def compact_twin(state: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float64, bn_eps: float = BN_EPS) -> CompactTwin:
    """A ``CompactTwin`` holding ``state`` (strict key match)."""
    m = CompactTwin(channel_counts(state), bn_eps=bn_eps).to(torch.float64)  # load at full precision
    m.load_state_dict(state, strict=True)
    return m.to(dtype).eval()


class FoldedTwin(nn.Module):
    """One twin with BatchNorm folded into the preceding convolution (inference only)."""

    def __init__(self, state: dict[str, torch.Tensor], dtype: torch.dtype, bn_eps: float = BN_EPS):
        super().__init__()
        s = {k: v.detach().to(torch.float64) for k, v in state.items()}
        for i in range(_N_LAYERS):
            g, b = s[f"layers.layer{i}_bn.weight"], s[f"layers.layer{i}_bn.bias"]
            m, v = s[f"layers.layer{i}_bn.running_mean"], s[f"layers.layer{i}_bn.running_var"]
            scale = g / torch.sqrt(v + bn_eps)
            conv = "layer0_conv" if i == 0 else f"layer{i}_conv_point"
            w, bias = s[f"layers.{conv}.weight"], s[f"layers.{conv}.bias"]
            self.register_buffer(f"w{i}", (w * scale.view(-1, 1, 1, 1)).to(dtype))
            self.register_buffer(f"b{i}", ((bias - m) * scale + b).to(dtype))
            if i:
                self.register_buffer(f"d{i}", s[f"layers.layer{i}_conv_depth.weight"].to(dtype))
        c4 = int(s["layers.layer4_conv_point.weight"].shape[0])
        beta = s["layers.Beta.weight"].reshape(28, 28, c4).permute(2, 0, 1)  # NHWC flatten order -> (C, H, W)
        self.register_buffer("beta", beta.contiguous().to(dtype))
        self.register_buffer("beta_b", s["layers.Beta.bias"].reshape(()).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw output of the twin.

        Shape:
            x: (N, 3, 119, 119): the preprocessed input padded by (3, 4, 3, 4)
                (``pad_input``), so that layer 0 is computed directly on the padded
                grid that the first stride-2 depthwise convolution reads (positions
                -1 .. 113, no copy of the layer-0 maps for padding); the border
                positions are then zeroed, as the (1, 3, 1, 3) zero padding would be.
            returns: (N,)
        """
        for h in self.hidden(x, _N_LAYERS - 1):
            pass  # each layer's maps are freed as the next one is computed
        return self.head(h)

    def head(self, h4: torch.Tensor) -> torch.Tensor:
        """The twin's output from its layer-4 maps ``(N, C4, 28, 28)``: ``(N,)``."""
        return (h4 * self.beta).sum(dim=(1, 2, 3)) + self.beta_b

    def hidden(self, x: torch.Tensor, upto: int) -> Iterator[torch.Tensor]:
        """The twin's layer outputs 0 .. ``upto`` (after the ReLU), one at a time.

        Shape:
            x: as for ``forward``.
            returns: layer 0 ``(N, C0, 115, 115)`` (border zeroed), layer 1 ``(N, C1, 56, 56)``,
                layers 2-4 ``(N, Ci, 28, 28)``.
        """
        if not 0 <= upto < _N_LAYERS:
            raise ValueError(f"upto must be in 0..{_N_LAYERS - 1}, got {upto}")
        h = F.conv2d(x, self.w0, self.b0)  # (N, C0, 115, 115): positions -1 .. 113
        # zero the border before the ReLU (relu(0) = 0), which keeps autograd valid
        h[:, :, 0].zero_()
        h[:, :, -2:].zero_()
        h[:, :, :, 0].zero_()
        h[:, :, :, -2:].zero_()
        h = h.relu_()
        yield h
        for i in range(1, upto + 1):
            d = getattr(self, f"d{i}")
            if i == 1:
                h = F.conv2d(h, d, stride=2, groups=d.shape[0])
            elif i == 2:
                h = F.conv2d(F.pad(h, (1, 3, 1, 3)), d, stride=2, groups=d.shape[0])
            else:
                h = F.conv2d(h, d, padding=2, groups=d.shape[0])
            h = _pointwise(h, getattr(self, f"w{i}"), getattr(self, f"b{i}")).relu_()
            yield h


def pad_input(x: torch.Tensor) -> torch.Tensor:
    """Pad the preprocessed input for ``FoldedTwin`` (3 left/top, 4 right/bottom); on a CPU
    in fp32 laid out channels-last, where the twins' layers run faster (slices of it along
    the images keep the layout)."""
    x = F.pad(x, (3, 4, 3, 4))
    if x.device.type == "cpu" and x.dtype == torch.float32:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _pointwise(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1x1 convolution as a matrix product over channels (fast in channels-last layout)."""
    if h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous():
        y = F.linear(h.permute(0, 2, 3, 1), w.flatten(1), b)  # (N, H, W, O), no copy
        return y.permute(0, 3, 1, 2)  # channels-last NCHW view
    return F.conv2d(h, w, b)


def preprocess(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[0, 1] images -> the twins' input: 112 x 112 RGB, 0..255 minus channel means.

    Grayscale (C = 1) is replicated to 3 channels; other sizes are resized (bilinear,
    antialiased).

    Shape:
        images: (N, C, H, W), C in {1, 3}.
        returns: (N, 3, 112, 112) in ``dtype``.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"twins need images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.to(dtype)
    if x.shape[-2:] != (TWIN_SIZE, TWIN_SIZE):
        x = F.interpolate(x, size=(TWIN_SIZE, TWIN_SIZE), mode="bilinear", align_corners=False, antialias=True)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    means = torch.tensor(CHANNEL_MEANS, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    return x * 255.0 - means


class TwinEnsemble(nn.Module):
    """All digital twins of a session, computed together.

    Args:
        states: compact-model state dicts, one per twin (output column order).
        site_ids: (T,) site id of each twin.
        dtype: compute dtype (float32 default; float64 reproduces the published weights'
            precision).
        block: images per block (default: 2 on CPU, where small blocks keep the layer-0
            maps in cache; 256 on CUDA).
        files: the weight files (for provenance).
        weights_sha256: SHA-256 of the weight files (for cache keys).
        bn_eps: BatchNorm epsilon (see ``BN_EPS``).

    Shape:
        input: (N, C, H, W) float in [0, 1], C = 1 or 3, any size (resized to 112).
        output: (N, T) raw (uncalibrated) twin outputs, in ``dtype``.
    """

    def __init__(self, states: Sequence[dict[str, torch.Tensor]], site_ids: Sequence[str], *, dtype: torch.dtype = torch.float32, block: int | None = None, files: Sequence[str] = (), weights_sha256: Sequence[str] = (), bn_eps: float = BN_EPS):
        super().__init__()
        if len(states) != len(site_ids):
            raise ValueError(f"{len(states)} twins but {len(site_ids)} site ids")
        self.twins = nn.ModuleList([FoldedTwin(s, dtype, bn_eps) for s in states])
        self.bn_eps = float(bn_eps)
        self.site_ids = np.asarray(site_ids).astype(str)
        self.dtype = dtype
        self.block = block
        self.files = [str(f) for f in files]
        self.weights_sha256 = list(weights_sha256)
        self.eval()

    @property
    def n_twins(self) -> int:
        return len(self.twins)

    def _device(self) -> torch.device:
        return self.twins[0].w0.device if self.n_twins else torch.device("cpu")

    def _input_blocks(self, images: torch.Tensor, desc: str) -> Iterator[tuple[slice, torch.Tensor]]:
        """The twins' padded input in blocks of images (``block``; a progress bar for large jobs)."""
        dev = self._device()
        x = pad_input(preprocess(images.to(dev), self.dtype))
        block = self.block or (2 if dev.type == "cpu" else 256)
        n = x.shape[0]
        starts = range(0, n, block)
        for i in progress(starts, desc=desc, total=len(starts)) if n * self.n_twins >= 20000 else starts:
            yield slice(i, i + block), x[i : i + block]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.empty((images.shape[0], self.n_twins), dtype=self.dtype, device=self._device())
        for rows, xb in self._input_blocks(images, "twins"):
            for t, twin in enumerate(self.twins):
                out[rows, t] = twin(xb)
        return out

    @torch.no_grad()
    def pooled_hidden(self, images: torch.Tensor, layers: Sequence[int], grid: int, *, with_outputs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Every twin's hidden ``layers``, each channel averaged over a ``grid`` x ``grid`` grid.

        Args:
            images: ``(N, C, H, W)`` in [0, 1], as for ``forward``.
            layers: twin layer indices (0-4; ``FoldedTwin.hidden``).
            grid: cells per side (``adaptive_avg_pool2d``).
            with_outputs: also return the twins' outputs (``forward``), computed in the
                same pass through their layers.

        Returns:
            ``(N, K)`` in ``dtype``; columns ordered by twin, layer, channel, cell row, cell
            column (K = the twins' channels in ``layers`` x ``grid`` squared). With
            ``with_outputs``, ``(features, outputs)``, outputs ``(N, T)`` as ``forward``'s.
        """
        layers = sorted({int(i) for i in layers})
        if not layers or not 0 <= layers[0] <= layers[-1] < _N_LAYERS:
            raise ValueError(f"layers must be in 0..{_N_LAYERS - 1}, got {layers}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1 cell, got {grid}")
        upto = _N_LAYERS - 1 if with_outputs else layers[-1]
        out = []
        outputs = torch.empty((images.shape[0], self.n_twins), dtype=self.dtype, device=self._device()) if with_outputs else None
        for rows, xb in self._input_blocks(images, "twin features"):
            parts = []
            for t, twin in enumerate(self.twins):
                for k, h in enumerate(twin.hidden(xb, upto)):
                    if k in layers:
                        parts.append(F.adaptive_avg_pool2d(h, grid).flatten(1))
                if outputs is not None:
                    outputs[rows, t] = twin.head(h)
            out.append(torch.cat(parts, dim=1))
        return (torch.cat(out), outputs) if outputs is not None else torch.cat(out)

    def cache_key(self, images: torch.Tensor) -> str:
        """SHA-256 naming the outputs of these twins on these images (for caching)."""
        import hashlib

        h = hashlib.sha256()
        h.update(f"twins-v{IMPL_VERSION}-{self.dtype}-eps{self.bn_eps!r}".encode())
        for s in self.weights_sha256 or [array_sha256(*(b.detach().cpu().numpy() for b in t.buffers())) for t in self.twins]:
            h.update(s.encode())
        h.update(array_sha256(images.detach().cpu().float().numpy()).encode())
        return h.hexdigest()

    def _cache_path(self, images: torch.Tensor) -> Path:
        return cache_dir() / "twins" / f"{self.cache_key(images)}.npy"

    def read_cached(self, images: torch.Tensor) -> np.ndarray | None:
        """The twins' outputs ``(N, T)`` on ``images`` from ``cache_dir()/twins``; None if absent."""
        path = self._cache_path(images)
        if path.exists():
            try:
                arr = np.load(path, allow_pickle=False)
                if arr.shape == (images.shape[0], self.n_twins):
                    log.info("twin outputs read from cache %s", path)
                    return arr
            except Exception as err:  # a damaged cache file is recomputed
                log.warning("ignoring unreadable cache file %s (%s)", path, err)
        return None

    def write_cached(self, images: torch.Tensor, outputs: np.ndarray) -> None:
        """Store the twins' ``outputs`` on ``images`` where ``read_cached`` finds them (atomic)."""
        path = self._cache_path(images)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, outputs)
            os.replace(tmp, path)
            log.info("twin outputs cached in %s", path)
        except OSError as err:
            log.warning("cannot write twin cache %s (%s)", path, err)

    def outputs_cached(self, images: torch.Tensor, *, cache: bool = True) -> np.ndarray:
        """Twin outputs (N, T) on ``images``, read from / written to ``cache_dir()/twins``."""
        arr = self.read_cached(images) if cache else None
        if arr is None:
            with torch.no_grad():
                arr = self(images).cpu().numpy()
            if cache:
                self.write_cached(images, arr)
        return arr


def load_twins(root: str | os.PathLike, session: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, neurons: Sequence[int] | None = None, block: int | None = None, bn_eps: float = BN_EPS) -> TwinEnsemble:
    """Load the digital twins of a session.

    Args:
        root: Cowley 2023 data root.
        session: session id (twins exist for 190923 and 201025).
        device: where to compute.
        dtype: float32 (default) or float64.
        neurons: neuron indices k to load (default: all files of the session).
        block: images per block (see ``TwinEnsemble``).
        bn_eps: BatchNorm epsilon (see ``BN_EPS``).

    Returns:
        A TwinEnsemble whose column t is neuron ``neurons[t]``, site
        ``"<session>_n<k:03d>"``.

    Raises:
        DataError: no twin files for the session, a requested neuron without a file, an
            unreadable file.
    """
    session = str(session)
    files = cowley.twin_files(root, session)
    if not files:
        have = cowley.twin_sessions(root) if Path(root).is_dir() else []
        raise DataError(
            f"{Path(root) / cowley.MODELS_DIR}: no compact models for session {session} "
            f"(sessions with twins: {', '.join(have) or 'none'})"
        )
    ks = list(files) if neurons is None else [int(k) for k in neurons]
    missing = [k for k in ks if k not in files]
    if missing:
        raise DataError(f"{Path(root) / cowley.MODELS_DIR}: no compact_model_{session}_neuron{missing[0]}.pt")
    states = [read_twin_state(files[k]) for k in ks]
    shas = [file_sha256(files[k]) for k in ks]
    ids = [cowley.site_id(session, k) for k in ks]
    ens = TwinEnsemble(states, ids, dtype=dtype, block=block, files=[str(files[k]) for k in ks], weights_sha256=shas, bn_eps=bn_eps)
    return ens.to(device)


# --------------------------------------------------------------------------- recorder


def fit_linear(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column least-squares line ``y ~ slope * x + intercept``.

    Shape:
        x, y: (N, S).
        returns: slope (S,), intercept (S,). A constant column of ``x`` gets slope 0 and
        the mean of ``y``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must have the same (N, S) shape, got {x.shape} and {y.shape}")
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    var = (xc**2).sum(0)
    cov = (xc * (y - ym)).sum(0)
    slope = np.divide(cov, var, out=np.zeros_like(cov), where=var > 1e-12 * np.maximum(1.0, (x**2).sum(0)))
    return slope, ym - slope * xm


@dataclass
class TwinRecorder:
    """Follow-up recorder made of calibrated digital twins (implements ``Recorder``).

    ``expected(x) = max(0, slope * twin(x) + intercept)`` per site; ``record`` draws
    Poisson counts around it, or counts with the measured variance-to-mean relation
    ``fano`` (``noise="measured"``), or returns it exactly (``noise="none"``). Noise for an
    image depends only on ``(seed, stimulus_id)``.
    """

    ensemble: TwinEnsemble
    slope: np.ndarray
    intercept: np.ndarray
    noise: Literal["poisson", "measured", "none"] = "poisson"
    info: dict[str, Any] = field(default_factory=dict)
    #: stimulus ids of the calibration images and the twins' raw outputs on them (N, S)
    natural_ids: np.ndarray | None = None
    natural_raw: np.ndarray | None = None
    #: the variance-to-mean relation of ``noise="measured"``
    fano: FanoTable | None = None

    def __post_init__(self) -> None:
        self._memo: dict[bytes, np.ndarray] = {}
        if self.natural_raw is not None and self.natural_ids is not None:
            self.natural_raw = np.asarray(self.natural_raw, dtype=np.float64)
            self.natural_ids = np.asarray(self.natural_ids).astype(str)
        self.site_ids = self.ensemble.site_ids.copy()
        self.areas = np.array([cowley.AREA] * self.site_ids.size)
        self.slope = np.asarray(self.slope, dtype=np.float64)
        self.intercept = np.asarray(self.intercept, dtype=np.float64)
        if self.noise not in NOISES:
            raise ConfigError(f"expected one of {', '.join(NOISES)}, got {self.noise!r}", key="followup_noise")
        if (self.noise == "measured") != (self.fano is not None):
            raise ValueError("noise='measured' needs a Fano table (fano=...), and only it takes one")

    def noise_info(self) -> dict[str, Any]:
        """The trial-noise model of ``record``, for the run's report."""
        return {"model": self.noise, "fano": None if self.fano is None else self.fano.as_dict()}

    @classmethod
    def calibrate(
        cls,
        ensemble: TwinEnsemble,
        images: torch.Tensor,
        recording: Recording,
        *,
        noise: Literal["poisson", "measured", "none"] = "poisson",
        fano: FanoTable | None = None,
        cache: bool = True,
    ) -> "TwinRecorder":
        """Fit each twin's line to its neuron's repeat-averaged responses on ``images``.

        Args:
            ensemble: the twins.
            images: (N, 3, H, W) in [0, 1]: the images the neurons were recorded with.
            recording: responses to them (same stimulus order), containing every twin's
                site id.
            noise: trial noise of ``record``.
            fano: the variance-to-mean relation (``noise="measured"`` only).
            cache: reuse / store twin outputs under ``cache_dir()``.
        """
        rec = recording.select(sites=ensemble.site_ids)
        y = rec.mean().T  # (N, S)
        if y.shape[0] != images.shape[0]:
            raise DataError(f"{images.shape[0]} images but the recording has {y.shape[0]} stimuli")
        raw = ensemble.outputs_cached(images, cache=cache).astype(np.float64)
        slope, intercept = fit_linear(raw, y)
        from synth.validation.metrics import pearson_per_site

        r = pearson_per_site(raw.T, y.T)  # (S, N) rows
        info = {
            "n_images": int(y.shape[0]),
            "median_r": float(np.nanmedian(r)),
            "r": {s: float(v) for s, v in zip(ensemble.site_ids, r)},
            "files": ensemble.files,
        }
        log.info("twins calibrated on %d images: median r with the recording %.3f", y.shape[0], info["median_r"])
        out = cls(ensemble=ensemble, slope=slope, intercept=intercept, noise=noise, info=info, natural_ids=rec.stimulus_id, natural_raw=raw, fano=fano)
        out._memo = dict(zip(_image_hashes(images), raw))
        return out

    def natural_expected(self, stimulus_ids: Sequence[str]) -> np.ndarray:
        """Calibrated responses (clipped at 0) to calibration images, by stimulus id.

        Shape:
            returns: (len(stimulus_ids), S) float64.

        Raises:
            DataError: an id that was not among the calibration images.
        """
        if self.natural_ids is None or self.natural_raw is None:
            raise DataError("these twins were not calibrated on a natural set (no natural_ids)")
        pos = {s: i for i, s in enumerate(self.natural_ids)}
        missing = [str(s) for s in stimulus_ids if str(s) not in pos]
        if missing:
            raise DataError(f"stimulus '{missing[0]}' is not among the {len(pos)} images the twins were calibrated on")
        raw = self.natural_raw[[pos[str(s)] for s in stimulus_ids]]
        return np.maximum(raw * self.slope + self.intercept, 0.0)

    def to(self, device: torch.device | str) -> "TwinRecorder":
        """Compute the twins on ``device`` (they start on the CPU)."""
        self.ensemble.to(device)
        return self

    def expected(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated mean responses, clipped at 0.

        Twins run where the recorder was put (``to``), or on ``images.device`` when that
        is a GPU. Large image sets (e.g. the natural set re-recorded in every run) are
        cached under ``cache_dir()``.

        Shape:
            images: (N, C, H, W) in [0, 1], C = 1 or 3.
            returns: (N, S) float32 on ``images.device``.
        """
        raw, todo, sub, big = self._raw_known(images)
        if todo:
            raw[todo] = self.ensemble.outputs_cached(sub, cache=big).astype(np.float64)
        return self._calibrated(raw, images.device)

    def expected_and_features(self, images: torch.Tensor, layers: Sequence[int], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``expected(images)`` and the twins' pooled hidden layers, in one pass of the twins.

        The outputs that ``expected`` would compute (images neither seen at calibration nor
        in the twins' cache) come from the features' pass through the twins' layers and are
        cached as ``expected`` caches them, so a later ``expected`` on the same images reads
        them.

        Args:
            images: (N, C, H, W) in [0, 1], C = 1 or 3.
            layers, grid: as for ``TwinEnsemble.pooled_hidden``.

        Returns:
            ``(expected, features)``: (N, S) float32 on ``images.device`` and
            ``pooled_hidden``'s (N, K), on the twins' device.
        """
        raw, todo, sub, big = self._raw_known(images)
        known = self.ensemble.read_cached(sub) if todo and big else None
        need = bool(todo) and known is None
        if need:
            feats, outputs = self.ensemble.pooled_hidden(images, layers, grid, with_outputs=True)
            known = outputs[torch.as_tensor(todo, device=outputs.device)].cpu().numpy()
            if big:
                self.ensemble.write_cached(sub, known)
        else:
            feats = self.ensemble.pooled_hidden(images, layers, grid)
        if todo:
            raw[todo] = known.astype(np.float64)
        return self._calibrated(raw, images.device), feats

    def remember(self, images: torch.Tensor, raw: np.ndarray) -> bool:
        """Cache the twins' raw outputs ``raw`` on ``images``, computed in another pass
        through their layers (e.g. a student's teacher maps), where ``expected`` looks for
        them: a later ``expected`` on the same images then runs no twin.

        As ``expected`` caches: only the images not seen at calibration, and only when they
        are many enough; an existing cache entry is kept.

        Args:
            images: (N, C, H, W) in [0, 1], as for ``expected``.
            raw: (N, S) the ensemble's raw (uncalibrated) outputs on them.

        Returns:
            whether a cache entry was written.
        """
        raw = np.asarray(raw)
        if raw.shape != (images.shape[0], self.ensemble.n_twins):
            raise ValueError(f"raw outputs have shape {raw.shape}, want ({images.shape[0]}, {self.ensemble.n_twins})")
        _, todo, sub, big = self._raw_known(images)
        if not todo or not big or self.ensemble._cache_path(sub).exists():
            return False
        dtype = torch.empty(0, dtype=self.ensemble.dtype).numpy().dtype  # what ``forward`` would have cached
        self.ensemble.write_cached(sub, raw[todo].astype(dtype, copy=False))
        return True

    def _raw_known(self, images: torch.Tensor) -> tuple[np.ndarray, list[int], torch.Tensor, bool]:
        """Raw outputs of the images seen at calibration; the rest to compute.

        Returns:
            (raw (N, S) float64 with the known rows filled, the rows to compute, those
            images, whether they are many enough to cache).
        """
        if images.device.type != "cpu" and self.ensemble._device() != images.device:
            self.ensemble.to(images.device)
        raw = np.empty((images.shape[0], self.ensemble.n_twins), dtype=np.float64)
        todo = list(range(images.shape[0]))
        if self._memo:  # images the twins already saw at calibration (e.g. the natural set)
            hashes = _image_hashes(images)
            todo = []
            for i, h in enumerate(hashes):
                row = self._memo.get(h)
                if row is None:
                    todo.append(i)
                else:
                    raw[i] = row
            if len(todo) < images.shape[0]:
                log.info("twins: %d of %d images known from calibration", images.shape[0] - len(todo), images.shape[0])
        sub = images if len(todo) == images.shape[0] else images[torch.as_tensor(todo, dtype=torch.long, device=images.device)]
        return raw, todo, sub, sub.shape[0] * self.ensemble.n_twins >= _CACHE_MIN

    def _calibrated(self, raw: np.ndarray, device: torch.device) -> torch.Tensor:
        out = np.maximum(raw * self.slope + self.intercept, 0.0)
        return torch.as_tensor(out, dtype=torch.float32, device=device)

    def site_model(self, site: int) -> nn.Module:
        """A differentiable model of one calibrated twin: images -> ``slope * twin + intercept``.

        Unclipped (``expected`` clips at 0), so gradients flow everywhere; for synthesis
        against a twin (e.g. a distillation teacher's own stimuli).

        Args:
            site: the twin's column (0 .. S-1).

        Returns:
            module mapping ``(N, C, H, W)`` images in [0, 1] to ``(N, 1)``.
        """
        if not 0 <= int(site) < self.ensemble.n_twins:
            raise IndexError(f"site {site} out of range for {self.ensemble.n_twins} twins")
        return self.population_model([int(site)])

    def population_model(self, sites: Sequence[int] | None = None) -> nn.Module:
        """A differentiable model of calibrated twins together (unclipped, as ``site_model``).

        For objectives over the whole population (one-hot images synthesized on the twins
        themselves: ``synth bench ceiling --objective one_hot``). Each image costs one
        forward and backward pass of every twin.

        Args:
            sites: twin columns, in output order (default: all).

        Returns:
            module mapping ``(N, C, H, W)`` images in [0, 1] to ``(N, len(sites))``.
        """
        sites = list(range(self.ensemble.n_twins)) if sites is None else [int(s) for s in sites]
        bad = [s for s in sites if not 0 <= s < self.ensemble.n_twins]
        if bad or not sites:
            raise IndexError(f"sites {bad or sites} out of range for {self.ensemble.n_twins} twins")
        return _CalibratedTwins([self.ensemble.twins[s] for s in sites], self.slope[sites], self.intercept[sites], self.ensemble.dtype)

    def record(
        self, images: torch.Tensor, stimulus_ids: Sequence[str], *, n_repeats: int, seed: int, expected: torch.Tensor | None = None
    ) -> Recording:
        """Responses with trial noise: a Recording of (S, N, n_repeats) spike counts.

        ``expected``: ``self.expected(images)`` when the caller already has it.
        """
        ids = [str(s) for s in stimulus_ids]
        if len(ids) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(ids)} stimulus ids")
        if n_repeats < 1:
            raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
        mean = (self.expected(images) if expected is None else expected).cpu().numpy().astype(np.float64)  # (N, S)
        if mean.shape != (len(ids), len(self.site_ids)):
            raise ValueError(f"expected responses have shape {mean.shape}, want ({len(ids)}, {len(self.site_ids)})")
        if self.noise == "none":
            resp = np.repeat(mean.T[:, :, None], n_repeats, axis=2)
        else:
            resp = np.empty((mean.shape[1], mean.shape[0], n_repeats))
            for j, sid in enumerate(ids):
                rng = np.random.default_rng(derive_seed(seed, f"twins-{self.noise}", sid))
                resp[:, j, :] = draw_counts(mean[j], n_repeats, rng, self.fano)
        return Recording(stimulus_id=np.array(ids), site_id=self.site_ids, responses=resp, areas=self.areas)


class _CalibratedTwins(nn.Module):
    """Twins with their calibration lines (see ``TwinRecorder.population_model``)."""

    def __init__(self, twins: Sequence[FoldedTwin], slope: np.ndarray, intercept: np.ndarray, dtype: torch.dtype):
        super().__init__()
        self.twins = nn.ModuleList(twins)
        dev = twins[0].w0.device
        self.register_buffer("slope", torch.as_tensor(np.asarray(slope, dtype=np.float64), dtype=dtype, device=dev))
        self.register_buffer("intercept", torch.as_tensor(np.asarray(intercept, dtype=np.float64), dtype=dtype, device=dev))
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dev = self.twins[0].w0.device  # the twins are the recorder's: they move with it
        x = pad_input(preprocess(images.to(dev), self.dtype))
        if len(self.twins) > 1 and torch.is_grad_enabled():
            # one twin's activations at a time (recomputed in the backward pass): the
            # layer-0 maps of every twin would take ~8 MB per image and twin
            from torch.utils.checkpoint import checkpoint

            raw = torch.stack([checkpoint(twin, x, use_reentrant=False) for twin in self.twins], dim=1)
        else:
            raw = torch.stack([twin(x) for twin in self.twins], dim=1)
        return (raw * self.slope.to(dev) + self.intercept.to(dev)).float()


def _image_hashes(images: torch.Tensor) -> list[bytes]:
    """SHA-1 of each image's float32 values (exact-content lookup)."""
    import hashlib

    arr = images.detach().to("cpu", torch.float32).contiguous().numpy()
    return [hashlib.sha1(a.tobytes()).digest() + str(a.shape).encode() for a in arr]


# --------------------------------------------------------------------------- target


def twin_sessions(root: str | os.PathLike) -> list[str]:
    """Sessions under ``root`` that have digital twins."""
    return cowley.twin_sessions(root)


@dataclass
class Cowley2023Target:
    """One recording session of Cowley et al. (2023); digital twins as follow-up recorder.

    ``natural`` returns the session's images and repeat-averaged responses; ``recorder``
    returns the session's twins calibrated on those images (RGB, native 112 px, as
    recorded), whatever display format the experiment uses.
    """

    root: str
    session: str
    image_size: int = cowley.NATIVE_SIZE
    followup: Literal["twins"] = "twins"
    followup_noise: Literal["poisson", "measured", "none"] = "poisson"
    name: str = "cowley2023"

    def __post_init__(self) -> None:
        path = cowley.averaged_path(self.root, self.session)
        if not path.exists():
            raise DataError(f"{path}: response file not found")
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except Exception as err:
            raise DataError(f"{path}: not a readable .npy array ({type(err).__name__}: {err})") from None
        if len(shape) != 2:
            raise DataError(f"{path}: expected (neurons, images) responses, got shape {shape}")
        self.site_ids = cowley.site_ids(self.session, int(shape[0]))
        self.areas = np.array([cowley.AREA] * self.site_ids.size)
        self._recorder: TwinRecorder | None = None

    def natural(self, *, image_size: int | None = None, grayscale: bool = False, seed: int = 0) -> NaturalData:  # noqa: ARG002
        """The session's images at ``image_size`` (default: the target's) and its recording."""
        size = int(image_size or self.image_size)
        ids, x, rec = cowley.load_session(self.root, self.session, image_size=size, grayscale=grayscale)
        files = [cowley.images_path(self.root, self.session), cowley.averaged_path(self.root, self.session)]
        if self.followup_noise == "measured":  # the single trials the follow-up's noise is measured on
            files += [cowley.raw_path(self.root, s) for s in raw_sessions(self.root)]
        info = {
            "dataset": "cowley2023",
            "root": str(self.root),
            "session": self.session,
            "raw_repeats_available": cowley.raw_path(self.root, self.session).exists(),
            "checksums": {str(p): file_sha256(p) for p in files},
        }
        return NaturalData(images=x, recording=rec, stimulus_id=ids, info=info)

    def sessions(self, *, image_size: int, grayscale: bool):  # noqa: ARG002
        """The sessions under this target's root, for a core (:class:`~synth.data.sessions.CowleySessions`)."""
        from synth.data.sessions import CowleySessions

        return CowleySessions(str(self.root))

    def reference_predictions(self, images: torch.Tensor, stimulus_ids: Sequence[str]) -> np.ndarray:  # noqa: ARG002
        """The calibrated twins' responses to natural images, by stimulus id.

        The twins see each image as it was recorded (RGB, 112 px), whatever the display
        format of ``images``; the pipeline reports their median r on the test images as
        ``fit.reference_median_r_test``. The twins only *report*: they never fit or
        select the surrogate.

        Shape:
            returns: (len(stimulus_ids), S) in ``site_ids`` order.
        """
        return self.recorder().natural_expected(stimulus_ids)

    def recorder(self, device: torch.device | str | None = None) -> TwinRecorder:
        """The calibrated digital twins of this session (ConfigError if it has none).

        Args:
            device: where the twins compute, calibration included (None: the CPU when
                first built, else where they already are).
        """
        if self._recorder is not None:
            return self._recorder if device is None else self._recorder.to(device)
        files = cowley.twin_files(self.root, self.session)
        if not files:
            have = twin_sessions(self.root)
            raise ConfigError(
                f"session {self.session} has no digital twins under {Path(self.root) / cowley.MODELS_DIR} "
                f"(sessions with twins: {', '.join(have) or 'none'}); choose one of those for a simulated follow-up",
                key="target.session",
            )
        expected_k = list(range(self.site_ids.size))
        if list(files) != expected_k:
            missing = sorted(set(expected_k) - set(files))
            extra = sorted(set(files) - set(expected_k))
            what = f"no twin for neuron {missing[0]}" if missing else f"twin for neuron {extra[0]} but only {self.site_ids.size} recorded neurons"
            raise DataError(f"{Path(self.root) / cowley.MODELS_DIR}: session {self.session}: {what}")
        ens = load_twins(self.root, self.session, device=device or "cpu")
        _, x, rec = cowley.load_session(self.root, self.session, image_size=cowley.NATIVE_SIZE, grayscale=False)
        fano = measured_fano(self.root) if self.followup_noise == "measured" else None
        self._recorder = TwinRecorder.calibrate(ens, x, rec, noise=self.followup_noise, fano=fano)
        return self._recorder


def raw_sessions(root: str | os.PathLike) -> list[str]:
    """Sessions under ``root`` that publish single-trial responses."""
    return [s for s in cowley.list_sessions(root) if cowley.raw_path(root, s).exists()]


def _no_single_trials(root: str | os.PathLike) -> ConfigError:
    return ConfigError(
        f"followup_noise 'measured' needs a session with single-trial responses under {Path(root) / cowley.RAW_DIR} "
        "(none found); use 'poisson'",
        key="params.followup_noise",
    )


def measured_fano(root: str | os.PathLike, *, min_pairs: int = 50) -> FanoTable:
    """The variance-to-mean relation of every session under ``root`` with single trials, pooled.

    ``min_pairs``: see ``measure_fano``.

    Raises:
        ConfigError: no session under ``root`` has single-trial responses.
    """
    sessions = raw_sessions(root)
    if not sessions:
        raise _no_single_trials(root)
    raws = [cowley.load_raw(root, s) for s in sessions]
    try:
        table = measure_fano(
            [r.responses for r in raws if r is not None],
            min_pairs=min_pairs,
            source=", ".join(f"{s}: {r.n_sites} sites x {r.n_stimuli} images" for s, r in zip(sessions, raws) if r is not None),
        )
    except ValueError as err:
        raise DataError(f"{', '.join(str(cowley.raw_path(root, s)) for s in sessions)}: {err}") from None
    log.info(
        "trial noise measured on %s: Fano factor %s at mean counts %s",
        table.source, ", ".join(f"{f:.2f}" for f in table.fano), ", ".join(f"{m:.2f}" for m in table.mean),
    )
    return table


@TARGETS.register("cowley2023")
def build_cowley2023(
    *,
    root: str,
    session: str,
    image_size: int = cowley.NATIVE_SIZE,
    followup: Literal["twins"] = "twins",
    followup_noise: Literal["poisson", "measured", "none"] = "poisson",
    name: str = "cowley2023",
) -> Cowley2023Target:
    """Builder for ``kind: cowley2023`` (see targets/cowley2023.yaml).

    Args:
        root: data root (the layout of ``synth data fetch cowley2023``).
        session: recording session id, e.g. ``"201025"``.
        image_size: display size of the natural images (native 112).
        followup: follow-up recorder (only ``"twins"``).
        followup_noise: ``"poisson"`` spike counts, ``"measured"`` (counts with the
            variance-to-mean relation of the root's single-trial sessions) or ``"none"``
            (expected responses).
    """
    session = str(session)
    if followup != "twins":
        raise ConfigError(f"expected 'twins', got {followup!r}", key="params.followup")
    if followup_noise not in NOISES:
        raise ConfigError(f"expected one of {', '.join(NOISES)}, got {followup_noise!r}", key="params.followup_noise")
    if int(image_size) < 16:
        raise ConfigError(f"expected an integer >= 16, got {image_size!r}", key="params.image_size")
    if not Path(root).is_dir():
        raise ConfigError(f"data root not found: {root} (get it with `synth data fetch cowley2023 --root {root}`)", key="target.root")
    sessions = cowley.list_sessions(root)
    if session not in sessions:
        from synth.registry import did_you_mean

        raise ConfigError(f"no session '{session}' under {root}{did_you_mean(session, sessions)}; sessions present: {', '.join(sessions) or '(none)'}", key="target.session")
    if followup_noise == "measured" and not raw_sessions(root):
        raise _no_single_trials(root)
    return Cowley2023Target(root=str(root), session=session, image_size=int(image_size), followup=followup, followup_noise=followup_noise, name=name)
