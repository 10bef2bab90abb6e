import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nad_ext.data import ImageSet
from nad_ext.gates import MaskBank, Task
from nad_ext.training import SELECTIVE_DEFAULTS, NADConfig, Network, disentangle


def colour_images(num_classes=3, per_class=40, size=16, seed=0):
    """Class c: a uniform image whose colour channel c is bright, with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c in range(num_classes):
        base = torch.zeros(per_class, 3, size, size)
        base[:, c] = 0.8
        noisy = (base + 0.1 * torch.rand(per_class, 3, size, size, generator=gen)).clamp(0, 1)
        images.append((noisy * 255).to(torch.uint8))
        labels += [c] * per_class
    return ImageSet([f"c{c}" for c in range(num_classes)], labels, f"colours-{seed}", images=torch.cat(images))


class KnownChannels(nn.Module):
    """Channels 2c and 2c+1 of `feat` respond to class c only; channels 6, 7 never respond.

    The classifier reads class c's logit from its two channels: NAD must find exactly those.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.feat = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(-1.0)
            for c in range(3):
                # normalised bright channel ~ +1.6..2.2, dark ~ -2: only class c passes the ReLU
                self.conv.weight[2 * c : 2 * c + 2, c] = 1.0
                self.conv.bias[2 * c : 2 * c + 2] = 0.0
            self.conv.bias[6:] = -5.0
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            for c in range(3):
                self.fc.weight[c, 2 * c : 2 * c + 2] = 2.0

    def forward(self, x):
        return self.fc(self.pool(self.feat(self.conv(x))).flatten(1))


class KnownTokens(nn.Module):
    """The token-layout twin of KnownChannels: a 16 x 16 image becomes 16 patch tokens (4 x 4
    pixels each, averaged) behind a class token, and a linear layer + ReLU gives every token 8
    channels: 2c and 2c+1 respond to class c only, 6 and 7 never. The classifier reads class c
    from the patch tokens' mean of its two channels. Gate point ``feat``: (N, 17, 8) tokens."""

    def __init__(self):
        super().__init__()
        planted = KnownChannels()
        self.patch = nn.Conv2d(3, 3, 4, stride=4, bias=False)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 3))
        self.embed = nn.Linear(3, 8)
        self.feat = nn.ReLU()
        self.fc = planted.fc
        with torch.no_grad():
            self.patch.weight.zero_()
            for c in range(3):
                self.patch.weight[c, c] = 1 / 16
            self.embed.weight.copy_(planted.conv.weight.view(8, 3))
            self.embed.bias.copy_(planted.conv.bias)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], 1)
        return self.fc(self.feat(self.embed(tokens))[:, 1:].mean(1))


