"""Per-image routing paths (nad_ext.training.paths): planted paths are found exactly, a path
does not depend on chunking or order, misclassified and unreadable images are answered clearly."""
import itertools
import warnings

import pytest
import torch
from PIL import Image
from torch import nn

from nad_ext.data import ImageSet, image_folder
from nad_ext.gates.model import init_logits
from nad_ext.gates.pathstore import STATUS
from nad_ext.training import Network
from nad_ext.training.paths import PathSettings, PathWarning, iter_paths, learn_paths, select_images


@pytest.fixture(autouse=True)
def _one_thread():
    """The networks here are tiny: one intra-op thread is 10x faster than two on a loaded 2-core
    machine, where the loader's threads and other processes compete for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]  # the 7 non-empty colour sets


class Planted(nn.Module):
    """Gate point ``feat`` (8 channels): channel c (0-2) responds only when colour component c is
    bright, channel 3 + c only when it is dark, channels 6 and 7 never. The classifier reads class
    c from channel c alone, with weights growing with c: an image whose bright components are S
    is classified as max(S), and its path at ``feat`` must be {c in S} + {3 + c : c not in S}."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.feat = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            for c in range(3):
                self.conv.weight[c, c] = 1.0  # normalised bright ~ +1.4..1.8, dark ~ -2
                self.conv.weight[3 + c, c] = -1.0
            self.conv.bias[6:] = -5.0
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            for c in range(3):
                self.fc.weight[c, c] = (2.0, 6.0, 10.0)[c]

    def forward(self, x):
        return self.fc(self.pool(self.feat(self.conv(x))).flatten(1))


def planted_pixels(subset, gen, size=16):
    """uint8 (3, size, size): components in ``subset`` bright (0.8-0.9), the others dark (0-0.1)."""
    base = torch.zeros(3, size, size)
    base[list(subset)] = 0.8
    return ((base + 0.1 * torch.rand(3, size, size, generator=gen)).clamp(0, 1) * 255).to(torch.uint8)


