"""Prepared caches: what they store, that they read back as the exact pipeline does, that damaged
or mismatched caches are refused, and the CLI around them."""
import json

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from nad_ext import cli, data, models
from nad_ext.data import cache as datacache
from nad_ext.data import pipeline
from nad_ext.training import NADConfig, Network, disentangle
from test_pipeline import SIZE, _by_generator, _parts, _record_draws, write_tree

SHORT = round(SIZE * 256 / 224)  # 27: the default stored short side for SIZE


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def cache(tree, tmp_path_factory):
    return datacache.prepare(tree, tmp_path_factory.mktemp("c") / "cache", SIZE, progress=False)


def test_prepare_stores_resized_images_and_the_folders_layout(tree, cache):
    c = datacache.DataCache(cache)
    assert c.settings["short_side"] == SHORT and c.settings["encoding"] == "raw" and c.image_size == SIZE
    assert sorted(c.splits) == ["train", "val"]
    for split in ("train", "val"):
        folder, cached = data.image_folder(tree, split), c.split(split)
        assert cached.classes == folder.classes and cached.labels == folder.labels
        assert [p.name for p in cached.paths] == [p.name for p in folder.paths]
        for i in range(len(folder)):
            original = data.read_image(folder.paths[i])
            expected = TF.resize(original, [SHORT], antialias=True) if min(original.shape[-2:]) > SHORT else original
            assert torch.equal(cached.load(i), expected)
            assert cached.fetch(i).size == tuple(original.shape[-2:])


def test_cache_reads_back_as_the_exact_pipeline(tree, cache, monkeypatch):
    folder, cached = data.image_folder(tree, "train"), datacache.open_split(cache, "train")
    assert pipeline.resolve("auto", cached, "cpu") == "fast"
    calls = _record_draws(monkeypatch)
    with pipeline.make_loader(folder, SIZE, "cpu", "exact") as exact, pipeline.make_loader(cached, SIZE) as fast:
        a = exact.train_batch(_parts())
        exact_draws, calls[:] = list(calls), []
        b = fast.train_batch(_parts())
        # Boxes and flips are drawn on the original sizes, from the same generators, in the same order.
        assert _by_generator(calls) == _by_generator(exact_draws)
        assert torch.equal(a.labels, b.labels) and a.counts == b.counts
        # Evaluation: the stored image is the exact path's resize, so the pixels are the same.
        assert torch.equal(exact.eval_batch(range(len(folder)))[0], fast.eval_batch(range(len(folder)))[0])
    # Training: the box moved onto the 27-pixel copy; these tiny images lose much of their detail.
    level = 1 / 255 / min(data.IMAGENET_STD)
    assert (a.x - b.x).abs().mean() < 12 * level


def test_a_cache_that_stores_full_size_images_trains_exactly(tree, tmp_path):
    folder = data.image_folder(tree, "train")
    big = datacache.open_split(datacache.prepare(tree, tmp_path / "big", SIZE, short_side=100, progress=False), "train")
    with pipeline.make_loader(folder, SIZE, "cpu", "exact") as exact, pipeline.make_loader(big, SIZE) as fast:
        assert torch.equal(exact.train_batch(_parts(3)).x, fast.train_batch(_parts(3)).x)
        assert torch.equal(exact.eval_batch(range(10))[0], fast.eval_batch(range(10))[0])
    model = models.get_spec("zoo_plain").build(4)
    config = dict(epochs=1, image_size=SIZE, beta=1.0, batch_size=4)
    banks = [disentangle(Network(model, "zoo_plain", "zoo_plain"), images, progress=False,
                         config=NADConfig(data_pipeline=kind, **config))
             for images, kind in ((folder, "exact"), (big, "auto"))]
    assert all(torch.equal(x, y) for x, y in zip(banks[0].logits, banks[1].logits))


def test_jpeg_cache(tree, tmp_path):
    out = datacache.prepare(tree, tmp_path / "j", SIZE, encoding="jpeg", quality=95, progress=False)
    raw_size = sum(datacache.DataCache(out).splits[s]["count"] for s in ("train", "val"))
    assert raw_size == 28 and datacache.DataCache(out).settings["encoding"] == "jpeg"
    folder, cached = data.image_folder(tree, "val"), datacache.open_split(out, "val")
    with pipeline.make_loader(folder, SIZE, "cpu", "exact") as exact, pipeline.make_loader(cached, SIZE) as fast:
        diff = (exact.eval_batch(range(len(folder)))[0] - fast.eval_batch(range(len(folder)))[0]).abs()
    # One more JPEG generation (4:2:0 chroma) on 27-pixel images: a few grey levels on average.
    assert diff.mean() < 6 / 255 / min(data.IMAGENET_STD)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_or_mismatched_caches_are_refused(cache, tmp_path):
    cached = datacache.open_split(cache, "train")
    with pytest.raises(datacache.CacheError, match=f"prepared for image size {SIZE}.*--image-size 32"):
        pipeline.make_loader(cached, 32)
    with pytest.raises(ValueError, match="prepared cache, which is read by the fast pipeline"):
        pipeline.make_loader(cached, SIZE, "cpu", "exact")
    with pytest.raises(datacache.CacheError, match="holds no 'test' split"):
        datacache.open_split(cache, "test")
    with pytest.raises(datacache.CacheError, match="not a data cache"):
        datacache.DataCache(tmp_path)

    truncated = _copy(cache, tmp_path / "truncated")
    blob = truncated / datacache.IMAGES_FILE
    blob.write_bytes(blob.read_bytes()[:-100])
    with pytest.raises(datacache.CacheError, match="truncated"):
        datacache.open_split(truncated, "train")

    index = _copy(cache, tmp_path / "index") / datacache.INDEX_FILE
    raw = bytearray(index.read_bytes())
    raw[-5] ^= 0xFF  # a byte of the last tensor
    index.write_bytes(bytes(raw))
    with pytest.raises(datacache.CacheError, match="does not match its checksum"):
        datacache.DataCache(index.parent)
    index.write_bytes(b"garbage")
    with pytest.raises(datacache.CacheError, match="cannot be read"):
        datacache.DataCache(index.parent)


