import urllib.error

import pytest
import torch

from synth.errors import ConfigError, DataError, UserError
from synth.surrogate.backbones import BACKBONES, build_backbone, layer_names


def test_registry_names():
    for name in ("small_cnn", "pretrained_core", "alexnet", "resnet18", "resnet50", "vgg16"):
        assert name in BACKBONES


def test_small_cnn_shapes_and_resize():
    bb = build_backbone("small_cnn", in_channels=1, input_size=64, kwargs={"channels": 8, "n_layers": 3, "downsample": []}, seed=0)
    y = bb(torch.rand(2, 1, 112, 112))
    assert y.shape == (2, 8, 32, 32)  # resized to 64, first layer stride 2
    assert bb.out_shape(112, 1) == (8, 32, 32)
    bb2 = build_backbone("small_cnn", in_channels=1, input_size=0, kwargs={"channels": 8, "downsample": [3]}, seed=0)
    assert bb2(torch.rand(2, 1, 40, 40)).shape == (2, 8, 10, 10)


def test_small_cnn_defaults():
    bb = build_backbone("small_cnn", in_channels=1)
    assert bb.input_size == 64
    convs = [b.conv for b in bb.body.blocks]
    assert [c.out_channels for c in convs] == [32, 32, 48, 48]
    assert [c.stride[0] for c in convs] == [2, 1, 2, 1]
    assert isinstance(bb.body.blocks[0].act, torch.nn.SiLU)
    assert bb(torch.rand(1, 1, 112, 112)).shape == (1, 48, 16, 16)


def test_small_cnn_layers_truncate():
    bb = build_backbone("small_cnn", layer="conv1", input_size=0, kwargs={"channels": 4, "n_layers": 3})
    assert len(bb.body.blocks) == 1
    assert layer_names("small_cnn", n_layers=3) == ["conv1", "conv2", "conv3", "out"]


def test_small_cnn_head_is_a_linear_projection_of_the_last_layer_only():
    bb = build_backbone("small_cnn", in_channels=3, input_size=0, kwargs={"channels": 4, "n_layers": 3, "head": 7}, seed=0)
    assert bb.build_spec["kwargs"]["head"] == 7 and bb.out_shape(32, 3) == (7, 8, 8)
    x = torch.rand(2, 3, 32, 32)
    body = bb.body
    h = bb.preprocess(x)
    for b in body.blocks:
        h = b(h)
    torch.testing.assert_close(bb(x), torch.nn.functional.conv2d(h, body.head.weight, body.head.bias))
    inner = build_backbone("small_cnn", layer="conv2", in_channels=3, input_size=0, kwargs={"channels": 4, "n_layers": 3, "head": 7}, seed=0)
    assert inner.body.head is None and inner.out_shape(32, 3) == (4, 8, 8)  # an inner layer has no head
    plain = build_backbone("small_cnn", in_channels=3, input_size=0, kwargs={"channels": 4, "n_layers": 3}, seed=0)
    assert "head" not in plain.build_spec["kwargs"] and plain.body.head is None  # old cores' architectures unchanged
    with pytest.raises(ConfigError, match="backbone_kwargs"):
        build_backbone("small_cnn", in_channels=3, kwargs={"head": 0})