def planted_images(copies=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    subsets = [s for s in SUBSETS for _ in range(copies)]
    pixels = torch.stack([planted_pixels(s, gen) for s in subsets])
    return ImageSet(["c0", "c1", "c2"], [max(s) for s in subsets], f"planted-{seed}", images=pixels), subsets


def expected_path(subset):
    return [c in subset for c in range(3)] + [c not in subset for c in range(3)] + [False, False]


NETWORK = Network(Planted(), ["feat"], "planted")
SETTINGS = dict(beta=0.5, steps=20, views=4, init_std=0.01, image_size=16, lr=0.2)


def test_planted_paths_are_found_exactly():
    images, subsets = planted_images()
    paths = learn_paths(NETWORK, images, settings=PathSettings(**SETTINGS), progress=False)
    assert paths.image_index.tolist() == list(range(len(images)))
    assert paths.status.tolist() == [0] * len(images)
    assert paths.target.tolist() == paths.label.tolist() == paths.prediction.tolist() == images.labels
    expected = torch.tensor([expected_path(s) for s in subsets])
    assert torch.equal(paths.masks()[0], expected)
    # robustly: every open channel well open, every closed one well closed
    assert (paths.logits[0][expected] > 0.3).all() and (paths.logits[0][~expected] < -0.3).all()


def test_a_path_depends_neither_on_chunking_nor_on_order():
    images, _ = planted_images(copies=1)
    settings = dict(SETTINGS, steps=4, init_std=1.0)
    whole = learn_paths(NETWORK, images, settings=PathSettings(**settings), progress=False)
    order = [5, 2, 6, 0, 3]
    parts = list(iter_paths(NETWORK, images, indices=order, settings=PathSettings(**settings, chunk_size=2,
                                                                                    images_per_step=1),
                            progress=False))
    assert [len(p) for p in parts] == [2, 2, 1]
    got = torch.cat([p.logits[0] for p in parts])
    assert torch.cat([p.image_index for p in parts]).tolist() == order
    torch.testing.assert_close(got, whole.logits[0][order], rtol=1e-5, atol=1e-5)
    init = learn_paths(NETWORK, images, settings=PathSettings(**dict(settings, steps=1)), progress=False)
    assert not torch.allclose(init.logits[0], whole.logits[0])  # the gates did move
    other_seed = learn_paths(NETWORK, images, indices=order, settings=PathSettings(**settings, seed=1), progress=False)
    assert not torch.allclose(other_seed.logits[0], got)


def mislabelled_images():
    """Image 0: only red (the network says class 0) but labelled class 2; image 1: fine."""
    gen = torch.Generator().manual_seed(1)
    pixels = torch.stack([planted_pixels((0,), gen), planted_pixels((1,), gen)])
    return ImageSet(["c0", "c1", "c2"], [2, 1], "mislabelled", images=pixels)


def test_a_misclassified_image_is_named_under_label_and_trained_under_prediction():
    images = mislabelled_images()
    with pytest.warns(PathWarning, match=r"1 image\(s\) have no trained path \(status 'misclassified'\).*"
                                         r"target='prediction'"):
        by_label = learn_paths(NETWORK, images, settings=PathSettings(**SETTINGS), progress=False)
    assert [STATUS[s] for s in by_label.status.tolist()] == ["misclassified", "ok"]
    assert by_label.prediction.tolist() == [0, 1] and by_label.target.tolist() == [2, 1]
    init = init_logits([0, 1], [8], seed=0, std=SETTINGS["init_std"])[0]  # image 0 never left its start
    assert torch.equal(by_label.logits[0][0], init[0]) and not torch.allclose(by_label.logits[0][1], init[1])
    with torch.no_grad(), pytest.warns(PathWarning):  # trains under no_grad too
        again = learn_paths(NETWORK, images, settings=PathSettings(**SETTINGS), progress=False)
    torch.testing.assert_close(again.logits[0], by_label.logits[0])

    with warnings.catch_warnings():
        warnings.simplefilter("error", PathWarning)
        by_prediction = learn_paths(NETWORK, images, settings=PathSettings(**SETTINGS, target="prediction"),
                                    progress=False)
    assert [STATUS[s] for s in by_prediction.status.tolist()] == ["ok", "ok"]
    assert by_prediction.target.tolist() == [0, 1] and by_prediction.label.tolist() == [2, 1]
    assert by_prediction.masks()[0].tolist() == [expected_path((0,)), expected_path((1,))]


def test_images_are_selected_by_the_original_networks_answer(tmp_path):
    images = mislabelled_images()
    assert select_images(NETWORK, images, "misclassified", image_size=16) == [0]
    assert select_images(NETWORK, images, "correct", indices=[1, 0], image_size=16) == [1]
    with pytest.raises(ValueError, match="which must be one of 'misclassified', 'correct'"):
        select_images(NETWORK, images, "wrong")
    folder = write_folder(tmp_path)
    with pytest.warns(PathWarning, match="1 unreadable image.*broken.png"):
        correct = select_images(NETWORK, folder, "correct", image_size=16)
    assert len(correct) == len(folder) - 1


def write_folder(root, bad=True):
    """root/train/<c0,c1,c2>/*.png of planted images (+ one unreadable file in c1)."""
    gen = torch.Generator().manual_seed(2)
    for k, subset in enumerate(SUBSETS):
        folder = root / "train" / f"c{max(subset)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(planted_pixels(subset, gen).permute(1, 2, 0).numpy()).save(folder / f"img{k}.png")
    if bad:
        (root / "train" / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image at all")
    return image_folder(root, "train")


@pytest.mark.parametrize("pipeline", ["exact", "fast"])
def test_an_unreadable_image_gets_no_views(tmp_path, pipeline):
    images = write_folder(tmp_path)
    broken = next(i for i, p in enumerate(images.paths) if p.name == "broken.png")
    for target in ("label", "prediction"):
        with pytest.warns(PathWarning, match=r"1 image\(s\) have no path \(status 'no_views'\).*broken\.png"):
            paths = learn_paths(NETWORK, images, settings=PathSettings(**SETTINGS, target=target,
                                                                       data_pipeline=pipeline), progress=False)
        status = [STATUS[s] for s in paths.status.tolist()]
        assert status[broken] == "no_views" and status.count("ok") == len(images) - 1
        assert paths.prediction[broken] == -1
        assert paths.target[broken] == (paths.label[broken] if target == "label" else -1)
        ok = [i for i in range(len(images)) if i != broken]
        expected = torch.tensor([expected_path(SUBSETS[int(images.paths[i].stem[3:])]) for i in ok])
        assert torch.equal(paths.masks()[0][ok], expected)


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("views", -1), ("images_per_step", 1.5), ("chunk_size", True), ("target", "truth"),
    ("beta", -1.0), ("beta", "auto"), ("lr", 0.0), ("seed", -3), ("init_std", float("nan")),
    ("negatives", -0.5), ("data_pipeline", "quick"), ("on_nonfinite", "ignore"), ("image_size", 4),
])
def test_bad_settings_are_named(field, value):
    images, _ = planted_images(copies=1)
    with pytest.raises(ValueError, match=field):
        learn_paths(NETWORK, images, settings=PathSettings(**{**SETTINGS, field: value}), progress=False)