def test_a_damaged_image_is_found_on_first_read_and_by_verify(cache, tmp_path):
    damaged = _copy(cache, tmp_path / "damaged")
    c = datacache.DataCache(damaged)
    offset = int(c._tensors["train.offset"][2])
    blob = bytearray((damaged / datacache.IMAGES_FILE).read_bytes())
    blob[offset + 7] ^= 0x55
    (damaged / datacache.IMAGES_FILE).write_bytes(bytes(blob))
    name = datacache.DataCache(damaged).names("train")[2]
    assert datacache.verify(damaged) == [f"cache entry train/{name} in {damaged} is corrupted (checksum mismatch): "
                                         f"prepare the cache again"]
    assert datacache.verify(cache) == []
    cached = datacache.open_split(damaged, "train")
    with pipeline.make_loader(cached, SIZE, on_bad_image="stop") as loader:
        with pytest.raises(pipeline.BadImageError, match=f"train/{name}.*corrupted"):
            loader.train_batch([([0, 1, 2], torch.Generator())])
    with pipeline.make_loader(cached, SIZE) as loader, pytest.warns(UserWarning, match="corrupted"):
        assert loader.train_batch([([0, 1, 2], torch.Generator())]).counts == [2]


def test_prepare_refuses_to_overwrite_skips_bad_files_and_leaves_nothing_half_written(tmp_path):
    root = write_tree(tmp_path / "tree", classes=2, per_class=3, odd_formats=False)
    bad = next((root / "train").iterdir()) / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 broken")
    out = tmp_path / "cache"
    with pytest.raises(pipeline.BadImageError, match="zz_broken.jpg"):
        datacache.prepare(root, out, SIZE, on_bad_image="stop", progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["tree"]  # no partial folder left
    datacache.prepare(root, out, SIZE, progress=False)
    meta = datacache.DataCache(out).splits["train"]
    assert meta["count"] == 6 and len(meta["skipped"]) == 1 and "zz_broken.jpg" in meta["skipped"][0]
    with pytest.raises(FileExistsError, match="--overwrite"):
        datacache.prepare(root, out, SIZE, progress=False)
    datacache.prepare(root, out, SIZE, encoding="jpeg", overwrite=True, progress=False)
    assert datacache.DataCache(out).settings["encoding"] == "jpeg"
    with pytest.raises(FileExistsError, match="is not a data cache"):
        datacache.prepare(root, root, SIZE, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="short_side must be an integer >= image_size"):
        datacache.prepare(root, tmp_path / "x", SIZE, short_side=10, progress=False)


def test_cli_prepare_disentangle_analyze(tree, tmp_path, capsys):
    def run(*argv):
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = run("prepare-data", "--data", tree, "--out", tmp_path / "cache", "--image-size", SIZE)
    assert code == 0, err
    assert "short side 27" in out and "train: 20 images" in out
    code, out, err = run("prepare-data", "--verify", tmp_path / "cache")
    assert code == 0 and "every image matches its checksum" in out
    torch.manual_seed(0)
    weights = tmp_path / "plain.pt"
    torch.save(models.get_spec("zoo_plain").build(4).state_dict(), weights)
    common = ["--model", "zoo_plain", "--weights", weights, "--data", tmp_path / "cache"]
    code, out, err = run("disentangle", *common, "--out", tmp_path / "run", "--image-size", SIZE, "--beta", 1.0,
                         "--epochs", 1)
    assert code == 0, err
    assert "fast data pipeline" in out
    log = json.loads((tmp_path / "run" / "log.json").read_text())["epochs"][0]
    assert log["data_pipeline"] == "fast" and "data_wait_s" in log
    code, _, err = run("analyze", *common, "--bank", tmp_path / "run" / "masks.safetensors", "--out",
                       tmp_path / "analysis", "--mosaics", 2)
    assert code == 0, err
    assert (tmp_path / "analysis" / "results.json").is_file()
    code, _, err = run("disentangle", *common, "--out", tmp_path / "run32", "--image-size", 32, "--beta", 1.0)
    assert code == 2 and "prepared for image size 24" in err
    code, _, err = run("disentangle", *common, "--out", tmp_path / "r", "--image-size", SIZE, "--beta", 1.0,
                       "--data-pipeline", "exact")
    assert code == 2 and "read by the fast pipeline" in err