class KnownHeads(KnownTokens):
    """KnownTokens' patch tokens (6 channels: 2c, 2c+1 for class c) through a 3-head
    self-attention with uniform attention (zero queries and keys), identity values and output
    projection: head c carries class c's channels. The classifier reads class c from them, so
    task c needs head c and no other."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.attn = nn.MultiheadAttention(6, 3, batch_first=True)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.bias.zero_()
            for c in range(3):
                self.embed.weight[2 * c: 2 * c + 2, c] = 1.0
            self.attn.in_proj_weight.zero_()
            self.attn.in_proj_bias.zero_()
            self.attn.in_proj_weight[12:].copy_(torch.eye(6))
            self.attn.out_proj.weight.copy_(torch.eye(6))
            self.attn.out_proj.bias.zero_()
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            for c in range(3):
                self.fc.weight[c, 2 * c: 2 * c + 2] = 2.0

    def forward(self, x):
        tokens = self.feat(self.embed(self.patch(x).flatten(2).transpose(1, 2)))
        return self.fc(self.attn(tokens, tokens, tokens, need_weights=False)[0].mean(1))


def small_cnn():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def fit_small_cnn(images):
    """A few Adam steps so that the network classifies most training images correctly."""
    model = small_cnn()
    from nad_ext.data import load_batch

    x, y = load_batch(images, list(range(len(images))), 16)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


CFG = dict(beta=1.0, epochs=2, image_size=16, batch_size=16)


def test_known_channels_are_recovered():
    images = colour_images(per_class=48)
    bank = disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False,
                       config=NADConfig(beta=1.0, epochs=21, image_size=16))
    open_channels = bank.binary()
    for c in range(3):
        assert open_channels[c].nonzero().flatten().tolist() == [2 * c, 2 * c + 1]


def test_known_token_channels_are_recovered():
    """The planted test in the token layout: channels on the last axis of (N, L, C)."""
    images = colour_images(per_class=48)
    bank = disentangle(Network(KnownTokens(), ["feat"], "known_tokens"), images, progress=False,
                       config=NADConfig(beta=1.0, epochs=21, image_size=16))
    assert [(p.channels, p.channel_axis) for p in bank.gate_points] == [(8, 2)]
    open_channels = bank.binary()
    for c in range(3):
        assert open_channels[c].nonzero().flatten().tolist() == [2 * c, 2 * c + 1]


def test_known_heads_are_recovered():
    """Head gates: each class's sub-architecture keeps exactly the head that carries it."""
    images = colour_images(per_class=48)
    bank = disentangle(Network(KnownHeads(), ["attn:heads"], "known_heads"), images, progress=False,
                       config=NADConfig(beta=1.0, epochs=21, image_size=16))
    assert [(p.channels, p.units) for p in bank.gate_points] == [(3, "heads")]
    open_heads = bank.binary()
    for c in range(3):
        assert open_heads[c].nonzero().flatten().tolist() == [c]


def test_batched_mode_gives_the_gates_of_one_task_at_a_time():
    images = colour_images(per_class=40)
    model = fit_small_cnn(images)
    paper = disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False,
                        config=NADConfig(mode="paper", **CFG))
    batched = disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False,
                          config=NADConfig(mode="batched", tasks_per_step=3, **CFG))
    two = disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False,
                      config=NADConfig(mode="batched", tasks_per_step=2, **CFG))
    for p, b, t in zip(paper.logits, batched.logits, two.logits):
        torch.testing.assert_close(b, p, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(t, p, rtol=1e-4, atol=1e-4)
    init = disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False,
                       config=NADConfig(**{**CFG, "epochs": 1}))
    assert not torch.allclose(init.logits[0], paper.logits[0])  # the gates did move


def test_epochs_are_saved_and_a_resumed_run_continues_exactly(tmp_path):
    images = colour_images(per_class=24)
    model = fit_small_cnn(images)
    cfg = dict(beta=1.0, image_size=16)
    full = disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False, config=NADConfig(epochs=3, **cfg),
                       out_dir=tmp_path / "full")
    disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False, config=NADConfig(epochs=1, **cfg),
                out_dir=tmp_path / "part")
    with pytest.raises(FileExistsError, match="resume"):
        disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False, config=NADConfig(epochs=3, **cfg),
                    out_dir=tmp_path / "part")
    resumed = disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False,
                          config=NADConfig(epochs=3, **cfg), out_dir=tmp_path / "part", resume=True)
    for a, b in zip(full.logits, resumed.logits):
        torch.testing.assert_close(a, b)
    assert resumed.epoch == 3
    assert MaskBank.load(tmp_path / "part" / "masks.safetensors").epoch == 3
    assert MaskBank.load(tmp_path / "part" / "masks_epoch01.safetensors").epoch == 1
    log = json.loads((tmp_path / "part" / "log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3]
    assert len(log["epochs"][0]["ce"]) == 3
    with pytest.raises(ValueError, match="other settings"):
        disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False,
                    config=NADConfig(epochs=4, beta=2.0, image_size=16), out_dir=tmp_path / "part",
                    resume=True)


def test_tasks_made_of_several_classes():
    images = colour_images(per_class=16)
    bank = disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False,
                       tasks=[Task("c0+c1", (0, 1)), Task("c2", (2,))], config=NADConfig(**CFG))
    assert bank.task_names == ["c0+c1", "c2"] and bank.logits[0].shape == (2, 8)
    with pytest.raises(ValueError, match="task 'c9' names classes"):
        disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False, tasks=[Task("c9", (9,))],
                    config=NADConfig(**CFG))


