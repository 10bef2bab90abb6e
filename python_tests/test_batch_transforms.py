"""Batched crop geometry and resampling against torchvision's per-image transforms."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from conftest import DEVICES
from nad_ext.data import batch_transforms as bt
from nad_ext import data


def _random_images(gen, count, low=9, high=90):
    sizes = torch.randint(low, high, (count, 2), generator=gen).tolist()
    return [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (64, 64), (9, 200), (17, 23)])
@pytest.mark.parametrize("size", [8, 32, 224])
def test_eval_geometry_matches_torchvision(hw, size):
    image = torch.zeros(3, *hw, dtype=torch.uint8)
    resized = TF.resize(image, [round(size * 256 / 224)], antialias=True)
    assert bt.eval_resize_size(*hw, size) == tuple(resized.shape[-2:])
    # Mark the pixel at the centre crop's top-left corner and find it again.
    marked = torch.zeros(1, *resized.shape[-2:])
    y, x = bt.eval_windows(*hw, size)
    assert (y[:3], x[:3]) == ((0, hw[0], resized.shape[1]), (0, hw[1], resized.shape[2]))
    marked[0, y[3], x[3]] = 1
    assert TF.center_crop(marked, [size, size])[0, 0, 0] == 1


def test_axis_taps_are_pytorchs_antialiased_bilinear_weights():
    # Resizing a one-hot row with F.interpolate (float, antialias) reads off the filter weights.
    gen = torch.Generator().manual_seed(0)
    for length, full in [(300, 224), (224, 224), (100, 224), (7, 50), (500, 13), (3, 1)]:
        index, weight = bt.axis_taps(torch.tensor([0]), torch.tensor([length]), torch.tensor([full]),
                                     torch.tensor([0]), full)
        dense = torch.zeros(full, length, dtype=torch.float64)
        dense.scatter_add_(1, index[0], weight[0])
        eye = torch.eye(length, dtype=torch.float64)[:, None, None, :]  # length one-hot rows
        ref = F.interpolate(eye, size=(1, full), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(dense, ref[:, 0, 0, :].T, atol=1e-12, rtol=0)
        assert torch.allclose(weight.sum(-1), torch.ones(1, dtype=torch.float64))
    del gen


@pytest.mark.parametrize("device", DEVICES)
def test_resample_batched_within_two_grey_levels_of_torchvision(device):
    gen = torch.Generator().manual_seed(1)
    images = _random_images(gen, 12)
    size = 24
    windows, expected = [], []
    for k, image in enumerate(images):
        h, w = image.shape[-2:]
        if k % 3 == 2:
            y, x = bt.eval_windows(h, w, size)
            expected.append(TF.center_crop(TF.resize(image, [round(size * 256 / 224)], antialias=True), [size, size]))
        else:
            top, left, bh, bw, _ = data.train_crop_params(h, w, gen)
            y, x = bt.train_windows(top, left, bh, bw, size)
            expected.append(TF.resized_crop(image, top, left, bh, bw, [size, size], antialias=True))
        windows.append([y, x])
    windows = torch.tensor(windows)
    out = bt.resample_batched([im.to(device) for im in images], windows, size)
    assert out.shape == (12, 3, size, size) and out.dtype == torch.float32 and out.device.type == device
    diff = (out.cpu() - torch.stack(expected).float()).abs()
    # The uint8 kernel rounds fixed-point weights; a pass's rounding difference can carry into the
    # next: at most two levels. uint8 noise is the worst case (~5% of pixels off by one here).
    assert diff.max() <= 2 and diff.mean() < 0.1
    assert torch.equal(out, out.round())
    # Chunking (a small padding budget) changes nothing but float summation order.
    small = bt.resample_batched([im.to(device) for im in images], windows, size, max_elements=3 * 40 * 40)
    assert (small - out).abs().max() <= 2
    for image, (y, x), exact in zip(images, windows.tolist(), expected):
        assert torch.equal(bt.resample_each(image, y, x, size), exact)


def test_map_box_moves_boxes_onto_a_resized_copy():
    assert bt.map_box((3, 4, 10, 12), (40, 60), (40, 60)) == (3, 4, 10, 12)
    assert bt.map_box((0, 0, 40, 60), (40, 60), (20, 30)) == (0, 0, 20, 30)
    assert bt.map_box((10, 20, 20, 20), (40, 60), (20, 30)) == (5, 10, 10, 10)
    assert bt.map_box((39, 59, 1, 1), (40, 60), (20, 30)) == (19, 29, 1, 1)  # never empty, never outside


def test_flip_and_normalise_is_the_exact_paths_arithmetic():
    gen = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 256, (3, 3, 5, 7), generator=gen, dtype=torch.uint8)
    flips = [True, False, True]
    out = bt.flip_and_normalise(batch, flips)
    for k in range(3):
        image = TF.horizontal_flip(batch[k]) if flips[k] else batch[k]
        assert torch.equal(out[k], data.normalise(image))
    assert torch.equal(bt.flip_and_normalise(batch.float(), flips), out)
