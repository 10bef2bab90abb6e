import pytest
import torch
import torch.nn.functional as F

from nad_ext.training.objective import nad_loss, normalized_gradient_step


def paper_loss_one_task(out, labels, masked_acts, original_acts, correct, logits_t, beta):
    """METHOD.md's loss for a batch holding one task's samples only, written plainly."""
    L = len(logits_t)
    ce = F.cross_entropy(out, labels)
    mse = sum(F.mse_loss(m[correct], o[correct]) for m, o in zip(masked_acts, original_acts))
    sparse = sum(torch.sigmoid(m).pow(2).mean() for m in logits_t) / L
    return (ce + mse) / L + beta * sparse


def random_batch(n=12, tasks=3, classes=5):
    torch.manual_seed(1)
    task_ids = torch.randint(0, tasks, (n,))
    task_ids[:tasks] = torch.arange(tasks)
    logits = [torch.randn(tasks, 4, requires_grad=True), torch.randn(tasks, 6, requires_grad=True)]
    out = torch.randn(n, classes, requires_grad=True)
    masked = [torch.randn(n, 4, 3, 3, requires_grad=True), torch.randn(n, 6, requires_grad=True)]
    original = [torch.randn(n, 4, 3, 3), torch.randn(n, 6)]
    labels = torch.randint(0, classes, (n,))
    correct = torch.rand(n) > 0.4
    return out, labels, masked, original, correct, task_ids, logits


def test_per_task_terms_match_the_paper_formula():
    out, labels, masked, original, correct, task_ids, logits = random_batch()
    terms = nad_loss(out, labels, masked, original, correct, task_ids, logits, beta=0.7)
    for t in range(3):
        sel = task_ids == t
        if not correct[sel].any():
            assert not terms.counted[t]
            continue
        expected = paper_loss_one_task(out[sel], labels[sel], [m[sel] for m in masked],
                                       [o[sel] for o in original], correct[sel], [m[t] for m in logits], 0.7)
        torch.testing.assert_close(terms.loss[t], expected)
        assert terms.counted[t]


def test_gradient_of_the_sum_is_each_tasks_own_gradient():
    """With respect to the gates and to every sample's activations and logits (where the choice
    of the correct samples shows: the MSE's gradient is zero on the others)."""
    out, labels, masked, original, correct, task_ids, logits = random_batch()
    correct = torch.arange(len(task_ids)) % 2 == 0  # every task: correct and wrong samples
    assert all(correct[task_ids == t].any() and not correct[task_ids == t].all() for t in range(3))
    terms = nad_loss(out, labels, masked, original, correct, task_ids, logits, beta=0.3)
    inputs = logits + masked + [out]
    grads = torch.autograd.grad(terms.total, inputs)
    assert all((g[~correct] == 0).all() and (g[correct] != 0).any() for g in grads[2:4])
    for t in range(3):
        sel = task_ids == t
        own = paper_loss_one_task(out[sel], labels[sel], [m[sel] for m in masked],
                                  [o[sel] for o in original], correct[sel], [m[t] for m in logits], 0.3)
        own_grads = torch.autograd.grad(own, inputs)
        for g, g_own in zip(grads[:2], own_grads[:2]):
            torch.testing.assert_close(g[t], g_own[t])
        for g, g_own in zip(grads[2:], own_grads[2:]):
            torch.testing.assert_close(g[sel], g_own[sel])


def test_tasks_with_no_correct_sample_are_skipped():
    out, labels, masked, original, correct, task_ids, logits = random_batch()
    correct[task_ids == 1] = False
    correct[task_ids != 1] = True
    terms = nad_loss(out, labels, masked, original, correct, task_ids, logits, beta=1.0)
    assert terms.counted.tolist() == [True, False, True]
    grads = torch.autograd.grad(terms.total, logits)
    assert all(torch.all(g[1] == 0) for g in grads)


