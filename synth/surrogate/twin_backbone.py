"""Another session's digital twins as a frozen backbone (``cowley_twins``).

The Cowley et al. (2023) data ship one compact CNN per neuron of two sessions. The twins
of *other* sessions are other neurons' models, fair to use like any pretrained network:
the hidden layers of every twin of those sessions, concatenated, are a feature space
fitted to V4 (the twins' own one-neuron readouts are dropped). A per-site readout on top
of them makes a surrogate of the evaluated session's sites. The evaluated session's own
twins are its follow-up recorder and are never part of its surrogate (``synth run``
refuses them; see :func:`synth.pipeline.resolve_twin_backbone`).

Measured on the two sessions with twins (docs/cowley2023.md, "Other sessions' twins as a
frozen backbone"): averaged with the shipped core ensemble, held-out median r +0.04 and
+0.01, and about twice the noise-free stretch gain, at 70-200 times the synthesis cost
per image and step (the twins run at full resolution): a path for a GPU.

Layers (``layer``): ``out`` (= ``layers2-4``, the default), ``layer2`` ... ``layer4``
(one layer), ``layersA-B`` (layers A to B concatenated); all at 28 x 28.

Every channel is divided by a scale (``feature_scale``, a saved buffer) that the fit sets
to its standard deviation over the training images (:meth:`TwinFeatures.fit_feature_scale`),
so that the readout's L1 penalties weigh the channels alike.

``twins`` (backbone_kwargs) keeps only the listed twins (``"<session>_n<k:03d>"``). The
fit's ``max_twins`` picks them: it fits the readout on every twin, ranks the twins by their
share of the readout's drive (:func:`twin_shares`), keeps the first ``max_twins`` and fits
the readout again on their channels; synthesis then runs only those twins.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from synth.errors import ConfigError, DataError
from synth.surrogate.backbones import BACKBONES, Backbone

log = logging.getLogger(__name__)

#: Layers whose outputs are 28 x 28 (concatenable).
TWIN_LAYERS = (2, 3, 4)
DEFAULT_TWIN_LAYERS = "layers2-4"
#: Images per block of :class:`TwinFeatures` on a CPU (measured in its docstring).
CPU_BLOCK = 8


def parse_twin_layers(layer: str | None) -> tuple[int, ...]:
    """``out`` / ``layerK`` / ``layersA-B`` -> the twin layer indices.

    Raises:
        ConfigError: another name (the message lists the valid ones).
    """
    name = DEFAULT_TWIN_LAYERS if layer in (None, "out") else str(layer)
    m = re.fullmatch(r"layer(\d)", name) or re.fullmatch(r"layers(\d)-(\d)", name)
    if m:
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.lastindex == 2 else lo
        if TWIN_LAYERS[0] <= lo <= hi <= TWIN_LAYERS[-1]:
            return tuple(range(lo, hi + 1))
    raise ConfigError(
        f"unknown layer '{layer}' for backbone cowley_twins; expected out, layer2, layer3, layer4 or layersA-B with 2 <= A <= B <= 4",
        key="layers",
    )


class TwinFeatures(nn.Module):
    """Hidden layers of several digital twins, concatenated and scaled per channel.

    Args:
        states: compact-model state dicts (one per twin).
        layers: twin layer indices to concatenate (from ``TWIN_LAYERS``).
        ids: one name per twin (default ``twin0``, ``twin1``...).
        block: images per block (default: 8 on CPU, where small blocks keep the
            full-resolution layer-0 maps of every twin near the cache: 2.5-3 times faster
            forward than 64 images at once, and 1.7 times faster forward and backward
            than 16; the whole batch on a GPU).

    Shape:
        - Input: ``(N, 3, 112, 112)``, the twins' input (0..255 minus channel means).
        - Output: ``(N, C, 28, 28)``, C = the twins' channels in ``layers``, summed.
    """

    def __init__(self, states: Sequence[dict[str, torch.Tensor]], layers: Sequence[int], ids: Sequence[str] | None = None, block: int | None = None) -> None:
        super().__init__()
        if block is not None and block < 1:
            raise ValueError(f"block must be >= 1 image, got {block}")
        self.block = block
        from synth.populations.twins import FoldedTwin, channel_counts

        if not states:
            raise ValueError("TwinFeatures needs at least one twin")
        self.ids = tuple(str(i) for i in ids) if ids is not None else tuple(f"twin{i}" for i in range(len(states)))
        if len(self.ids) != len(states):
            raise ValueError(f"{len(self.ids)} ids for {len(states)} twins")
        self.layers = tuple(int(i) for i in layers)
        counts = [sum(channel_counts(s)[i] for i in self.layers) for s in states]
        edges = np.cumsum([0, *counts])
        #: channel range [start, stop) of each twin in the output
        self.channel_ranges = tuple((int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]))
        # Twin weights are non-persistent: rebuilt from the data files, never copied into
        # saved surrogates (they are the data set's, GPL-3.0).
        self.twins = nn.ModuleList([FoldedTwin(s, torch.float32) for s in states])
        for t in self.twins:
            for name, buf in list(t.named_buffers(recurse=False)):
                t.register_buffer(name, buf, persistent=False)
        self.register_buffer("feature_scale", torch.ones(int(edges[-1])))

    @property
    def n_channels(self) -> int:
        return int(self.feature_scale.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected the twins' input (N, 3, H, W), got shape {tuple(x.shape)}")
        block = self.block or (CPU_BLOCK if x.device.type == "cpu" else x.shape[0])
        if x.shape[0] > block:
            return torch.cat([self._features(b) for b in x.split(block)])
        return self._features(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        from synth.populations.twins import pad_input

        xp = pad_input(x)  # channels-last on a CPU: forward 1.3x faster here (docs/cowley2023.md)
        upto = max(self.layers)
        parts = []
        for twin in self.twins:
            parts.extend(h for i, h in enumerate(twin.hidden(xp, upto)) if i in self.layers)
        f = torch.cat(parts, dim=1)
        return f / self.feature_scale.to(f.dtype).view(1, -1, 1, 1)

    @torch.no_grad()
    def fit_feature_scale(self, features: torch.Tensor, *, floor: float = 1e-3) -> torch.Tensor:
        """Set ``feature_scale`` so that ``features`` (computed with the current scale)
        have unit standard deviation per channel (``floor`` keeps silent channels finite).

        Args:
            features: ``(N, C, H, W)`` outputs of this module on the training images.

        Returns:
            The factor ``(C,)`` by which the given features must be divided to match.
        """
        if features.ndim != 4 or features.shape[1] != self.n_channels:
            raise ValueError(f"expected features (N, {self.n_channels}, H, W), got shape {tuple(features.shape)}")
        sd = features.float().std(dim=(0, 2, 3)).to(self.feature_scale.device) + floor
        self.feature_scale.mul_(sd)
        return sd.to(features.device)


def twin_shares(readout: nn.Module, features: torch.Tensor, channel_ranges: Sequence[tuple[int, int]], *, chunk: int = 64) -> np.ndarray:
    """Each twin's share of a factorized readout's drive, averaged over sites.

    A site's drive is ``sum_c weight[s, c] * <mask_s, x_c>``; channel c's part of it varies
    over the images with standard deviation ``|weight[s, c]| * std_n <mask_s, x_c>``. These
    are normalized to sum to 1 per site, summed over each twin's channels and averaged
    over the sites.

    Args:
        readout: a :class:`~synth.surrogate.readouts.FactorizedReadout` (``mask``, ``weight``).
        features: ``(N, C, H, W)`` the readout's inputs (e.g. the training images' features).
        channel_ranges: ``[start, stop)`` of each twin's channels (``TwinFeatures.channel_ranges``).
        chunk: images per step (memory).

    Returns:
        ``(T,)`` shares, summing to 1 (to rounding).

    Example:
        >>> order = np.argsort(-twin_shares(model.readout, f_train, backbone.body.channel_ranges))
    """
    if not (hasattr(readout, "effective_mask") and hasattr(readout, "weight")):
        raise ValueError(f"twin_shares needs a factorized readout (mask x channel weights), got {type(readout).__name__}")
    n, c, h, w = features.shape
    if (c, h, w) != tuple(readout.in_shape):
        raise ValueError(f"expected features {tuple(readout.in_shape)}, got {(c, h, w)}")
    if not channel_ranges or channel_ranges[-1][1] != c:
        raise ValueError(f"channel ranges must cover the {c} channels")
    with torch.no_grad():
        m = readout.effective_mask().reshape(readout.n_sites, h * w).t().float()  # (HW, S)
        pooled = torch.cat([
            torch.matmul(features[i : i + chunk].reshape(-1, c, h * w).to(m.device, torch.float32), m)
            for i in range(0, n, chunk)
        ])  # (N, C, S)
        drive = pooled.std(dim=0) * readout.weight.detach().float().abs().t()  # (C, S)
        drive = drive / drive.sum(dim=0, keepdim=True).clamp_min(1e-12)
        per_twin = torch.stack([drive[a:b].sum(dim=0) for a, b in channel_ranges])  # (T, S)
    return per_twin.mean(dim=1).cpu().double().numpy()


@BACKBONES.register("cowley_twins")
def build_cowley_twins(
    *,
    weights: str = "none",
    layer: str | None = None,
    in_channels: int = 3,
    input_size: int | None = None,
    root: str = "",
    sessions: Sequence[str] = (),
    twins: Sequence[str] = (),
) -> Backbone:
    """Hidden layers of the digital twins of ``sessions`` under the Cowley 2023 data ``root``.

    Args:
        weights: must be ``none`` (the twins' own files are the weights).
        layer: ``out`` (layers 2-4), ``layerK`` or ``layersA-B``.
        in_channels: channels of the images (1 is replicated to RGB).
        input_size: ignored (the twins see 112 x 112 images).
        root: the data root (``synth run`` fills ``auto`` with target.root).
        sessions: sessions whose twins make the backbone (``synth run`` fills ``auto`` with
            every session with twins except the evaluated one).
        twins: keep only these twins of ``sessions`` (``"<session>_n<k:03d>"``; empty: all);
            the fit's ``max_twins`` fills it.

    Raises:
        ConfigError: root/sessions unset, weights given, a twin not of ``sessions``.
        DataError: a session without twin files under root.
    """
    from synth.data import cowley
    from synth.populations.twins import CHANNEL_MEANS, TWIN_SIZE, read_twin_state

    if str(weights).strip().lower() != "none":
        raise ConfigError(f"backbone cowley_twins takes its weights from the data root's twin files; expected weights: none, got {weights}", key="weights")
    if not root or str(root) == "auto" or isinstance(sessions, str) or not sessions:
        raise ConfigError(
            "backbone cowley_twins needs backbone_kwargs root (the Cowley 2023 data root) and sessions (a list of session ids); "
            "`synth run` fills root: auto and sessions: auto from the target",
            key="backbone_kwargs",
        )
    if isinstance(twins, str):
        raise ConfigError(f"expected a list of twin ids such as {cowley.site_id('201025', 7)}, got {twins!r}", key="backbone_kwargs.twins")
    layers = parse_twin_layers(layer)
    files: dict[str, Path] = {}
    for s in sessions:
        found = cowley.twin_files(root, str(s))
        if not found:
            have = cowley.twin_sessions(root) if os.path.isdir(root) else []
            raise DataError(f"{Path(root) / cowley.MODELS_DIR}: no digital twins of session {s} (sessions with twins: {', '.join(have) or 'none'})")
        files.update((cowley.site_id(str(s), k), p) for k, p in found.items())
    wanted = [str(t) for t in twins]
    unknown = [t for t in wanted if t not in files]
    if unknown:
        raise ConfigError(
            f"twin {unknown[0]} is not a twin of session(s) {', '.join(map(str, sessions))} under {root} (expected ids such as {next(iter(files))})",
            key="backbone_kwargs.twins",
        )
    keep = [t for t in files if not wanted or t in wanted]
    body = TwinFeatures([read_twin_state(files[t]) for t in keep], layers, ids=keep)
    log.info("cowley_twins backbone: %d twins of session(s) %s, layers %s, %d channels", len(keep), ", ".join(map(str, sessions)), layers, body.n_channels)
    if input_size not in (None, 0, TWIN_SIZE):
        log.info("cowley_twins: input_size %s ignored (the twins see %d x %d images)", input_size, TWIN_SIZE, TWIN_SIZE)
    return Backbone(
        body,
        name="cowley_twins",
        layer=layer or "out",
        weights="none",
        model_channels=3,
        mean=[m / 255.0 for m in CHANNEL_MEANS],
        std=[1 / 255.0] * 3,
        input_size=TWIN_SIZE,
        build={"name": "cowley_twins", "kwargs": {"root": str(root), "sessions": [str(s) for s in sessions], **({"twins": keep} if wanted else {})}},
    )
