"""Values of byol/core code added since the last audit of these folders, for mutants of it that the suite let
through: schedules read at a negative offset, progress lines at their boundaries, digests of more than one
chunk or of the wrong shape, splits in place that are not a permutation or carry digests, rows of a decode
that skipped a file, the cached-digest spot check, infinities in weights, optimizer step counts, width 16,
strided convolutions the centre-tap guard must leave alone, and non-square crops antialiased per axis."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn

from byol.core.augment import crop_and_flip
from byol.core.backbone import MAX_WIDTH, guard_strided_convs, stage_widths, width_fits
from byol.core.data import DIGEST_BYTES, ImageTensors, digest_tensor, image_digests, split_in_place
from byol.core.disk_images import DamagedCacheError, checked_digests
from byol.core.image_folder import load_image_folder
from byol.core.optim import LARS, constant, read_schedule_at_offset, warmup_cosine
from byol.core.progress import Progress, duration
from byol.core.state_check import _optimizer_value_problem, nonfinite_problem


def rates(scheduler, steps: int) -> list[float]:
    return [scheduler.lr_lambdas[0](s) for s in range(steps)]


def test_a_schedule_read_at_an_offset_gives_at_step_s_what_it_gave_at_s_less_the_offset():
    """Positive (epochs cut into fewer steps) and negative (into more steps: step 4 of 8-step epochs resumed as
    the end of the first of 4-step ones) offsets alike; 0 leaves the schedule alone."""
    param = nn.Parameter(torch.zeros(1))
    plain = rates(warmup_cosine(torch.optim.SGD([param], lr=1.0), total_steps=20, warmup_steps=3), 20)
    for offset in (2, -4, 0):
        scheduler = warmup_cosine(torch.optim.SGD([param], lr=1.0), total_steps=20, warmup_steps=3)
        read_schedule_at_offset(scheduler, offset)
        shifted = rates(scheduler, 20)
        assert all(shifted[s] == plain[s - offset] for s in range(max(0, offset), min(20, 20 + offset)))
    held = constant(torch.optim.SGD([param], lr=1.0), warmup_steps=4)
    read_schedule_at_offset(held, -2)
    assert rates(held, 3) == [0.75, 1.0, 1.0]  # steps 2, 3, 4 of the warm-up


def test_a_lars_group_left_out_of_the_trust_ratio_is_sgd_with_its_weight_decay():
    """lars_exclude: plain SGD with momentum, weight decay included when the group has some."""
    weights = torch.linspace(-1, 1, 6)
    ours, ref = nn.Parameter(weights.clone()), nn.Parameter(weights.clone())
    lars = LARS([{"params": [ours], "lars_exclude": True}], lr=0.1, momentum=0.9, weight_decay=0.5)
    sgd = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.5)
    for step in range(3):
        for p, opt in ((ours, lars), (ref, sgd)):
            p.grad = torch.full((6,), 0.1 * step)
            opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-7)
    assert not torch.equal(ours.detach(), weights)


def test_a_progress_line_comes_when_exactly_every_seconds_have_passed(capsys):
    clock = iter([0.0, 30.0, 45.0, 60.0])
    progress = Progress(100, every=30, clock=lambda: next(clock))
    for done in (10, 20, 30):
        progress.update(done)
    assert [line.split(":")[1].split(" images")[0] for line in capsys.readouterr().out.splitlines()] == [
        " 10 of 100", " 30 of 100"]


def test_durations_switch_unit_at_90_seconds_and_90_minutes():
    assert [duration(s) for s in (89.4, 90, 3599, 4000, 5399, 5400)] == [
        "89 s", "2 min", "60 min", "67 min", "90 min", "1.5 h"]


def test_digests_of_more_than_one_chunk_are_one_per_image():
    """4,096 images are hashed at a time: the 4,097th is the next chunk's first."""
    images = torch.arange(4097 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(4097, 3, 1, 1)
    images[-1] = 7
    data = ImageTensors(images, torch.zeros(4097, dtype=torch.long))
    digests = image_digests(data)
    assert len(digests) == 4097 and digests[-1] == hashlib.sha256(bytes([7, 7, 7])).digest()
    assert digests[4095] == hashlib.sha256(images[4095].numpy().tobytes()).digest()


def test_kept_digests_of_another_shape_are_computed_again():
    images = torch.randint(0, 256, (3, 3, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ImageTensors(images, torch.zeros(3, dtype=torch.long))
    want = image_digests(data)
    for wrong in (torch.zeros(2, DIGEST_BYTES, dtype=torch.uint8), torch.zeros(3, 16, dtype=torch.uint8)):
        data.digests = wrong
        assert image_digests(data) == want


def _dataset(n: int, seed: int) -> ImageTensors:
    generator = torch.Generator().manual_seed(seed)
    data = ImageTensors(torch.randint(0, 256, (n, 3, 2, 2), dtype=torch.uint8, generator=generator),
                        torch.randint(0, 5, (n,), generator=generator), ("a",))
    data.digests = digest_tensor(data)
    return data


def test_split_in_place_carries_each_parts_digests_as_subset_does():
    data = _dataset(11, 1)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(2))
    want = [data.subset(perm[:4]), data.subset(perm[4:])]
    for got, part in zip(split_in_place(data, perm[:4], perm[4:]), want, strict=True):
        assert torch.equal(got.images, part.images) and torch.equal(got.labels, part.labels)
        assert torch.equal(got.digests, part.digests) and got.digests.shape == (len(part), DIGEST_BYTES)


def test_parts_that_leave_rows_out_are_split_by_copy_and_the_data_kept():
    """Not a permutation (a subset of the rows): nothing is reordered in place."""
    data = _dataset(9, 3)
    images = data.images.clone()
    first, second = torch.tensor([5, 1]), torch.tensor([8, 0, 3])
    got = split_in_place(data, first, second)
    assert torch.equal(data.images, images)
    assert torch.equal(got[0].images, images[first]) and torch.equal(got[1].images, images[second])
    assert torch.equal(got[1].digests, digest_tensor(ImageTensors(images[second], data.labels[second])))


def test_an_unreadable_file_skipped_leaves_the_others_pixels_in_their_rows(tmp_path):
    """The first file of the folder is skipped: every row after it moves up one, with its label."""
    colours = {"a": [10, 20], "b": [30]}
    for cls, values in colours.items():
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i, v in enumerate(values):
            Image.fromarray(np.full((4, 4, 3), v, np.uint8)).save(tmp_path / "images" / cls / f"{i + 1}.png")
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_image_folder(tmp_path / "images", 4, skip_bad_files=True, workers=1)
    assert data.images[:, 0, 0, 0].tolist() == [10, 20, 30] and data.labels.tolist() == [0, 0, 1]
    assert torch.equal(data.digests, digest_tensor(ImageTensors(data.images, data.labels)))


def test_the_digest_spot_check_reaches_the_last_rows_of_a_large_cache():
    """64 rows spread over the whole file: a digest edited near the end is found too."""
    data = _dataset(200, 4)
    data.digests[199, 0] ^= 1
    with pytest.raises(DamagedCacheError, match="do not match the digests kept with them"):
        checked_digests(data, Path("cache.pt"))
    good = _dataset(200, 4)
    assert torch.equal(checked_digests(good, Path("cache.pt")).digests, digest_tensor(good))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_one_infinity_among_finite_weights_is_found(bad):
    weights = torch.linspace(-1, 1, 12).reshape(3, 4)
    weights[1, 2] = bad
    assert nonfinite_problem(weights, "w") == "w holds NaN or infinite values (1 of 12)"
    assert nonfinite_problem(weights.to(torch.bfloat16), "w") is not None


def test_an_optimizer_step_count_of_whole_numbers_beside_float_weights_is_a_count():
    """A scalar is a count (step), whatever its kind of number; a buffer of the weight's shape must be float."""
    param = torch.zeros(3, 2)
    assert _optimizer_value_problem(torch.tensor(5), param, "state[0].step") is None
    assert _optimizer_value_problem(torch.tensor(5.0), param, "state[0].step") is None
    assert "is integer (torch.int64)" in _optimizer_value_problem(torch.zeros(3, 2, dtype=torch.long), param, "m")


def test_width_16_is_the_largest_accepted():
    assert MAX_WIDTH == 16 and width_fits(16) and width_fits(16.0) and not width_fits(16.01)
    assert stage_widths(16) == [1024, 2048, 4096, 8192]


def test_the_centre_tap_guard_leaves_even_kernels_alone():
    """An even kernel with padding k // 2 and a stride of 1 along one axis gives a 1x2 output of a 1x1 input:
    the centre tap alone would give 1x1."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=(2, 1), padding=1)
    x = torch.randn(1, 2, 1, 1)
    want = conv(x)
    guarded = nn.Sequential(conv)
    guard_strided_convs(guarded)
    assert type(guarded[0]) is nn.Conv2d and want.shape == (1, 3, 1, 2)
    assert torch.equal(guarded(x), want)


def test_non_square_crops_are_antialiased_along_each_axis_as_torchvision():
    """A crop shrunk along one axis and enlarged along the other is blurred along the shrunk one alone, by
    its own factor there (plain bilinear, or the factors swapped: errors of 0.08-0.16 against torchvision)."""
    side, out = 96, 32
    x = torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(1))
    boxes = [(30, 0, 16, 96), (0, 40, 96, 16), (10, 4, 24, 80), (4, 20, 80, 24)]  # top, left, height, width
    crop = torch.tensor([[w / side, h / side, (left + w / 2) / side, (top + h / 2) / side]
                         for top, left, h, w in boxes])
    ours = crop_and_flip(x, crop, torch.zeros(4, dtype=torch.bool), out)
    ref = torch.stack([TF.resized_crop(x[i], top, left, h, w, [out, out], antialias=True)
                       for i, (top, left, h, w) in enumerate(boxes)])
    assert (ours - ref).abs().mean(dim=(1, 2, 3)).max().item() < 0.04