@pytest.mark.parametrize("field, value", [("beta", -1.0), ("beta", float("nan")), ("lr", 0), ("lr", "fast"),
                                          ("epochs", 0), ("batch_size", 1.5), ("mode", "fast"),
                                          ("negatives", -0.5), ("negative_weight", float("inf")),
                                          ("negative_weight", 1.0), ("gate", "hard"), ("gate_temperature", 0),
                                          ("gate_temperature", 1.5)])
def test_bad_settings_are_named(field, value):
    images = colour_images(per_class=4)
    with pytest.raises(ValueError, match=field):
        disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False,
                    config=NADConfig(**{**CFG, field: value}))


def test_beta_is_required_without_a_preset():
    with pytest.raises(ValueError, match="beta must be given"):
        disentangle(Network(KnownChannels(), ["feat"], "known"), colour_images(per_class=4), progress=False,
                    config=NADConfig(image_size=16))


def test_progress_off_a_terminal_is_one_line_per_epoch(capsys):
    images = colour_images(per_class=8)
    disentangle(Network(small_cnn().eval(), ["1", "4"], "cnn"), images, progress=True, config=NADConfig(**CFG))
    err = capsys.readouterr().err  # not a terminal under pytest
    lines = err.splitlines()
    assert "\r" not in err and [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("batches in" in line and "ce " in line and "sparse " in line for line in lines)


# ----------------------------------------------------------------------------------------------
# The selective objective (negatives of other classes)

SELECTIVE = dict(negatives=SELECTIVE_DEFAULTS["negatives"], negative_weight=SELECTIVE_DEFAULTS["negative_weight"])


def test_known_channels_are_recovered_by_the_selective_objective():
    images = colour_images(per_class=48)

    def run(beta, **extra):
        return disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False,
                           config=NADConfig(beta=beta, epochs=21, image_size=16, **extra))

    bank = run(2.0, **SELECTIVE)
    for c in range(3):
        assert bank.binary()[c].nonzero().flatten().tolist() == [2 * c, 2 * c + 1]
    assert bank.config["negatives"] == SELECTIVE["negatives"]
    # Here a class's own channels alone cannot reject another class's image (every logit 0, a
    # tie), so the negative term pays for keeping the other class's evidence: at beta 1 a task
    # may keep such a channel, but never loses its own nor opens the dead ones (6, 7).
    loose, paper = run(1.0, **SELECTIVE), run(1.0)
    for c in range(3):
        kept = loose.binary()[c]
        assert kept[2 * c] and kept[2 * c + 1] and not kept[6:].any()
    # The negative term acts: those channels close less firmly than with the paper's objective.
    others = torch.tensor([[c // 2 != t for c in range(6)] for t in range(3)])
    assert loose.logits[0][:, :6][others].mean() > paper.logits[0][:, :6][others].mean() + 0.5


def test_selective_batched_mode_gives_the_gates_of_one_task_at_a_time(tmp_path):
    images = colour_images(per_class=40)
    model = fit_small_cnn(images)
    cfg = dict(CFG, negatives=0.5, negative_weight=2.0)
    paper = disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False, out_dir=tmp_path,
                        config=NADConfig(mode="paper", **cfg))
    batched = disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False,
                          config=NADConfig(mode="batched", tasks_per_step=3, **cfg))
    for p, b in zip(paper.logits, batched.logits):
        torch.testing.assert_close(b, p, rtol=1e-4, atol=1e-4)
    plain = disentangle(Network(model, ["1", "4"], "cnn"), images, progress=False, config=NADConfig(**CFG))
    assert not torch.allclose(plain.logits[0], paper.logits[0])  # the negatives changed the gates
    log = json.loads((tmp_path / "log.json").read_text())["epochs"]
    assert len(log[-1]["negative"]) == 3  # the negative term's per-task means are logged


def test_selective_settings_are_checked_and_recorded(tmp_path):
    images = colour_images(per_class=8)
    with pytest.raises(ValueError, match="covers every class"):
        disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False,
                    tasks=[Task("all", (0, 1, 2))], config=NADConfig(**CFG, **SELECTIVE))
    # A bank written before the selective settings existed resumes as the paper's objective.
    disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False, out_dir=tmp_path,
                config=NADConfig(**{**CFG, "epochs": 1}))
    bank = MaskBank.load(tmp_path / "masks.safetensors")
    assert bank.config["negatives"] == 0 and bank.config["negative_weight"] == 0
    del bank.config["negatives"], bank.config["negative_weight"]
    bank.save(tmp_path / "masks.safetensors")
    assert disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False, out_dir=tmp_path,
                       resume=True, config=NADConfig(**CFG)).epoch == 2
    with pytest.raises(ValueError, match="other settings.*negatives"):
        disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False, out_dir=tmp_path,
                    resume=True, config=NADConfig(**{**CFG, "epochs": 3}, **SELECTIVE))


