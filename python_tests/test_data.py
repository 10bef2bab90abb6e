import pytest
import torch
from PIL import Image

from nad_ext import data


@pytest.fixture(scope="module")
def small_train():
    return data.generated_shapes("train", num_classes=10, images_per_class=4, image_size=32, seed=0)


def test_generated_shapes_is_deterministic_and_independent_of_global_rng(small_train):
    torch.manual_seed(123)
    again = data.generated_shapes("train", num_classes=10, images_per_class=4, image_size=32, seed=0)
    assert torch.equal(torch.stack([small_train.load(i) for i in range(len(small_train))]),
                       torch.stack([again.load(i) for i in range(len(again))]))
    assert again.name == small_train.name


def test_generated_shapes_differ_across_seeds_and_splits(small_train):
    other_seed = data.generated_shapes("train", num_classes=10, images_per_class=4, image_size=32, seed=1)
    val = data.generated_shapes("val", num_classes=10, images_per_class=4, image_size=32, seed=0)
    for other in (other_seed, val):
        assert other.name != small_train.name
        assert not torch.equal(small_train.load(0), other.load(0))


def test_generated_shapes_layout(small_train):
    assert len(small_train.classes) == 10 and len(set(small_train.classes)) == 10
    assert len(small_train) == 40 and small_train.labels == [c for c in range(10) for _ in range(4)]
    image = small_train.load(5)
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert small_train.indices_of_class(3) == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="out of range"):
        small_train.indices_of_class(10)


def test_generated_shapes_defaults_and_limits():
    val = data.generated_shapes("val", num_classes=2)
    assert len(val) == 100 and val.load(0).shape == (3, 64, 64)
    assert len(data.generated_shapes("train", num_classes=12, images_per_class=1).classes) == 12
    with pytest.raises(ValueError, match="split"):
        data.generated_shapes("test")
    with pytest.raises(ValueError, match="num_classes"):
        data.generated_shapes(num_classes=13)


def test_train_transform_reproducible_from_generator_only(small_train):
    image = small_train.load(0)
    outs = []
    for global_seed in (0, 99):
        torch.manual_seed(global_seed)
        outs.append(data.train_transform(image, 24, torch.Generator().manual_seed(7)))
    assert outs[0].shape == (3, 24, 24) and outs[0].dtype == torch.float32
    assert torch.equal(outs[0], outs[1])
    different = [data.train_transform(image, 24, torch.Generator().manual_seed(s)) for s in range(1, 6)]
    assert any(not torch.equal(outs[0], d) for d in different)


def test_random_resized_crop_fallback_is_central_crop():
    # An impossible scale range makes every try fail: the fallback returns the whole square image.
    gen = torch.Generator().manual_seed(0)
    assert data.random_resized_crop_params(40, 40, (2.0, 3.0), (0.75, 4 / 3), gen) == (0, 0, 40, 40)
    # A wide image falls back to the widest allowed crop, centred.
    assert data.random_resized_crop_params(10, 40, (2.0, 3.0), (0.75, 4 / 3), gen) == (0, 13, 10, 13)


def test_eval_transform_and_load_batch(small_train):
    out = data.eval_transform(small_train.load(0), 28)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    assert out.min() >= (-mean / std).min() - 1e-5 and out.max() <= ((1 - mean) / std).max() + 1e-5
    x, y = data.load_batch(small_train, [0, 5, 9], 28)
    assert x.shape == (3, 3, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2]
    assert torch.equal(x[0], out)
    x1, _ = data.load_batch(small_train, [0, 5], 20, torch.Generator().manual_seed(3))
    x2, _ = data.load_batch(small_train, [0, 5], 20, torch.Generator().manual_seed(3))
    assert x1.shape == (2, 3, 20, 20) and torch.equal(x1, x2)


def _write_tree(root, counts):
    for split, classes in counts.items():
        for name, n in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (20 + k, 16), color=(10 * k, 100, 200)).save(folder / f"{k}.png")


def test_image_folder_reads_a_tree(tmp_path):
    _write_tree(tmp_path, {"train": {"cat": 2, "dog": 3}, "val": {"cat": 1, "dog": 1}})
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    images = data.image_folder(tmp_path, "train")
    assert images.classes == ["cat", "dog"] and images.labels == [0, 0, 1, 1, 1]
    assert images.indices_of_class(1) == [2, 3, 4]
    first = images.load(0)
    assert first.shape == (3, 16, 20) and first.dtype == torch.uint8
    assert first[:, 0, 0].tolist() == [0, 100, 200]
    assert str(tmp_path) in images.name
    x, y = data.load_batch(images, [0, 4], 12)
    assert x.shape == (2, 3, 12, 12) and y.tolist() == [0, 1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="root not found.*nowhere"):
        data.image_folder(tmp_path / "nowhere", "train")
    _write_tree(tmp_path, {"train": {"cat": 1}})
    with pytest.raises(FileNotFoundError, match="split folder not found.*val"):
        data.image_folder(tmp_path, "val")
    (tmp_path / "empty_split").mkdir()
    with pytest.raises(ValueError, match="no class folders.*empty_split"):
        data.image_folder(tmp_path, "empty_split")
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(ValueError, match="'dog' has no image files"):
        data.image_folder(tmp_path, "train")
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    images = data.image_folder(tmp_path, "train")
    with pytest.raises(ValueError, match="cannot read image file .*broken.jpg"):
        images.load(1)