def test_normalized_gradient_step_moves_each_task_and_point_by_lr():
    logits = [torch.randn(3, 5, requires_grad=True), torch.randn(3, 2, requires_grad=True)]
    before = [m.detach().clone() for m in logits]
    (logits[0][0].pow(2).sum() * 7 + logits[1][0].sum() + logits[0][2].sum()).backward()
    normalized_gradient_step(logits, torch.tensor([0, 2]), lr=0.1)
    for m, b in zip(logits, before):
        moved = (m.detach() - b).norm(dim=1)
        assert torch.all(moved[1] == 0)  # task 1 not in the step
    torch.testing.assert_close((logits[0].detach()[0] - before[0][0]).norm(), torch.tensor(0.1))
    torch.testing.assert_close((logits[1].detach()[0] - before[1][0]).norm(), torch.tensor(0.1))
    torch.testing.assert_close(logits[1].detach()[2], before[1][2])  # zero gradient: unchanged
    g = 14 * before[0][0]
    torch.testing.assert_close(logits[0].detach()[0], before[0][0] - 0.1 * g / g.norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_layouts_with_channels_last_give_the_mse_over_all_elements(dtype):
    """Tokens (N, L, C), NHWC maps, head outputs (N, L, heads, d) and channels_last maps (each
    read in place by nad::gate_mse, see objective._sample_rows): the MSE term is the mean
    over all of a sample's elements, as in the paper's formula, whatever the channel axis."""
    torch.manual_seed(2)
    n, tasks = 10, 3
    task_ids = torch.arange(n) % tasks
    shapes_axes = [((n, 7, 5), 2), ((n, 3, 4, 6), 3), ((n, 7, 2, 4), 2), ((n, 6, 3, 3), 1), ((n, 4, 3, 2), 1)]
    logits = [torch.randn(tasks, s[a], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          requires_grad=True) for s, a in shapes_axes]
    # The last map is channels_last (a conv output under bf16 training).
    fmt = [torch.contiguous_format] * 4 + [torch.channels_last]
    masked = [torch.randn(s, dtype=torch.float64).to(dtype, memory_format=f).requires_grad_()
              for (s, _), f in zip(shapes_axes, fmt)]
    original = [torch.randn(s, dtype=torch.float64).to(dtype, memory_format=f) for (s, _), f in zip(shapes_axes, fmt)]
    out = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (n,))
    correct = torch.arange(n) // 3 % 2 == 0  # samples 0-2, 6-8: every task has correct and wrong ones
    assert all(correct[task_ids == t].any() and not correct[task_ids == t].all() for t in range(tasks))
    terms = nad_loss(out, labels, masked, original, correct, task_ids, logits, 0.5,
                     channel_axes=[a for _, a in shapes_axes])
    grads = torch.autograd.grad(terms.total, masked)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)  # bf16 inputs, float32 sums
    for t in range(tasks):
        sel = task_ids == t
        keep = correct & sel
        expected = sum(F.mse_loss(m[keep].double(), o[keep].double()) for m, o in zip(masked, original))
        torch.testing.assert_close(terms.mse[t].double(), expected.detach(), **tol)
    for g, m, o in zip(grads, masked, original):
        k = torch.zeros(tasks).index_add_(0, task_ids, correct.float())[task_ids]
        per = m[0].numel() * len(masked)  # L_act = (CE + sum of the MSEs) / L
        ref = 2 * (m.double() - o.double()) * (correct.double() / (k.double() * per)).view(-1, *[1] * (m.dim() - 1))
        torch.testing.assert_close(g.double(), ref.detach(), **({} if dtype == torch.float64 else
                                                                dict(rtol=2e-2, atol=1e-4)))


@pytest.mark.parametrize("shape, axis, crop", [((6, 5, 4), 2, False), ((6, 2, 3, 4), 3, False),
                                              ((6, 4, 4, 3, 2), 3, True)])
def test_gradcheck_of_the_mse_views_of_token_nhwc_and_strided_head_layouts(shape, axis, crop):
    """The (N, C, ...) views nad_loss hands to nad::gate_mse (tokens, NHWC, cropped Swin heads):
    float64 gradcheck and the pure-PyTorch reference. (The loss itself sums in float32, so
    gradcheck runs on its MSE term.)"""
    from nad_ext.ops import gate_mse, gate_mse_reference

    torch.manual_seed(4)
    task_ids = torch.arange(6) % 2
    correct = torch.tensor([True, True, False, True, True, True])
    masked = torch.randn(shape, dtype=torch.float64)
    masked = masked[:, :3, :3] if crop else masked
    original = torch.randn_like(masked)
    term = lambda m: gate_mse(m.movedim(axis, 1), original.movedim(axis, 1), correct, task_ids, 2)  # noqa: E731
    m = masked.clone().requires_grad_()
    torch.autograd.gradcheck(term, (m,))
    torch.testing.assert_close(term(m), gate_mse_reference(masked.movedim(axis, 1), original.movedim(axis, 1),
                                                           correct, task_ids, 2))


# ----------------------------------------------------------------------------------------------
# The selective variant


