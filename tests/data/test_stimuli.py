import csv

import numpy as np
import pytest
import torch
from PIL import Image

from synth.data.stimuli import CORE_COLUMNS, predict_stimulus_set, read_stimulus_set, write_stimulus_set
from synth.errors import DataError
from synth.runtime import file_sha256
from synth.synthesis import Job, score_with

SITES = np.array(["a1", "a2", "b7"])


def _set(tmp_path, channels=1, n=4, size=10, extra=None):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    jobs = [Job(f"stretch_{i}", "stretch" if i % 2 else {"name": "one_hot", "temperature": 0.5}, i % 3, seed=10 + i) for i in range(n)]
    pred = rng.normal(size=(n, 3))
    out = write_stimulus_set(tmp_path / "set", images, jobs, SITES, pred, extra=extra)
    return out, images, jobs, pred


def _manifest(d):
    with open(d / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_round_trip(tmp_path, channels, mode):
    held = np.arange(12, dtype=float).reshape(4, 3)
    d, images, jobs, pred = _set(tmp_path, channels, extra={"steps": np.array([5, 6, 7, 8]), "objective_value": np.ones(4), "heldout_predicted": held})
    for j in jobs:
        with Image.open(d / "stimuli" / f"{j.stimulus_id}.png") as im:
            assert im.mode == mode and im.size == (10, 10)
    st = read_stimulus_set(d, image_size=10, channels=channels)
    assert st.stimulus_id.tolist() == [j.stimulus_id for j in jobs]
    assert st.images.shape == (4, channels, 10, 10) and st.images.dtype == torch.float32
    assert np.array_equal((st.images * 255).round().byte().permute(0, 2, 3, 1).numpy(), images)
    assert np.allclose(st.predicted, pred) and st.site_id.tolist() == SITES.tolist()
    assert np.allclose(st.extra["heldout_predicted"], held)
    rows = _manifest(d)
    assert list(rows[0])[: len(CORE_COLUMNS)] == list(CORE_COLUMNS)
    assert "objective_value" in rows[0] and "heldout_predicted_target" in rows[0]
    for i, (row, j) in enumerate(zip(rows, jobs)):
        t = j.target_site
        assert row["target_site"] == SITES[t] and row["seed"] == str(j.seed) and row["steps"] == str(5 + i)
        assert row["objective"] == ("stretch" if i % 2 else "one_hot")
        assert float(row["predicted_target"]) == pytest.approx(pred[i, t])
        assert float(row["heldout_predicted_target"]) == pytest.approx(held[i, t])
        assert float(row["luminance"]) == pytest.approx(images[i].mean() / 255)
        assert float(row["contrast"]) == pytest.approx((images[i] / 255.0).std())
        assert row["sha256"] == file_sha256(d / row["file"])
    with np.load(d / "stimuli.npz") as z:
        assert z["stimulus_id"].tolist() == [j.stimulus_id for j in jobs]
        assert z["predicted"].shape == (4, 3)


def test_altered_png_is_detected(tmp_path):
    d, images, jobs, _ = _set(tmp_path)
    p = d / "stimuli" / "stretch_2.png"
    img = images[2, :, :, 0].copy()
    img[0, 0] ^= 1
    Image.fromarray(img).save(p)
    with pytest.raises(DataError, match="stretch_2.png: SHA-256 mismatch"):
        read_stimulus_set(d)


def test_missing_png_is_named(tmp_path):
    d, *_ = _set(tmp_path)
    (d / "stimuli" / "stretch_1.png").unlink()
    with pytest.raises(DataError, match="stretch_1.png: stimulus image missing"):
        read_stimulus_set(d)


def test_wrong_size_or_mode_is_named(tmp_path):
    d, *_ = _set(tmp_path)
    with pytest.raises(DataError, match="is 10x10, expected 12x12"):
        read_stimulus_set(d, image_size=12)
    with pytest.raises(DataError, match="stretch_0.png: image mode L, expected RGB"):
        read_stimulus_set(d, channels=3)
    # a replaced file of another size, with the manifest's sha updated, still fails on size
    p = d / "stimuli" / "stretch_3.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(p)
    rows = _manifest(d)
    rows[3]["sha256"] = file_sha256(p)
    with open(d / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DataError, match="stretch_3.png: image is 8x8, expected 10x10"):
        read_stimulus_set(d)


def test_missing_manifest_or_predictions(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        read_stimulus_set(tmp_path)
    d, *_ = _set(tmp_path)
    (d / "stimuli.npz").unlink()
    with pytest.raises(DataError, match="stimuli.npz: predictions file not found"):
        read_stimulus_set(d)


def test_bad_inputs_are_rejected(tmp_path):
    jobs = [Job("x", "stretch", 0, 1)]
    with pytest.raises(ValueError, match="uint8"):
        write_stimulus_set(tmp_path, np.zeros((1, 4, 4, 1), np.float32), jobs, SITES, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="predicted"):
        write_stimulus_set(tmp_path, np.zeros((1, 4, 4, 1), np.uint8), jobs, SITES, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="safe file name"):
        write_stimulus_set(tmp_path, np.zeros((1, 4, 4, 1), np.uint8), [Job("../x", "stretch", 0, 1)], SITES, np.zeros((1, 3)))


class _Mean(torch.nn.Module):
    def forward(self, x):
        return torch.stack([x.mean((1, 2, 3)), x.amax((1, 2, 3)), x[:, 0, 0, 0]], 1)


def test_predictions_come_from_the_saved_images(tmp_path):
    model = _Mean()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 6, 6, 1), dtype=np.uint8)
    jobs = [Job(f"s{i}", "stretch", 0, i) for i in range(3)]
    pred = score_with(model, images)
    assert pred.shape == (3, 3)
    assert np.allclose(pred[:, 0], images.reshape(3, -1).mean(1) / 255.0, atol=1e-6)
    d = write_stimulus_set(tmp_path / "s", images, jobs, SITES, pred)
    ids, again = predict_stimulus_set(model, d)
    assert ids.tolist() == ["s0", "s1", "s2"]
    assert np.array_equal(again, pred)