# ----------------------------------------------------------------------------------------------
# How the gates are trained: soft (the paper's), annealed, straight-through


def test_annealed_gates_follow_their_schedule_and_are_recorded(tmp_path, monkeypatch):
    from nad_ext.gates import describe_objective
    from nad_ext.gates.model import GatedModel
    from nad_ext.training.config import gate_temperature

    cfg = NADConfig(**{**CFG, "epochs": 3}, gate="annealed", gate_temperature=0.04)
    assert [round(gate_temperature(cfg, e), 6) for e in range(3)] == [1.0, 0.2, 0.04]
    assert gate_temperature(NADConfig(**CFG), 1) == 1.0
    seen = []
    original = GatedModel.set_temperature
    monkeypatch.setattr(GatedModel, "set_temperature", lambda self, t: (seen.append(round(t, 6)), original(self, t)))
    images = colour_images(per_class=8)
    bank = disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False, out_dir=tmp_path,
                       config=cfg)
    assert seen == [1.0, 0.2, 0.04]
    assert bank.config["gate"] == "annealed" and bank.config["gate_temperature"] == 0.04
    assert describe_objective(bank.config) == "paper, gates annealed to temperature 0.04"
    assert describe_objective({**bank.config, "gate": "straight_through"}) == "paper, straight-through gates"
    assert describe_objective({}) == "paper"
    with pytest.raises(ValueError, match="other settings.*gate"):
        disentangle(Network(KnownChannels(), ["feat"], "known"), images, progress=False, out_dir=tmp_path,
                    resume=True, config=NADConfig(**{**CFG, "epochs": 4}))


def test_annealed_gates_still_find_known_channels():
    bank = disentangle(Network(KnownChannels(), ["feat"], "known"), colour_images(per_class=48), progress=False,
                       config=NADConfig(beta=2.0, epochs=21, image_size=16, gate="annealed"))
    for c in range(3):
        assert bank.binary()[c].nonzero().flatten().tolist() == [2 * c, 2 * c + 1]


def test_paper_mode_trains_only_soft_gates():
    with pytest.raises(ValueError, match="mode='paper' trains the paper's soft gates"):
        disentangle(Network(KnownChannels(), ["feat"], "known"), colour_images(per_class=4), progress=False,
                    config=NADConfig(**CFG, mode="paper", gate="annealed"))


# ----------------------------------------------------------------------------------------------
# Which samples count: a run on images the network partly misclassifies, against the paper's
# objective computed independently


def mislabelled_colours(per_class=32):
    """colour_images with every third image of each class relabelled as the next class: each
    task then holds images that the network (fitted on the clean labels) classifies correctly
    and images it gets wrong (they show another class's colour)."""
    clean = colour_images(per_class=per_class)
    labels = [(c + 1) % 3 if i % 3 == 2 else c for i, c in enumerate(clean.labels)]
    return clean, ImageSet(clean.classes, labels, "colours-mislabelled", images=clean._images)


def authors_small_cnn(model, x, gates):
    """small_cnn with the authors' masks (sigmoid(m) * x) after its ReLUs 1 and 4; returns the
    logits and the two masks' outputs (as their hooks record them)."""
    a1 = gates[0][None, :, None, None] * model[1](model[0](x))
    a4 = gates[1][None, :, None, None] * model[4](model[3](model[2](a1)))
    return model[7](model[6](model[5](a4))), [a1, a4]


