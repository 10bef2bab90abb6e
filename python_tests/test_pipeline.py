"""Input pipelines: the fast pipeline against the exact one (same draws, same pixels), bad files,
the trainer and the CLI through them. Small JPEG/PNG trees generated here."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CUDA
from nad_ext import cli, data, models
from nad_ext.data import pipeline
from nad_ext.training import NADConfig, Network, disentangle

SIZE = 24
SHAPES = [(40, 56), (60, 44), (48, 48), (33, 70), (52, 31)]


def _save(array, path, fmt="JPEG", mode="RGB", **kw):
    Image.fromarray(array).convert(mode).save(path, fmt, **kw)


def write_tree(root, classes=4, per_class=5, odd_formats=True):
    """root/{train,val}/<class>/*: JPEGs of several sizes, and (odd_formats) a PNG, a grayscale,
    a CMYK and a progressive JPEG among them."""
    for split, n in (("train", per_class), ("val", 2)):
        images = data.generated_shapes(split, num_classes=classes, images_per_class=n, image_size=48)
        for i in range(len(images)):
            folder = root / split / images.classes[images.labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            h, w = SHAPES[i % len(SHAPES)]
            array = np.asarray(Image.fromarray(images.load(i).permute(1, 2, 0).numpy()).resize((w, h)))
            kind = i % 7 if odd_formats and split == "train" else 0
            if kind == 3:
                _save(array, folder / f"{i}.png", "PNG")
            elif kind == 4:
                _save(array, folder / f"{i}.jpg", mode="L", quality=90)
            elif kind == 5:
                _save(array, folder / f"{i}.jpg", mode="CMYK", quality=90)
            else:
                _save(array, folder / f"{i}.jpg", quality=90, progressive=kind == 6)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("tree"))


def _parts(seed=0):
    return [(list(range(0, 6)), torch.Generator().manual_seed(seed + 1)),
            (list(range(6, 15)), torch.Generator().manual_seed(seed + 2))]


def _gens_equal(a, b):
    return all(torch.equal(x[1].get_state(), y[1].get_state()) for x, y in zip(a, b))


@pytest.mark.parametrize("source", ["files", "memory"])
def test_fast_pipeline_on_the_cpu_is_the_exact_pipeline_bit_for_bit(tree, source):
    images = data.image_folder(tree, "train") if source == "files" else \
        data.generated_shapes("train", num_classes=3, images_per_class=5, image_size=40)
    with pipeline.make_loader(images, SIZE, "cpu", "exact") as exact, \
            pipeline.make_loader(images, SIZE, "cpu", "fast") as fast:
        assert (exact.kind, fast.kind) == ("exact", "fast")
        pa, pb = _parts(), _parts()
        a, b = exact.train_batch(pa), fast.train_batch(pb)
        assert a.counts == b.counts == [6, 9]
        assert torch.equal(a.labels, b.labels) and a.x.dtype == b.x.dtype == torch.float32
        assert torch.equal(a.x, b.x)
        assert _gens_equal(pa, pb)  # the same number of draws, in the same order
        ea, eb = exact.eval_batch(range(len(images))), fast.eval_batch(range(len(images)))
        assert torch.equal(ea[0], eb[0]) and torch.equal(ea[1], eb[1])
        ref = data.load_batch(images, list(range(6)), SIZE, torch.Generator().manual_seed(1))
        assert torch.equal(ref[0], b.x[:6])


def _record_draws(monkeypatch):
    calls = []
    original = data.train_crop_params

    def recording(height, width, generator, *args):
        out = original(height, width, generator, *args)
        calls.append((generator.initial_seed(), (height, width), out))
        return out

    monkeypatch.setattr(data.transforms, "train_crop_params", recording)
    return calls


def _by_generator(calls):
    """The draws grouped by generator, in order (parts may be loaded in parallel threads)."""
    return sorted(calls, key=lambda call: call[0])


def test_boxes_and_flips_are_the_same_draws_and_batched_pixels_within_one_level(tree, monkeypatch):
    images = data.image_folder(tree, "train")
    calls = _record_draws(monkeypatch)
    with pipeline.make_loader(images, SIZE, "cpu", "exact") as exact:
        a = exact.train_batch(_parts(5))
    exact_draws, calls[:] = list(calls), []
    with pipeline.FastLoader(images, SIZE, torch.device("cpu"), "skip", None, batched=True) as batched:
        b = batched.train_batch(_parts(5))
        assert torch.equal(a.labels, b.labels)
        eb = batched.eval_batch(range(len(images)))
    assert _by_generator(calls) == _by_generator(exact_draws) and len(calls) == 15
    assert any(c[2][4] for c in calls) and not all(c[2][4] for c in calls)  # flips of both kinds
    # Tolerance: two grey levels at most, a small fraction of one on average (the uint8 kernel rounds
    # its fixed-point weights and after each pass; the batched path rounds after each pass too).
    level = 1 / 255 / min(data.IMAGENET_STD)
    exact_eval = data.load_batch(images, list(range(len(images))), SIZE)[0]
    for ours, theirs in ((b.x, a.x), (eb[0], exact_eval)):
        assert (ours - theirs).abs().max() <= 2 * level * 1.001
        assert (ours - theirs).abs().mean() <= 0.1 * level


def _bad_tree(root):
    write_tree(root, classes=4, per_class=4, odd_formats=False)
    cls = sorted((root / "train").iterdir())[0]
    good = next(cls.glob("*.jpg")).read_bytes()
    (cls / "a_truncated.jpg").write_bytes(good[: len(good) // 2])
    (cls / "b_garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no image at all")
    return root


@pytest.mark.parametrize("kind", ["exact", "fast"])
def test_bad_images_skipped_with_a_warning_or_stop_the_run(tmp_path, kind):
    images = data.image_folder(_bad_tree(tmp_path), "train")
    names = [p.name for p in images.paths]
    bad = [names.index("a_truncated.jpg"), names.index("b_garbage.jpg")]
    good = [i for i in range(len(images)) if i not in bad]
    with pipeline.make_loader(images, SIZE, "cpu", kind) as loader:
        with pytest.warns(UserWarning, match="skipping an unreadable image: cannot read image file"):
            with_bad = loader.train_batch([(list(range(len(images))), torch.Generator().manual_seed(3))])
        without = loader.train_batch([(good, torch.Generator().manual_seed(3))])
        # The bad files consume no draws: the others get the regions they get without them.
        assert with_bad.counts == [len(good)] and torch.equal(with_bad.x, without.x)
        count, files = loader.bad.take()
        assert count == 2 and any("a_truncated.jpg" in f for f in files) and any("b_garbage.jpg" in f for f in files)
        assert loader.bad.take() == (0, [])
        with pytest.raises(pipeline.BadImageError, match="b_garbage.jpg"):  # analyses always stop
            loader.eval_batch(bad[1:])
    with pipeline.make_loader(images, SIZE, "cpu", kind, on_bad_image="stop") as loader:
        with pytest.raises(pipeline.BadImageError, match="cannot read image file .*a_truncated.jpg.*on-bad-image skip"):
            loader.train_batch([(bad, torch.Generator())])


def test_resolve_and_settings_errors(tree):
    images = data.image_folder(tree, "train")
    assert pipeline.resolve("auto", images, "cpu") == pipeline.resolve("auto", images, "cuda") == "fast"
    assert pipeline.resolve("exact", images, "cpu") == "exact"
    assert pipeline.resolve("fast", images, "cpu") == "fast"
    with pytest.raises(ValueError, match="data_pipeline must be one of auto, exact, fast"):
        pipeline.resolve("quick", images, "cpu")
    with pytest.raises(ValueError, match="on_bad_image must be one of skip, stop"):
        pipeline.make_loader(images, SIZE, "cpu", "fast", on_bad_image="ignore")
    for field, value in (("data_pipeline", "gpu"), ("on_bad_image", "maybe")):
        with pytest.raises(ValueError, match=field):
            NADConfig(**{field: value}).validate()


def test_prefetch_keeps_order_counts_waiting_and_reports_errors(tree):
    images = data.image_folder(tree, "train")
    with pipeline.make_loader(images, SIZE, "cpu", "fast") as loader:
        requests = [[([i, i + 1], torch.Generator().manual_seed(i))] for i in range(0, 12, 2)]
        got = [b.labels.tolist() for b in loader.prefetch(requests)]
        assert got == [[images.labels[i], images.labels[i + 1]] for i in range(0, 12, 2)]
        assert loader.wait_s > 0
        with pytest.raises(IndexError):
            list(loader.prefetch([[([0], torch.Generator())], [([10_000], torch.Generator())]]))


def test_an_image_set_that_reads_its_own_way_is_read_through_load(tree):
    class Mirrored(data.ImageSet):
        def load(self, i):
            return super().load(i).flip(-1)

    folder = data.image_folder(tree, "val")
    mirrored = Mirrored(folder.classes, folder.labels, "mirrored", paths=folder.paths)
    with pipeline.make_loader(mirrored, SIZE, "cpu", "exact") as exact, pipeline.make_loader(mirrored, SIZE) as fast:
        assert torch.equal(exact.eval_batch(range(4))[0], fast.eval_batch(range(4))[0])
        assert not torch.equal(fast.eval_batch(range(4))[0], data.load_batch(folder, list(range(4)), SIZE)[0])


def test_loader_threads_run_single_threaded_kernels(tree):
    import threading

    before = torch.get_num_threads()
    with pipeline.make_loader(data.image_folder(tree, "val"), SIZE, "cpu", "fast", workers=2) as loader:
        assert {loader._pool.submit(torch.get_num_threads).result() for _ in range(8)} == {1}
        assert torch.get_num_threads() == before
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [before]  # threads started later keep PyTorch's default


def test_load_batch_goes_through_an_attached_loader(tree):
    images = data.image_folder(tree, "val")
    with pipeline.make_loader(images, SIZE, "cpu", "fast") as loader:
        attached = pipeline.with_loader(images, loader)
        assert images.batch_loader is None  # a copy, the original is untouched
        x, y = data.load_batch(attached, [0, 3], SIZE)
        ref = data.load_batch(images, [0, 3], SIZE)
        assert torch.equal(x, ref[0]) and torch.equal(y, ref[1])
        xt, _ = data.load_batch(attached, [0, 3], SIZE, torch.Generator().manual_seed(0))
        assert torch.equal(xt, data.load_batch(images, [0, 3], SIZE, torch.Generator().manual_seed(0))[0])
        with pytest.raises(ValueError, match="24-pixel batches, not 32"):
            data.load_batch(attached, [0], 32)


@pytest.fixture(scope="module")
def plain_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "plain.pt"
    torch.save(models.get_spec("zoo_plain").build(4).state_dict(), path)
    return path


def test_disentangle_through_the_fast_pipeline(tmp_path, plain_weights):
    root = _bad_tree(tmp_path / "tree")
    train = data.image_folder(root, "train")
    model = models.load_model("zoo_plain", plain_weights, num_classes=4)
    config = dict(epochs=1, image_size=SIZE, beta=1.0, batch_size=4, tasks_per_step=2)
    banks = {}
    for kind in ("exact", "fast"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            banks[kind] = disentangle(Network(model, "zoo_plain", "zoo_plain"), train, progress=False,
                                      config=NADConfig(data_pipeline=kind, **config),
                                      out_dir=tmp_path / kind)
    assert all(torch.equal(a, b) for a, b in zip(banks["exact"].logits, banks["fast"].logits))
    log = json.loads((tmp_path / "fast" / "log.json").read_text())["epochs"][0]
    assert log["data_pipeline"] == "fast" and log["bad_images"] == 2
    assert any("b_garbage.jpg" in f for f in log["bad_image_files"])
    assert log["data_wait_s"] >= 0 and log["step_s"] > 0
    # The fidelity check after the run leaves the two unreadable images out of its sample.
    fid = banks["fast"].fidelity
    assert sum(fid["images"]) + sum(fid["other_images"]) == 4 * (len(train) - 2)
    with pytest.raises(pipeline.BadImageError, match="(a_truncated|b_garbage).jpg"):
        disentangle(Network(model, "zoo_plain", "zoo_plain"), train, progress=False,
                    config=NADConfig(data_pipeline="fast", on_bad_image="stop", **config))


def test_cli_disentangle_and_analyze_with_the_fast_pipeline(tree, plain_weights, tmp_path, capsys):
    def run(*argv):
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    common = ["--model", "zoo_plain", "--weights", plain_weights, "--data", tree]
    for kind in ("exact", "fast"):
        out = run("disentangle", *common, "--out", tmp_path / kind, "--image-size", SIZE, "--beta", 1.0,
                  "--epochs", 1, "--data-pipeline", kind)
        assert f"{kind} data pipeline" in out
        run("analyze", *common, "--bank", tmp_path / kind / "masks.safetensors", "--out", tmp_path / f"a_{kind}",
            "--mosaics", 2, "--data-pipeline", kind)
    results = [json.loads((tmp_path / f"a_{k}" / "results.json").read_text()) for k in ("exact", "fast")]
    assert results[0] == results[1]


# ----------------------------------------------------------------------------------------------
# CUDA: nvjpeg batched decode and the batched crops on the GPU


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fast_pipeline_on_cuda_same_draws_close_pixels_cuda(tree, monkeypatch):
    images = data.image_folder(tree, "train")
    calls = _record_draws(monkeypatch)
    with pipeline.make_loader(images, SIZE, "cpu", "exact") as exact:
        a = exact.train_batch(_parts(7))
    exact_draws, calls[:] = list(calls), []
    with pipeline.make_loader(images, SIZE, "cuda", "auto") as fast:
        assert fast.kind == "fast"
        batches = list(fast.prefetch([_parts(7)]))
        ex, _ = fast.eval_batch(range(len(images)))
    assert _by_generator(calls) == _by_generator(exact_draws)
    b = batches[0]
    assert b.x.device.type == "cuda" and b.counts == a.counts and torch.equal(b.labels.cpu(), a.labels)
    level = 1 / 255 / min(data.IMAGENET_STD)
    assert (b.x.cpu() - a.x).abs().mean() < 2 * level
    exact_eval = data.load_batch(images, list(range(len(images))), SIZE)[0]
    assert ex.device.type == "cuda" and (ex.cpu() - exact_eval).abs().mean() < 2 * level


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_disentangle_on_cuda_through_the_fast_pipeline_cuda(tree, plain_weights, tmp_path):
    train = data.image_folder(tree, "train")
    model = models.load_model("zoo_plain", plain_weights, num_classes=4)
    bank = disentangle(Network(model, "zoo_plain", "zoo_plain"), train, progress=False, out_dir=tmp_path,
                       config=NADConfig(epochs=2, image_size=SIZE, beta=1.0, device="cuda", batch_size=4))
    log = json.loads((tmp_path / "log.json").read_text())["epochs"]
    assert bank.epoch == 2 and all(e["data_pipeline"] == "fast" and e["bad_images"] == 0 for e in log)
    assert all(torch.isfinite(m).all() for m in bank.logits)
