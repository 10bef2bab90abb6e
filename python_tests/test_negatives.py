import pytest
import torch

from nad_ext.training.negatives import add_negatives, draw_negatives, negatives_per_batch, task_class_matrix


def test_negatives_are_uniform_over_the_other_images_and_seeded():
    own = [0, 1, 5, 6, 7, 12]
    drawn = draw_negatives(own, 14, 16_000, torch.Generator().manual_seed(0))
    others = [i for i in range(14) if i not in own]
    counts = torch.bincount(torch.tensor(drawn), minlength=14)
    assert counts[own].sum() == 0
    assert torch.all((counts[others] - 2000).abs() < 200)  # 8 images x 2000 expected, sd ~42
    assert draw_negatives(own, 14, 50, torch.Generator().manual_seed(3)) == \
        draw_negatives(own, 14, 50, torch.Generator().manual_seed(3))


def test_each_batch_gets_round_r_times_its_length():
    assert [negatives_per_batch(16, r) for r in (0.25, 0.5, 1.0, 1 / 32, 0.03)] == [4, 8, 16, 1, 0]
    batches = [[3, 1, 2, 0], [5, 4], [6]]
    gen = torch.Generator().manual_seed(1)
    out = add_negatives(batches, list(range(7)), 20, 0.5, gen)
    assert [b[: len(a)] for a, b in zip(batches, out)] == batches
    assert [len(b) - len(a) for a, b in zip(batches, out)] == [2, 1, 1]  # 2.0, 1.0, 0.5 rounded up
    assert all(i >= 7 for b in out for i in b[-1:])


def test_a_task_with_every_image_has_no_negatives():
    with pytest.raises(ValueError, match="no other classes"):
        draw_negatives([0, 1, 2], 3, 4, torch.Generator())


def test_task_class_matrix():
    m = task_class_matrix([(0,), (1, 3)], 4)
    assert m.tolist() == [[True, False, False, False], [False, True, False, True]]