def selective_loss_one_task(out, labels, masked_acts, original_acts, correct, negative, classes_t, logits_t,
                            beta, gamma):
    """The selective loss for one task's samples, written plainly: the paper's terms on the
    own-class samples, plus gamma * mean over the negatives of -log(1 - p_t), inside the 1/L."""
    L = len(logits_t)
    own = ~negative
    ce = F.cross_entropy(out[own], labels[own])
    k = correct & own
    mse = sum(F.mse_loss(m[k], o[k]) for m, o in zip(masked_acts, original_acts))
    p_t = out[negative].softmax(dim=1)[:, classes_t].sum(dim=1)
    neg = -torch.log1p(-p_t).mean() if negative.any() else out.sum() * 0
    sparse = sum(torch.sigmoid(m).pow(2).mean() for m in logits_t) / L
    return (ce + gamma * neg + mse) / L + beta * sparse


def selective_batch():
    out, labels, masked, original, correct, task_ids, logits = random_batch(n=24)
    # task t owns classes {t} (t = 0, 1) and {2, 3} (t = 2); class 4 belongs to no task
    task_classes = torch.zeros(3, 5, dtype=torch.bool)
    task_classes[0, 0] = task_classes[1, 1] = task_classes[2, 2] = task_classes[2, 3] = True
    gen = torch.Generator().manual_seed(5)
    negative = torch.rand(24, generator=gen) < 0.4
    negative[:3] = False  # every task keeps an own-class sample
    for n in range(24):  # own-class samples get one of their task's classes as label, negatives another
        t = int(task_ids[n])
        choices = task_classes[t].nonzero().flatten() if not negative[n] else (~task_classes[t]).nonzero().flatten()
        labels[n] = choices[torch.randint(len(choices), (1,), generator=gen)]
    correct[:3] = True
    return out, labels, masked, original, correct, task_ids, logits, negative, task_classes


def test_selective_terms_match_the_plain_formula_and_the_gradient_stays_per_task():
    out, labels, masked, original, correct, task_ids, logits, negative, task_classes = selective_batch()
    out = (out * 4).detach().requires_grad_()  # confident logits: p_t near 1 on some negatives
    terms = nad_loss(out, labels, masked, original, correct, task_ids, logits, beta=0.4,
                     negative=negative, task_classes=task_classes, negative_weight=2.5)
    grads = torch.autograd.grad(terms.total, logits + [out])
    for t in range(3):
        sel = task_ids == t
        classes_t = task_classes[t].nonzero().flatten()
        expected = selective_loss_one_task(out[sel], labels[sel], [m[sel] for m in masked], [o[sel] for o in original],
                                           correct[sel], negative[sel], classes_t, [m[t] for m in logits], 0.4, 2.5)
        torch.testing.assert_close(terms.loss[t], expected)
        own_grads = torch.autograd.grad(expected, logits)
        for g, g_own in zip(grads, own_grads):
            torch.testing.assert_close(g[t], g_own[t])
    assert terms.counted.all() and torch.isfinite(grads[-1]).all()
    # The negatives enter no other term: without the negative term, the loss is the paper's on
    # the own-class samples alone.
    own = ~negative
    plain = nad_loss(out[own], labels[own], [m[own] for m in masked], [o[own] for o in original], correct[own],
                     task_ids[own], logits, beta=0.4)
    torch.testing.assert_close(terms.loss - 2.5 * terms.negative / len(logits), plain.loss)


def test_selective_counted_tasks_need_a_correct_own_class_sample():
    out, labels, masked, original, correct, task_ids, logits, negative, task_classes = selective_batch()
    correct[:] = True
    correct[(task_ids == 1) & ~negative] = False  # task 1: only its negatives are "correct"
    terms = nad_loss(out, labels, masked, original, correct, task_ids, logits, beta=1.0,
                     negative=negative, task_classes=task_classes, negative_weight=1.0)
    assert terms.counted.tolist() == [True, False, True]
    grads = torch.autograd.grad(terms.total, logits)
    assert all(torch.all(g[1] == 0) for g in grads)


def test_negative_term_is_stable_when_the_task_takes_all_the_probability():
    out = torch.tensor([[80.0, -80.0, -80.0], [0.0, 0.0, 0.0]], requires_grad=True)
    task_ids = torch.tensor([0, 0])
    negative = torch.tensor([True, True])
    task_classes = torch.tensor([[True, False, False]])
    from nad_ext.training.objective import negative_term

    value = negative_term(out, task_ids, negative, task_classes, 1)
    # -log(1 - p) for p = 1 / (1 + 2 e^-160) is 160 - log 2 (float32 softmax would give inf)
    expected = ((160 - torch.log(torch.tensor(2.0))) + torch.log(torch.tensor(1.5))) / 2
    torch.testing.assert_close(value[0], expected)
    value.sum().backward()
    assert torch.isfinite(out.grad).all()
