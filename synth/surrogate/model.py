"""The brain-mapped surrogate: backbone features -> per-site readout -> responses.

A :class:`Surrogate` maps images ``(N, C, H, W)`` in ``[0, 1]`` to predicted responses
``(N, S)`` in the recording's units. It is saved as one file holding a spec (backbone
name, weights reference, layer, readout config, site ids, preprocessing) and the full
state_dict, so a later stage rebuilds it without the training data or a download.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from synth.errors import ConfigError, DataError
from synth.surrogate.backbones import Backbone, build_backbone
from synth.surrogate.readouts import Readout, build_readout

log = logging.getLogger(__name__)

FORMAT = "synth.surrogate/1"


def _unit_peak(rf: torch.Tensor) -> torch.Tensor:
    """Scale each non-negative map ``(S, H, W)`` to a peak of 1 (clipped to [0, 1])."""
    return (rf / rf.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)).clamp(0, 1)


class Surrogate(nn.Module):
    """Backbone + readout, predicting every site's response to an image.

    Args:
        backbone: a :class:`~synth.surrogate.backbones.Backbone`.
        readout: a :class:`~synth.surrogate.readouts.Readout` over the backbone's features.
        site_ids: (S,) site ids, in output order.
        image_size: the (square) display size of the images the model was fitted on.
        in_channels: channels of those images (1 = grayscale, 3 = RGB).
        output_scale: (S,) per-site scale of the outputs (responses were fitted in units
            of this scale); None means 1.

    Shape:
        - Input: ``(N, in_channels, image_size, image_size)`` in ``[0, 1]``
          (C = 1 is also accepted by RGB models).
        - Output: ``(N, S)`` >= 0.
    """

    def __init__(
        self,
        backbone: Backbone,
        readout: Readout,
        *,
        site_ids: Sequence[str],
        image_size: int,
        in_channels: int,
        output_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.readout = readout
        self.site_ids = np.asarray(site_ids).astype(str)
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        s = torch.ones(self.site_ids.size) if output_scale is None else torch.as_tensor(output_scale, dtype=torch.float32)
        if s.shape != (self.site_ids.size,):
            raise ValueError(f"output_scale must have shape ({self.site_ids.size},), got {tuple(s.shape)}")
        self.register_buffer("output_scale", s.clone())

    @property
    def n_sites(self) -> int:
        return int(self.site_ids.size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
        if self.backbone.input_size is None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(images.shape[-2:])}")
        return self.readout(self.backbone(images)) * self.output_scale

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features ``(N, C', H', W')``."""
        return self.backbone(images)

    def receptive_fields(self) -> torch.Tensor:
        """Each site's spatial readout mask in image coordinates.

        Returns:
            ``(S, image_size, image_size)`` in [0, 1] (max 1 per site), on the model's device.
        """
        m = self.readout.spatial_masks().float().unsqueeze(1)  # (S, 1, h, w)
        rf = F.interpolate(m, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False).squeeze(1)
        return _unit_peak(rf.clamp_min(0))

    def freeze(self) -> "Surrogate":
        """Eval mode and ``requires_grad=False`` everywhere (gradients still reach inputs)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ persistence
    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this model (plain data)."""
        bb = self.backbone
        return {
            "format": FORMAT,
            "backbone": {
                "name": bb.name,
                "weights": bb.weights,
                "layer": bb.layer,
                "build": bb.build_spec,
                "preprocessing": bb.preprocessing,
            },
            "readout": {**self.readout.config(), "in_shape": list(self.readout.in_shape)},
            "site_ids": [str(s) for s in self.site_ids],
            "image_size": self.image_size,
            "in_channels": self.in_channels,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write spec + state_dict to ``path`` (readable with ``torch.load(weights_only=True)``)."""
        sd = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        torch.save({"spec": self.spec(), "state_dict": sd}, str(path))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "Surrogate":
        """Rebuild the architecture (random weights) from :meth:`spec`."""
        b = spec["backbone"]
        pre = b["preprocessing"]
        build = b["build"]
        backbone = build_backbone(
            build["name"],
            weights="none",
            layer=b["layer"],
            in_channels=int(pre["model_channels"]),
            input_size=int(pre["input_size"] or 0),
            kwargs=build.get("kwargs", {}),
        )
        with torch.no_grad():
            backbone.mean.copy_(torch.tensor(pre["mean"]).view(1, -1, 1, 1))
            backbone.std.copy_(torch.tensor(pre["std"]).view(1, -1, 1, 1))
        backbone.name = str(b["name"])
        backbone.weights = str(b["weights"])
        r = dict(spec["readout"])
        in_shape = tuple(int(v) for v in r.pop("in_shape"))
        readout = build_readout(r, in_shape=in_shape, n_sites=len(spec["site_ids"]))
        return cls(backbone, readout, site_ids=spec["site_ids"], image_size=int(spec["image_size"]), in_channels=int(spec["in_channels"]))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "Surrogate":
        """Load a saved surrogate, frozen and in eval mode, on ``device``.

        Raises:
            DataError: missing, corrupt or foreign file (the message names it).
        """
        path = str(path)
        if not os.path.exists(path):
            raise DataError(f"surrogate file not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise DataError(f"cannot read surrogate file {path}: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}") from None
        if not isinstance(obj, Mapping) or not isinstance(obj.get("spec"), Mapping) or obj["spec"].get("format") != FORMAT:
            raise DataError(f"{path} is not a synth surrogate file (format {FORMAT})")
        try:
            model = cls.from_spec(obj["spec"])
            model.load_state_dict(obj["state_dict"], strict=True)
        except (KeyError, RuntimeError, ValueError, TypeError, ConfigError) as err:
            raise DataError(f"surrogate file {path} is inconsistent: {str(err).splitlines()[0][:200]}") from None
        return model.to(torch.device(device)).freeze()


class SurrogateEnsemble(nn.Module):
    """Several surrogates of the same sites; predicts the mean of their predictions.

    Synthesizing against the mean of differently built surrogates (other cores, input
    sizes, seeds) favours image features they agree on, which transfer better to the
    neurons than one model's idiosyncrasies.

    Args:
        members: surrogates with the same site ids (in the same order) and image size.

    Shape:
        - Input: ``(N, C, H, W)`` in ``[0, 1]`` (as for each member).
        - Output: ``(N, S)``, the members' mean.
    """

    def __init__(self, members: Sequence[Surrogate]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one surrogate")
        first = members[0]
        for i, m in enumerate(members[1:], start=1):
            if list(m.site_ids) != list(first.site_ids):
                raise ValueError(f"ensemble member {i} predicts other sites than member 0")
            if m.image_size != first.image_size:
                raise ValueError(f"ensemble member {i} was fitted on {m.image_size} px images, member 0 on {first.image_size} px")
        self.members = nn.ModuleList(members)
        self.site_ids = first.site_ids
        self.image_size = first.image_size
        self.in_channels = first.in_channels

    @property
    def n_sites(self) -> int:
        return int(self.site_ids.size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.members[0](images)
        for m in self.members[1:]:
            out = out + m(images)
        return out / len(self.members)

    def receptive_fields(self) -> torch.Tensor:
        """The members' mean receptive field per site, ``(S, image_size, image_size)`` in [0, 1]."""
        return _unit_peak(torch.stack([m.receptive_fields() for m in self.members]).mean(0))

    def freeze(self) -> "SurrogateEnsemble":
        """Eval mode and ``requires_grad=False`` everywhere (gradients still reach inputs)."""
        for m in self.members:
            m.freeze()
        return self.eval()
