"""Student cores (``fit.core.objective: teacher_maps``): the teachers' maps as targets, and
a small CNN trained on them (the core stage's side is in test_core_stage)."""

from __future__ import annotations

import pytest
import torch

from synth.configtools import from_dict
from synth.surrogate import student
from synth.surrogate.backbones import build_backbone
from synth.surrogate.core import CoreConfig
from synth.surrogate.student import fit_student, teacher_map_targets


class _FakeTeacher:
    """Stands in for a TwinEnsemble: ``pooled_hidden`` gives fixed linear maps of the image
    (C channels at 28 x 28, flattened as the ensemble flattens them)."""

    def __init__(self, c: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(c, 3, generator=g)
        self.b = torch.randn(c, generator=g) * 3
        self.scale = torch.rand(c, generator=g) * 5 + 0.1
        self.n_twins = 1
        self.calls: list[int] = []

    def pooled_hidden(self, images, layers, grid, *, with_outputs=False):
        assert grid == 28 and list(layers) == [2, 3, 4]
        self.calls.append(images.shape[0])
        x = torch.nn.functional.adaptive_avg_pool2d(images, 28)
        m = torch.einsum("nchw,kc->nkhw", x, self.w) * self.scale.view(1, -1, 1, 1) + self.b.view(1, -1, 1, 1)
        return (m.flatten(1), self.output(images)) if with_outputs else m.flatten(1)

    def output(self, images):
        """The fake twin's output: its first channel's mean, ``(N, 1)``."""
        return (images.mean(dim=(2, 3)) @ self.w[0] * self.scale[0] + self.b[0]).view(-1, 1)


def _maps(teachers, images):
    return torch.cat([t.pooled_hidden(images, [2, 3, 4], 28).view(images.shape[0], -1, 28, 28) for t in teachers], dim=1)


def test_all_channels_are_standardized_on_the_first_images_and_every_image_is_mapped(monkeypatch):
    monkeypatch.setattr(student, "TEACHER_CHUNK", 16)
    teachers = [_FakeTeacher(3, 0), _FakeTeacher(2, 1)]
    x = torch.rand(40, 3, 56, 56)
    t = teacher_map_targets(teachers, x, [2, 3, 4], 0, fit_images=24)
    assert t.maps.shape == (40, 5, 28, 28) and t.maps.dtype == torch.bfloat16 and t.n_channels == 5 and t.explained == 1.0
    assert teachers[0].calls == [24, 16]  # the fit images once, then the rest in chunks
    raw = _maps(teachers, x)
    mean = raw[:24].mean(dim=(0, 2, 3), keepdim=True)
    std = raw[:24].transpose(0, 1).reshape(5, -1).std(dim=1).view(1, -1, 1, 1)
    torch.testing.assert_close(t.maps.float(), (raw - mean) / std, rtol=2e-2, atol=2e-2)
    # the teachers' outputs come from the same passes (calls above), every image in order
    assert len(t.outputs) == 2 and all(o.shape == (40, 1) for o in t.outputs)
    for o, teacher in zip(t.outputs, teachers):
        torch.testing.assert_close(torch.as_tensor(o), teacher.output(x), rtol=1e-5, atol=1e-5)


def test_components_are_the_standardized_channels_principal_axes():
    teachers = [_FakeTeacher(6, 2), _FakeTeacher(5, 3)]  # 11 channels of 3 image channels: rank 3
    x = torch.rand(30, 3, 28, 28)
    t = teacher_map_targets(teachers, x, [2, 3, 4], 3, fit_images=30)
    assert t.maps.shape == (30, 3, 28, 28) and t.n_channels == 11
    assert t.explained == pytest.approx(1.0, abs=1e-6)  # three components hold linear maps of RGB whole
    z = t.maps.float().transpose(0, 1).reshape(3, -1)
    cov = torch.cov(z)
    assert float(cov.diagonal().mean()) == pytest.approx(1.0, rel=0.02)  # kept components' mean variance 1
    off = cov - torch.diag(cov.diagonal())
    assert float(off.abs().max()) < 0.02  # uncorrelated
    assert float(cov[0, 0]) >= float(cov[1, 1]) >= float(cov[2, 2])  # largest first
    two = teacher_map_targets(teachers, x, [2, 3, 4], 2, fit_images=30)
    assert 0.5 < two.explained < 1.0


def _tiny_cc(**kw) -> CoreConfig:
    base = {
        "distill_twins": "auto", "objective": "teacher_maps", "augment_shift": 0, "input_size": 32, "epochs": 6, "batch_size": 16,
        "lr": 0.01, "val_fraction": 0.25, "backbone_kwargs": {"channels": 8, "n_layers": 2, "first_kernel": 5}, "precision": "fp32",
    }
    return from_dict(CoreConfig, {**base, **kw})


def test_student_learns_maps_it_can_represent_and_saves_a_pretrained_core(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(96, 3, 32, 32)
    # targets: a fixed linear function of the image at the student's output resolution
    w = torch.randn(4, 3)
    y = torch.einsum("nchw,kc->nkhw", torch.nn.functional.avg_pool2d(x, 2) - 0.5, w).to(torch.bfloat16)
    core, rep = fit_student(x, y, _tiny_cc(epochs=12), in_channels=3, seed=0)
    assert rep["epochs_run"] == 12 and 1 <= rep["best_epoch"] <= 12 and len(rep["val_r2_history"]) == 12
    assert rep["val_r2_history"][0] < 0.3 and rep["val_r2"] == max(rep["val_r2_history"]) and rep["val_r2"] > 0.7
    assert rep["n_train"] + rep["n_val"] == 96 and rep["n_val"] == 24
    path = tmp_path / "student.pt"
    torch.save(core, path)
    bb = build_backbone("pretrained_core", weights=str(path), in_channels=3).eval()
    assert bb.input_size == 32 and bb.out_shape(32, 3) == (4, 16, 16)
    with torch.no_grad():
        p = bb(x)
    r2 = 1 - float((p - y.float()).pow(2).sum() / y.float().pow(2).sum())
    assert r2 > 0.7  # the saved core is the trained one (the best epoch)
    again, rep2 = fit_student(x, y, _tiny_cc(epochs=12), in_channels=3, seed=0)
    assert rep2["val_r2_history"] == rep["val_r2_history"]  # seeded
    for k, v in core["state_dict"].items():
        torch.testing.assert_close(again["state_dict"][k], v)


def test_targets_are_averaged_to_the_students_output_size():
    x = torch.rand(20, 3, 32, 32)
    y = torch.randn(20, 2, 28, 28).to(torch.bfloat16)
    core, rep = fit_student(x, y, _tiny_cc(epochs=1), in_channels=3, seed=0)
    assert core["arch"]["head"] == 2 and rep["epochs_run"] == 1


def test_time_limit_keeps_the_best_epoch_and_says_so(caplog):
    x = torch.rand(40, 3, 32, 32)
    y = torch.randn(40, 2, 16, 16).to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="synth"):
        _, rep = fit_student(x, y, _tiny_cc(epochs=50), in_channels=3, seed=0, max_seconds=0.0)
    assert rep["stopped_by_time_limit"] and rep["epochs_run"] == 1
    said = [r.getMessage() for r in caplog.records if "epochs fit in the time limit" in r.getMessage()]
    assert said and all(m.startswith("student core: 1 of 50 epochs") for m in said), said


def test_mismatched_images_and_maps_are_refused():
    with pytest.raises(ValueError, match="3 images but 2 target maps"):
        fit_student(torch.rand(3, 3, 32, 32), torch.zeros(2, 1, 16, 16), _tiny_cc(), in_channels=3)