def test_small_cnn_seeded_init():
    a = build_backbone("small_cnn", kwargs={"channels": 4}, seed=3)
    b = build_backbone("small_cnn", kwargs={"channels": 4}, seed=3)
    c = build_backbone("small_cnn", kwargs={"channels": 4}, seed=4)
    wa, wb, wc = (m.body.blocks[0].conv.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_backbone_hint():
    with pytest.raises(ConfigError, match="did you mean 'alexnet'"):
        build_backbone("alexnett")


def test_unknown_small_cnn_layer_hint():
    with pytest.raises(ConfigError, match="conv2"):
        build_backbone("small_cnn", layer="conv22", kwargs={"n_layers": 3})


def test_unknown_kwarg():
    with pytest.raises(ConfigError, match="channels"):
        build_backbone("small_cnn", kwargs={"chanels": 3})


def test_alexnet_alias_and_grayscale():
    bb = build_backbone("alexnet", layer="conv3", in_channels=1, input_size=64)
    assert bb.model_channels == 3
    y = bb(torch.rand(2, 1, 32, 32))  # C=1 replicated, resized to 64
    assert y.shape[:2] == (2, 384)
    node = build_backbone("alexnet", layer="features.7", input_size=64)
    assert node(torch.rand(1, 3, 64, 64)).shape == y[:1].shape


def test_torchvision_gray_equals_replicated_rgb():
    bb = build_backbone("alexnet", layer="conv1", input_size=64, seed=0).eval()
    g = torch.rand(2, 1, 64, 64)
    assert torch.allclose(bb(g), bb(g.repeat(1, 3, 1, 1)))


def test_unknown_torchvision_layer_lists_close_matches():
    with pytest.raises(ConfigError) as err:
        build_backbone("resnet18", layer="layer5")
    msg = str(err.value)
    assert "layer5" in msg and "layer4" in msg and "\n" not in msg


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("w") / "resnet18_random.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_checkpoint_path_loads_exact_tensors(resnet18_file):
    path, sd = resnet18_file
    bb = build_backbone("resnet18", weights=str(path), layer="layer2")
    got = bb.body.state_dict()
    assert got["conv1.weight"].shape == sd["conv1.weight"].shape
    for k, v in got.items():
        assert torch.equal(v, sd[k]), k
    assert bb.preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_checkpoint_dict_with_state_dict(resnet18_file, tmp_path):
    path, sd = resnet18_file
    p = tmp_path / "wrapped.pt"
    torch.save({"state_dict": sd, "epoch": 3}, p)
    bb = build_backbone("resnet18", weights=str(p), layer="conv1")
    assert torch.equal(bb.body.state_dict()["conv1.weight"], sd["conv1.weight"])


def test_checkpoint_missing_file(tmp_path):
    p = tmp_path / "nope.pth"
    with pytest.raises(DataError, match="nope.pth"):
        build_backbone("resnet18", weights=str(p))


def test_checkpoint_corrupt_file(tmp_path):
    p = tmp_path / "bad.pth"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DataError, match="bad.pth"):
        build_backbone("resnet18", weights=str(p))


def test_checkpoint_wrong_keys(resnet18_file, tmp_path):
    _, sd = resnet18_file
    p = tmp_path / "other.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("fc.")}, p)
    with pytest.raises(DataError, match=r"other.pth.*missing.*fc\."):
        build_backbone("resnet18", weights=str(p))


def test_weights_name_offline_raises_user_error(monkeypatch, tmp_path):
    """Simulate no internet: only the download function fails (empty hub cache)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError) as err:
        build_backbone("alexnet", weights="IMAGENET1K_V1", layer="conv3")
    msg = str(err.value)
    assert calls and "alexnet" in calls[0]
    assert "no internet" in msg and "IMAGENET1K_V1" in msg and "weights: /path/to/file.pth" in msg
    assert not isinstance(err.value, (ConfigError, DataError))
    with pytest.raises(UserError, match="internet"):
        build_backbone("alexnet", weights="AlexNet_Weights.IMAGENET1K_V1")


def test_unknown_weights_name():
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        build_backbone("alexnet", weights="IMAGENET1K_V9")
    with pytest.raises(ConfigError, match="AlexNet_Weights"):
        build_backbone("alexnet", weights="ResNet18_Weights.IMAGENET1K_V1")


def test_rgb_into_grayscale_core_uses_luminance():
    bb = build_backbone("small_cnn", in_channels=1, input_size=0, kwargs={"channels": 4, "n_layers": 2}, seed=0).eval()
    rgb = torch.rand(2, 3, 16, 16)
    lum = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(bb(rgb), bb(lum), atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        bb(torch.rand(1, 2, 16, 16))
