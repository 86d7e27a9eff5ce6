"""Backbones: image -> feature map at one named layer, preprocessing included.

Every backbone is a :class:`Backbone` (an ``nn.Module``) that takes images
``(N, C, H, W)`` in ``[0, 1]`` (C = 1 is replicated to 3 channels for RGB networks),
optionally resizes them to ``input_size``, normalizes them with the backbone's mean/std,
and returns the activations of one layer ``(N, C', H', W')``.

Backbones are built by registry name (``BACKBONES``):

``small_cnn``        a small convolutional core trained from scratch on the recordings
                     (no download needed; the offline default).
``pretrained_core``  a small core saved by :func:`synth.surrogate.fit.fit_core`
                     (``weights: /path/to/core.pt``), frozen or fine-tuned.
``alexnet``, ``resnet18``, ``resnet50``, ``vgg16``
                     torchvision networks; layers by FX node name (``features.7``) or
                     friendly alias (``conv3``, ``layer2``...).

Weights (``weights``):

- ``"none"``: random initialization (only sensible when the backbone is trained).
- a local checkpoint path (``.pt``/``.pth``): a state_dict of the same torchvision model,
  or a dict holding one under ``"state_dict"``; ImageNet mean/std are used.
- a torchvision weights name (``"IMAGENET1K_V1"``, ``"AlexNet_Weights.IMAGENET1K_V1"``,
  ``"DEFAULT"``): downloaded by torchvision (needs internet; UserError otherwise, never a
  silent fallback to random weights); the weights' own mean/std are used.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from synth.errors import ConfigError, DataError, UserError
from synth.registry import Registry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CKPT_EXTS = (".pt", ".pth", ".ckpt", ".bin", ".tar")

#: name -> builder(*, weights, layer, in_channels, input_size, **kwargs) -> Backbone
BACKBONES: Registry = Registry("backbone")


# --------------------------------------------------------------------------- wrapper
class Backbone(nn.Module):
    """Preprocessing + a feature extractor truncated at one layer.

    Args:
        body: module mapping normalized images ``(N, model_channels, h, w)`` to features.
        name: registry name of the backbone (``"alexnet"``...).
        layer: the layer the features come from (as given by the user).
        weights: the weights reference (for provenance).
        model_channels: channels the body expects (3 for torchvision nets).
        mean, std: per-channel normalization applied after resizing.
        input_size: resize inputs to ``input_size`` x ``input_size`` first (0/None: no resize).
        build: ``{"name": ..., "kwargs": {...}}`` that rebuilds this architecture with
            random weights (used by ``Surrogate.load``, which then loads the state_dict).

    Shape:
        - Input: ``(N, C, H, W)`` in ``[0, 1]``, C = 1 or 3.
        - Output: ``(N, C', H', W')``.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        name: str,
        layer: str,
        weights: str,
        model_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int | None,
        build: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self.layer = layer
        self.weights = weights
        self.model_channels = int(model_channels)
        self.input_size = int(input_size) if input_size else None  # 0 / None: no resize
        self.build_spec = {"name": str(build["name"]), "kwargs": dict(build.get("kwargs", {}))}
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.numel() != self.model_channels or std_t.numel() != self.model_channels:
            raise ValueError(f"mean/std need {self.model_channels} values, got {mean_t.numel()}/{std_t.numel()}")
        # Non-persistent: the preprocessing is part of the spec, not of the state_dict.
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {
            "mean": [float(v) for v in self.mean.flatten()],
            "std": [float(v) for v in self.std.flatten()],
            "input_size": self.input_size,
            "model_channels": self.model_channels,
        }

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Channels, resize and normalization of ``[0, 1]`` images."""
        if x.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
        c = x.shape[1]
        if c != self.model_channels and not (c == 1 or (self.model_channels == 1 and c == 3)):
            raise ValueError(f"backbone {self.name} takes 1 or {self.model_channels} channels, got {c}")
        if self.model_channels == 1 and c == 3:  # RGB into a grayscale core: luminance
            w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
        if self.input_size is not None and (x.shape[-2], x.shape[-1]) != (self.input_size, self.input_size):
            down = x.shape[-1] > self.input_size
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=down)
        if x.shape[1] != self.model_channels:  # grayscale into an RGB network: replicate
            x = x.expand(-1, self.model_channels, -1, -1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(self.preprocess(x))
        if isinstance(out, Mapping):
            out = out["out"]
        return out

    def regularizer(self) -> torch.Tensor:
        """Penalty added to the fitting loss (0 unless the body defines one)."""
        reg = getattr(self.body, "regularizer", None)
        if callable(reg):
            return reg()
        return self.mean.new_zeros(())

    @torch.no_grad()
    def out_shape(self, image_size: int, in_channels: int) -> tuple[int, int, int]:
        """Feature shape ``(C', H', W')`` for square images of ``image_size``."""
        was = self.training
        self.eval()
        p = next(self.parameters(), None)
        dev = p.device if p is not None else self.mean.device
        y = self(torch.zeros(1, in_channels, image_size, image_size, device=dev))
        self.train(was)
        return tuple(int(s) for s in y.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------- helpers
def close_matches(word: str, options: Sequence[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(str(word), list(options), n=n, cutoff=0.4)


def looks_like_path(weights: str) -> bool:
    """True for strings meant as a checkpoint file rather than a weights name."""
    w = str(weights)
    return os.path.exists(w) or "/" in w or os.sep in w or w.lower().endswith(_CKPT_EXTS) or w.startswith("~")


def load_checkpoint_file(path: str, *, what: str) -> Any:
    """``torch.load`` a checkpoint safely; DataError naming the file on any problem."""
    p = os.path.expanduser(str(path))
    if not os.path.exists(p):
        raise DataError(f"weights file not found: {path} (for {what}); expected a .pt/.pth state_dict")
    if os.path.isdir(p):
        raise DataError(f"weights path is a directory: {path} (for {what}); expected a .pt/.pth file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, truncated files...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read weights file {path} (for {what}): {reason[:200]}") from None


def state_dict_from(obj: Any, *, path: str, what: str) -> dict[str, torch.Tensor]:
    """The state_dict in a loaded checkpoint (plain, under 'state_dict', or 'model')."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"weights file {path} (for {what}) holds no state_dict (a mapping of parameter names to tensors)")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], *, path: str, what: str) -> None:
    """Strict load; DataError naming the file and a few mismatching keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} with wrong shape (e.g. {k}: file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})")
        raise DataError(f"weights file {path} does not match {what}: keys {'; '.join(parts)}")
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


# --------------------------------------------------------------------------- torchvision
# Friendly layer aliases -> FX node names (the activation after each conv, pools).
_ALEXNET_ALIASES = {
    "conv1": "features.1", "pool1": "features.2", "conv2": "features.4", "pool2": "features.5",
    "conv3": "features.7", "conv4": "features.9", "conv5": "features.11", "pool5": "features.12",
}
_VGG16_ALIASES: dict[str, str] = {}
_i = 0
for _block, _n in enumerate((2, 2, 3, 3, 3), start=1):
    for _k in range(1, _n + 1):
        _VGG16_ALIASES[f"conv{_block}_{_k}"] = f"features.{_i + 1}"
        _i += 2
    _VGG16_ALIASES[f"pool{_block}"] = f"features.{_i}"
    _i += 1
_RESNET_ALIASES = {"conv1": "relu", "pool1": "maxpool", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}

_TV_NETS: dict[str, dict[str, Any]] = {
    "alexnet": {"aliases": _ALEXNET_ALIASES, "default_layer": "conv3"},
    "vgg16": {"aliases": _VGG16_ALIASES, "default_layer": "conv3_3"},
    "resnet18": {"aliases": _RESNET_ALIASES, "default_layer": "layer2"},
    "resnet50": {"aliases": _RESNET_ALIASES, "default_layer": "layer2"},
}


def default_layer(backbone: str) -> str:
    """The layer used when ``layers`` is not given."""
    if backbone in _TV_NETS:
        return _TV_NETS[backbone]["default_layer"]
    return "out"


def layer_names(backbone: str, **kwargs: Any) -> list[str]:
    """Valid layer names (aliases first, then FX node names) of a backbone."""
    if backbone in _TV_NETS:
        import torchvision
        from torchvision.models.feature_extraction import get_graph_node_names

        model = getattr(torchvision.models, backbone)(weights=None)
        _, nodes = get_graph_node_names(model.eval())
        return list(_TV_NETS[backbone]["aliases"]) + [n for n in nodes if n != "x"]
    if backbone in ("small_cnn",):
        n = int(kwargs.get("n_layers", 4))
        return [f"conv{i}" for i in range(1, n + 1)] + ["out"]
    return ["out"]


def _resolve_tv_node(backbone: str, layer: str, model: nn.Module) -> str:
    from torchvision.models.feature_extraction import get_graph_node_names

    aliases = _TV_NETS[backbone]["aliases"]
    node = aliases.get(layer, layer)
    _, nodes = get_graph_node_names(model)
    nodes = [n for n in nodes if n != "x"]
    if node in nodes or any(n.startswith(node + ".") for n in nodes):
        return node
    valid = list(aliases) + nodes
    hint = close_matches(layer, valid)
    hint_s = f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else ""
    raise ConfigError(
        f"unknown layer '{layer}' for backbone {backbone}{hint_s} valid: {', '.join(aliases)} "
        f"or a node name such as {', '.join(nodes[1:6])} ... ({len(nodes)} nodes)",
        key="layers",
    )


def _tv_weights_enum(backbone: str, weights: str):
    """The torchvision weights enum member for a name; ConfigError when unknown."""
    import torchvision.models as tvm

    enum_cls = tvm.get_model_weights(backbone)
    members = [m.name for m in enum_cls]
    cls_name, _, member = weights.rpartition(".")
    if cls_name and cls_name != enum_cls.__name__:
        raise ConfigError(
            f"weights '{weights}' are not for backbone {backbone}; expected {enum_cls.__name__}.<name> with name one of: "
            f"{', '.join(members)}, or a path to a .pt/.pth file",
            key="weights",
        )
    if member == "DEFAULT":
        return enum_cls.DEFAULT
    if member not in members:
        hint = close_matches(member, members, n=1)
        hint_s = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"unknown weights '{weights}' for backbone {backbone}{hint_s}; expected 'none', one of: "
            f"{', '.join(members)}, DEFAULT, or a path to a .pt/.pth file",
            key="weights",
        )
    return enum_cls[member]


def download_weights(backbone: str, weights: str) -> tuple[dict[str, torch.Tensor], tuple[float, ...], tuple[float, ...]]:
    """Fetch a torchvision weights enum's state_dict (torch hub cache or download).

    Returns:
        (state_dict, mean, std) where mean/std are the weights' own preprocessing.

    Raises:
        ConfigError: unknown weights name.
        UserError: the download failed (no internet?); never falls back to random weights.
    """
    w = _tv_weights_enum(backbone, weights)
    try:
        sd = w.get_state_dict(progress=False, check_hash=True)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(
            f"could not download {weights} for {backbone} (no internet?): {reason}; "
            f"download it elsewhere and pass weights: /path/to/file.pth"
        ) from None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        t = w.transforms()
        mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    except Exception:  # pragma: no cover - transforms without mean/std
        log.warning("weights %s carry no mean/std; using ImageNet's", weights)
    return sd, mean, std


def _torchvision_backbone(backbone: str, *, weights: str, layer: str | None, in_channels: int, input_size: int | None) -> Backbone:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    weights = str(weights)
    layer = layer or default_layer(backbone)
    model = getattr(torchvision.models, backbone)(weights=None)
    what = f"torchvision {backbone}"
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if weights.lower() == "none":
        pass
    elif looks_like_path(weights):
        obj = load_checkpoint_file(weights, what=what)
        load_state_dict_checked(model, state_dict_from(obj, path=weights, what=what), path=weights, what=what)
    else:
        sd, mean, std = download_weights(backbone, weights)
        load_state_dict_checked(model, sd, path=weights, what=what)
    model.eval()
    node = _resolve_tv_node(backbone, layer, model)
    body = create_feature_extractor(model, return_nodes={node: "out"})
    return Backbone(
        body,
        name=backbone,
        layer=layer,
        weights=weights,
        model_channels=3,
        mean=mean,
        std=std,
        input_size=224 if input_size is None else input_size,
        build={"name": backbone, "kwargs": {}},
    )


def _register_tv(name: str) -> None:
    def builder(*, weights: str = "none", layer: str | None = None, in_channels: int = 3, input_size: int | None = None) -> Backbone:
        return _torchvision_backbone(name, weights=weights, layer=layer, in_channels=in_channels, input_size=input_size)

    builder.__name__ = f"build_{name}"
    builder.__doc__ = f"torchvision {name} truncated at ``layer`` (alias or FX node name)."
    BACKBONES.register(name)(builder)


for _name in _TV_NETS:
    _register_tv(_name)


# --------------------------------------------------------------------------- small core
_ACTS: dict[str, Callable[[], nn.Module]] = {"elu": nn.ELU, "relu": nn.ReLU, "silu": nn.SiLU, "softplus": nn.Softplus}


class ConvBlock(nn.Module):
    """conv (no bias) -> BatchNorm -> activation."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, dilation: int = 1, activation: str = "elu"):
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = _ACTS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _laplacian(w: torch.Tensor) -> torch.Tensor:
    """Sum of squared 3x3 Laplacians of conv kernels ``(O, I, k, k)``, / sum of squares."""
    k = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]], device=w.device, dtype=w.dtype)
    flat = w.reshape(-1, 1, w.shape[-2], w.shape[-1])
    lap = F.conv2d(flat, k.view(1, 1, 3, 3), padding=1)
    return lap.pow(2).sum() / flat.pow(2).sum().clamp_min(1e-8)


def _default_downsample(downsample: Sequence[int] | None, n_layers: int, stack: bool) -> list[int]:
    """Given, or stride 2 in the last-but-one layer (layer 3 of 4) unless stacking / < 3 layers."""
    if downsample is not None:
        return [int(d) for d in downsample]
    return [n_layers - 1] if n_layers >= 3 and not stack else []


def _layer_channels(channels: int | Sequence[int] | None, n_layers: int, downsample: Sequence[int]) -> list[int]:
    """Channels per layer: given, one number for all, or 32 then 48 from the first downsampling layer."""
    if channels is None:
        first_down = min([int(d) for d in downsample] or [n_layers + 1])
        return [32 if i + 1 < first_down else 48 for i in range(n_layers)]
    if isinstance(channels, (int, float)):
        return [int(channels)] * n_layers
    return [int(c) for c in channels]


class SmallCNN(nn.Module):
    """A small trainable convolutional core (Klindt et al. 2017 / Lurz et al. 2021 style).

    A first large-kernel conv (stride ``stride``) followed by ``n_layers - 1`` 3x3 convs,
    each with BatchNorm and an activation (SiLU by default). With ``stack=True`` the output concatenates every
    layer's activations (features at several receptive-field sizes).

    Args:
        in_channels: image channels (1 or 3).
        channels: channels per layer (one number, or one per layer); default 32 up to the
            first downsampling layer, 48 from there on (``[32, 32, 48, 48]``).
        n_layers: number of conv layers.
        first_kernel: kernel size of the first layer.
        kernel: kernel size of the later layers.
        stride: stride of the first layer (2 halves the feature map).
        downsample: later layers (numbered from 1) that use stride 2 (default: the
            last-but-one layer when there are >= 3 layers and no ``stack``).
        activation: ``elu``, ``relu``, ``silu`` or ``softplus`` (on CPU, ELU costs ~10x a ReLU/SiLU).
        stack: concatenate all layers' outputs (else only the last).
        smooth: weight of a Laplacian smoothness penalty on the first layer's kernels.
        upto: keep only the first ``upto`` layers (layer choice ``convK``).
        head: channels of a final 1x1 convolution with bias and no activation after the
            last layer (a linear projection, e.g. onto a teacher's feature maps: the
            student cores of ``fit.core.objective: teacher_maps``); None: no head. Only
            the ``out`` layer has it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        *,
        channels: int | Sequence[int] | None = None,
        n_layers: int = 4,
        first_kernel: int = 9,
        kernel: int = 3,
        stride: int = 2,
        downsample: Sequence[int] | None = None,
        activation: str = "silu",
        stack: bool = False,
        smooth: float = 0.0,
        upto: int | None = None,
        head: int | None = None,
    ) -> None:
        super().__init__()
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {', '.join(_ACTS)}, got {activation!r}")
        downsample = _default_downsample(downsample, n_layers, stack)
        chans = _layer_channels(channels, n_layers, downsample)
        if len(chans) != n_layers:
            raise ValueError(f"channels needs {n_layers} values (one per layer), got {len(chans)}")
        if n_layers < 1 or min(chans) < 1 or first_kernel < 1 or kernel < 1 or stride < 1:
            raise ValueError("channels, n_layers, kernels and stride must be >= 1")
        if head is not None and (int(head) < 1 or stack):
            raise ValueError(f"head needs >= 1 channels and no stack, got head {head}, stack {stack}")
        down = {int(d) for d in downsample}
        if any(d < 2 or d > n_layers for d in down):
            raise ValueError(f"downsample lists layers 2..{n_layers} that use stride 2, got {sorted(down)}")
        if stack and down:
            raise ValueError("stack needs all layers at one resolution; it cannot be combined with downsample")
        n = n_layers if upto is None else int(upto)
        blocks = [ConvBlock(in_channels, chans[0], first_kernel, stride=stride, activation=activation)]
        for i in range(1, n):
            blocks.append(ConvBlock(chans[i - 1], chans[i], kernel, stride=2 if (i + 1) in down else 1, activation=activation))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(chans[-1], int(head), 1) if head is not None and n == n_layers else None
        self.stack = bool(stack)
        self.smooth = float(smooth)

    def truncate(self, upto: int) -> None:
        """Keep the first ``upto`` layers (the head only when all of them are kept)."""
        if upto < len(self.blocks):
            self.head = None
        self.blocks = self.blocks[:upto]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for b in self.blocks:
            x = b(x)
            outs.append(x)
        if self.head is not None:
            return self.head(x)
        return torch.cat(outs, dim=1) if self.stack else x

    def regularizer(self) -> torch.Tensor:
        if self.smooth <= 0:
            return self.blocks[0].conv.weight.new_zeros(())
        return self.smooth * _laplacian(self.blocks[0].conv.weight)


_SMALL_CNN_GRAY_MEAN, _SMALL_CNN_GRAY_STD = 0.5, 0.25
#: small_cnn resizes its input to this size unless ``input_size`` says otherwise
SMALL_CNN_INPUT_SIZE = 64


def _small_cnn_layer(layer: str | None, n_layers: int) -> int:
    names = [f"conv{i}" for i in range(1, n_layers + 1)] + ["out"]
    if layer is None or layer == "out":
        return n_layers
    if layer in names:
        return int(layer[4:])
    hint = close_matches(layer, names)
    hint_s = f" (did you mean {', '.join(repr(h) for h in hint)}?)" if hint else ""
    raise ConfigError(f"unknown layer '{layer}' for backbone small_cnn{hint_s}; expected one of: {', '.join(names)}", key="layers")


@BACKBONES.register("small_cnn")
def build_small_cnn(
    *,
    weights: str = "none",
    layer: str | None = None,
    in_channels: int = 1,
    input_size: int | None = None,
    channels: int | Sequence[int] | None = None,
    n_layers: int = 4,
    first_kernel: int = 9,
    kernel: int = 3,
    stride: int = 2,
    downsample: Sequence[int] | None = None,
    activation: str = "silu",
    stack: bool = False,
    smooth: float = 0.0,
    head: int | None = None,
) -> Backbone:
    """A small core trained from scratch (see :class:`SmallCNN`); input resized to 64 px.

    ``weights`` may be a state_dict file of a SmallCNN with the same arguments.
    """
    downsample = _default_downsample(downsample, int(n_layers), bool(stack))
    arch = dict(
        channels=_layer_channels(channels, int(n_layers), downsample),
        n_layers=int(n_layers), first_kernel=int(first_kernel), kernel=int(kernel), stride=int(stride),
        downsample=[int(d) for d in downsample], activation=str(activation), stack=bool(stack), smooth=float(smooth),
    )
    if head is not None:
        arch["head"] = int(head)
    upto = _small_cnn_layer(layer, arch["n_layers"])
    core = SmallCNN(in_channels, **arch)
    weights = str(weights)
    if weights.lower() != "none":
        obj = load_checkpoint_file(weights, what="small_cnn")
        load_state_dict_checked(core, state_dict_from(obj, path=weights, what="small_cnn"), path=weights, what="small_cnn")
    core.truncate(upto)
    size = SMALL_CNN_INPUT_SIZE if input_size is None else input_size
    return Backbone(
        core,
        name="small_cnn",
        layer=layer or "out",
        weights=weights,
        model_channels=in_channels,
        mean=[_SMALL_CNN_GRAY_MEAN] * in_channels,
        std=[_SMALL_CNN_GRAY_STD] * in_channels,
        input_size=size,
        build={"name": "small_cnn", "kwargs": arch},
    )


CORE_FORMAT = "synth.core/1"


@BACKBONES.register("pretrained_core")
def build_pretrained_core(
    *, weights: str = "none", layer: str | None = None, in_channels: int = 1, input_size: int | None = None
) -> Backbone:
    """A small core saved by ``fit_core`` (``weights``: the core file), architecture included."""
    weights = str(weights)
    if weights.lower() == "none":
        raise ConfigError("backbone pretrained_core needs weights: /path/to/core.pt (a core saved by fit_core)", key="weights")
    if weights.strip().lower() == "auto":
        raise ConfigError("weights auto is resolved by `synth run` (the core stage trains or reuses a cached core); elsewhere give a core file", key="weights")
    obj = load_checkpoint_file(weights, what="pretrained_core")
    if not isinstance(obj, Mapping) or obj.get("format") != CORE_FORMAT:
        raise DataError(f"weights file {weights} is not a synth core checkpoint (format {CORE_FORMAT}); save one with synth.surrogate.fit.save_core")
    arch = dict(obj["arch"])
    core_channels = int(obj.get("in_channels", in_channels))
    n_layers = int(arch["n_layers"])
    upto = _small_cnn_layer(layer, n_layers)
    size = obj.get("input_size") if input_size is None else input_size
    core = SmallCNN(core_channels, **arch)
    load_state_dict_checked(core, state_dict_from(obj, path=weights, what="pretrained_core"), path=weights, what="the saved core")
    core.truncate(upto)
    return Backbone(
        core,
        name="pretrained_core",
        layer=layer or "out",
        weights=weights,
        model_channels=core_channels,
        mean=obj.get("mean", [_SMALL_CNN_GRAY_MEAN] * core_channels),
        std=obj.get("std", [_SMALL_CNN_GRAY_STD] * core_channels),
        input_size=size,
        build={"name": "small_cnn", "kwargs": arch},
    )


# --------------------------------------------------------------------------- entry point
def build_backbone(
    name: str,
    *,
    weights: str = "none",
    layer: str | None = None,
    in_channels: int = 1,
    input_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> Backbone:
    """Build a backbone by registry name.

    Args:
        name: registry name (``small_cnn``, ``alexnet``...).
        weights: ``"none"``, a checkpoint path or a torchvision weights name.
        layer: layer name (None: the backbone's default).
        in_channels: channels of the images that will be passed (1 or 3).
        input_size: resize images to this size first (None: backbone default; 0: never).
        kwargs: extra builder arguments (``small_cnn``: channels, n_layers...).
        seed: seeds the random initialization (an isolated RNG; the global one is untouched).

    Raises:
        ConfigError: unknown name, layer or argument; DataError/UserError: weights.
    """
    kwargs = dict(kwargs or {})
    BACKBONES.check_kwargs(name, kwargs, key="backbone_kwargs")
    fn = BACKBONES.get(name, key="backbone")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            return fn(weights=weights, layer=layer, in_channels=in_channels, input_size=input_size, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad arguments for backbone '{name}': {err}", key="backbone_kwargs") from err