def authors_loop(model, steps, initial, beta, lr):
    """findpath.py's loop on the recorded steps, one task at a time: per step and task, K = the
    samples the original network classifies correctly (the step is skipped when K is empty);
    loss = (CE over the batch + sum_l MSE(mask_l(x_K), orig_l(x_K))) / L + beta * sum_l
    mean(sigmoid(m_l)^2) / L; m_l <- m_l - lr * F.normalize(grad_l). Returns the gates and
    each task's per-step (sum of the MSEs, whether the step counted)."""
    logits = [m.clone().double() for m in initial]
    model = copy.deepcopy(model).double()
    mses = {t: [] for t in range(len(initial[0]))}
    for x, labels, task_ids in steps:
        for t in task_ids.unique().tolist():
            sel = task_ids == t
            xs, ys = x[sel].double(), labels[sel]
            with torch.no_grad():
                orig_class, orig_acts = authors_small_cnn(model, xs, [torch.ones_like(m[t]) for m in logits])
            m = [layer[t].clone().requires_grad_() for layer in logits]
            mask_class, mask_acts = authors_small_cnn(model, xs, [torch.sigmoid(v) for v in m])
            index = (orig_class.argmax(1) == ys).nonzero()
            if len(index) == 0:
                mses[t].append((0.0, False))
                continue
            mse = sum(F.mse_loss(a[index], o[index]) for a, o in zip(mask_acts, orig_acts))
            loss = (F.cross_entropy(mask_class, ys) + mse) / 2 + beta * sum(torch.sigmoid(v).pow(2).mean() for v in m) / 2
            grads = torch.autograd.grad(loss, m)
            for layer, v, g in zip(logits, m, grads):
                layer[t] = v.detach() - lr * F.normalize(g.view(1, -1)).view(-1)
            mses[t].append((float(mse.detach()), True))
    return logits, mses


@pytest.mark.parametrize("mode", ["paper", "batched"])
def test_a_run_on_misclassified_images_counts_only_the_correct_ones(mode, tmp_path, monkeypatch):
    """End to end: the gates a run learns on a task whose images the network partly gets wrong,
    and its log.json's per-task MSE, equal findpath.py's loop on the same batches (recorded as
    the trainer steps), where only the correctly classified samples enter the MSE term."""
    from nad_ext.training import loop

    clean, images = mislabelled_colours()
    model = fit_small_cnn(clean)
    steps, initial = [], []
    original_step = loop.train_step

    def recording_step(gated, x, labels, task_ids, tasks, config, task_classes=None):
        if not initial:
            initial.extend(m.detach().clone() for m in gated.logits)
        steps.append((x.clone(), labels.clone(), task_ids.clone()))
        return original_step(gated, x, labels, task_ids, tasks, config, task_classes)

    monkeypatch.setattr(loop, "train_step", recording_step)
    config = NADConfig(beta=1.0, epochs=2, image_size=16, batch_size=16, mode=mode, tasks_per_step=3)
    bank = disentangle(Network(model, ["1", "4"], "cnn"), images, config=config, out_dir=tmp_path, progress=False)
    # the network gets some of every task's images wrong, and some right
    with torch.no_grad():
        correct = torch.cat([model(x).argmax(1) == y for x, y, _ in steps])
    assert 0.4 < correct.float().mean() < 0.9
    expected, mses = authors_loop(model, steps, initial, beta=1.0, lr=0.1)
    for ours, theirs in zip(bank.logits, expected):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)
    log = json.loads((tmp_path / "log.json").read_text())["epochs"]
    for epoch, entry in enumerate(log):
        for t in range(3):
            per_epoch = len(mses[t]) // len(log)  # the task's batches in an epoch
            counted = [v for v, ok in mses[t][epoch * per_epoch:(epoch + 1) * per_epoch] if ok]
            assert entry["mse"][t] == pytest.approx(sum(counted) / len(counted), rel=1e-5)