def test_bad_indices_and_missing_beta_are_named():
    images, _ = planted_images(copies=1)
    settings = PathSettings(**SETTINGS)
    for indices, message in (([], "indices is empty"), ([0, 99], r"indices \[99\] out of range"),
                             ([1, 1], r"more than once")):
        with pytest.raises(ValueError, match=message):
            learn_paths(NETWORK, images, indices=indices, settings=settings, progress=False)
    with pytest.raises(ValueError, match="beta must be given for model 'planted'"):
        learn_paths(NETWORK, images, settings=PathSettings(image_size=16), progress=False)
    with pytest.raises(ValueError, match="the selective objective needs both"):
        learn_paths(NETWORK, images, settings=PathSettings(**SETTINGS, negatives=0.5), progress=False)


def test_selective_objective_keeps_the_planted_channels_and_does_not_depend_on_chunking():
    """With negatives (other classes' images through the image's gates) a path keeps the image's
    own channels; it may open more (those that tell the negatives apart), and stays independent
    of the chunking: the negatives come from the image's own generator."""
    images, subsets = planted_images(copies=1)
    settings = dict(SETTINGS, negatives=0.5, negative_weight=1.0)
    paths = learn_paths(NETWORK, images, settings=PathSettings(**settings), progress=False)
    assert paths.status.tolist() == [0] * len(images)
    expected = torch.tensor([expected_path(s) for s in subsets])
    assert (paths.masks()[0] | ~expected).all()
    plain = learn_paths(NETWORK, images, settings=PathSettings(**SETTINGS), progress=False)
    assert not torch.allclose(plain.logits[0], paths.logits[0])  # the negatives changed the gates
    order = [4, 1, 6]
    split = learn_paths(NETWORK, images, indices=order, progress=False,
                        settings=PathSettings(**settings, chunk_size=2, images_per_step=2))
    torch.testing.assert_close(split.logits[0], paths.logits[0][order], rtol=1e-5, atol=1e-5)


def test_settings_from_a_class_run_config():
    from nad_ext.training import NADConfig

    settings = PathSettings.from_config(NADConfig(beta=0.3, lr=0.05, seed=4, epochs=3, init_std=1.0), views=2)
    assert (settings.beta, settings.lr, settings.seed, settings.views) == (0.3, 0.05, 4, 2)
    assert settings.init_std == PathSettings.init_std  # the paths' own start, not the class run's
    assert PathSettings.from_config({"beta": 0.3, "batch_size": 16, "mode": "paper"}).beta == 0.3


def test_paths_go_to_a_path_store_and_a_resumed_store_skips_its_images(tmp_path):
    from nad_ext.gates.pathstore import PathStore

    images, subsets = planted_images(copies=1)
    settings = PathSettings(**SETTINGS, chunk_size=3)
    memory = learn_paths(NETWORK, images, settings=settings, progress=False)
    first = learn_paths(NETWORK, images, indices=[0, 1, 2, 3], settings=settings, out=tmp_path / "store",
                        keep_logits=True, progress=False)
    assert first.logits == [] and first.image_index.tolist() == [0, 1, 2, 3] and first.status.tolist() == [0] * 4
    with pytest.raises(FileExistsError, match="exists"):
        learn_paths(NETWORK, images, settings=settings, out=tmp_path / "store", progress=False)
    with pytest.raises(ValueError, match="made for another run.*steps"):
        learn_paths(NETWORK, images, settings=PathSettings(**{**SETTINGS, "steps": 3}), out=tmp_path / "store",
                    resume=True, progress=False)
    rest = learn_paths(NETWORK, images, settings=PathSettings(**SETTINGS, chunk_size=2, images_per_step=1),
                       out=tmp_path / "store", resume=True, keep_logits=True, progress=False)
    assert rest.image_index.tolist() == [4, 5, 6]
    stored = PathStore.open(tmp_path / "store").read()
    assert stored.image_index.tolist() == list(range(7))
    assert torch.equal(stored.masks["feat"], memory.masks()[0])
    torch.testing.assert_close(stored.logits["feat"].float(), memory.logits[0], rtol=1e-3, atol=1e-3)
    assert stored.label.tolist() == stored.target.tolist() == images.labels


@pytest.fixture(scope="module")
def planted_weights(tmp_path_factory):
    from nad_ext import models

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "plain.pt"
    torch.save(models.get_spec("zoo_plain").build(3).state_dict(), path)
    return path


def test_the_cli_writes_a_path_store(tmp_path, planted_weights, capsys):
    from nad_ext import cli
    from nad_ext.gates.pathstore import PathStore

    root = tmp_path / "tree"
    write_folder(root, bad=False)
    write_folder(root / "v", bad=True)
    (root / "v" / "train").rename(root / "val")
    (root / "v").rmdir()
    listing = tmp_path / "images.txt"
    listing.write_text("# two images by index, one by file\n0\n3\n\nc1/broken.png\n")
    argv = ["paths", "--model", "zoo_plain", "--weights", planted_weights, "--data", root, "--out", tmp_path / "store",
            "--image-size", 32, "--steps", 2, "--views", 2, "--beta", 4.5, "--target", "prediction",
            "--images", listing]
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "note: 1 image(s) have no path (status 'no_views')" in err and "broken.png" in err
    assert "3 paths (2 ok, 1 no_views)" in out
    store = PathStore.open(tmp_path / "store")
    val = image_folder(root, "val")
    broken = next(i for i, p in enumerate(val.paths) if p.name == "broken.png")
    assert store.image_indices().tolist() == [0, 3, broken] and store.model_id == "zoo_plain"
    assert store.meta["settings"]["target"] == "prediction" and not store.logits
    code = cli.main([str(a) for a in argv])
    assert code == 2 and "exists" in capsys.readouterr().err
    code = cli.main([str(a) for a in argv[:-2] + ["--only", "misclassified", "--overwrite"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "images are misclassified" in out
    listing.write_text("c1/nothing.png\n")
    code = cli.main([str(a) for a in argv[:-1] + [listing, "--overwrite"]])
    assert code == 2 and "'c1/nothing.png' is no image of" in capsys.readouterr().err


def test_cli_defaults_are_the_settings_defaults():
    from nad_ext import cli
    from nad_ext.cli.paths import settings_from_args
    from nad_ext.training import SELECTIVE_DEFAULTS

    parser = cli.build_parser()
    args = parser.parse_args(["paths", "--model", "vgg16", "--out", "x"])
    assert settings_from_args(args) == PathSettings()
    args = parser.parse_args(["paths", "--model", "vgg16", "--out", "x", "--selective", "--negatives", "0.5"])
    assert settings_from_args(args) == PathSettings(**{**SELECTIVE_DEFAULTS, "negatives": 0.5})


class BrokenForNoBlue(Planted):
    """Planted, plus 0 x sqrt(blue channel): for an image without blue the gated channel is 0 and
    sqrt's gradient there infinite, so its gate gradient is NaN; images with blue are fine."""

    def forward(self, x):
        pooled = self.pool(self.feat(self.conv(x))).flatten(1)
        return self.fc(pooled) + 0.0 * torch.sqrt(pooled[:, 2:3])


def test_a_nonfinite_gradient_stops_or_marks_the_image(monkeypatch):
    from nad_ext.training import NonFiniteGradientError
    from nad_ext.training import paths as paths_module

    gen = torch.Generator().manual_seed(3)
    images = ImageSet(["c0", "c1", "c2"], [0, 2], "blue-or-not",
                      images=torch.stack([planted_pixels((0,), gen), planted_pixels((2,), gen)]))
    network = Network(BrokenForNoBlue(), ["feat"], "broken")
    with pytest.raises(NonFiniteGradientError, match=r"image\(s\) \[0\].*on_nonfinite='skip'"):
        learn_paths(network, images, settings=PathSettings(**SETTINGS), progress=False)
    steps = []
    step = paths_module.train_step
    monkeypatch.setattr(paths_module, "train_step", lambda *a: steps.append(1) or step(*a))
    with pytest.raises(NonFiniteGradientError):  # at the end of image 0's steps, before image 1's
        learn_paths(network, images, settings=PathSettings(**SETTINGS, images_per_step=1), progress=False)
    assert len(steps) == SETTINGS["steps"]
    with pytest.warns(PathWarning, match=r"1 image\(s\) had steps skipped .*'nonfinite'"):
        paths = learn_paths(network, images, settings=PathSettings(**SETTINGS, on_nonfinite="skip"), progress=False)
    assert [STATUS[s] for s in paths.status.tolist()] == ["nonfinite", "ok"]
    assert paths.masks()[0][1].tolist() == expected_path((2,))


def test_progress_off_a_terminal_is_one_line_with_the_rate(capsys):
    images, _ = planted_images(copies=1)
    learn_paths(NETWORK, images, settings=PathSettings(**dict(SETTINGS, steps=1)), progress=True)
    err = capsys.readouterr().err
    assert err.startswith("paths: 7/7 images in ") and ", img_s " in err and err.count("\n") == 1
