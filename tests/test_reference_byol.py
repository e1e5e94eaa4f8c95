"""benchmarks/reference_byol.py: the independent BYOL loop that our pipeline's accuracy is checked against."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from byol.core.checkpoint import load_encoder
from tests.conftest import class_folders

ROOT = Path(__file__).resolve().parents[1]
TINY = ["head.proj_hidden_dim=16", "head.pred_hidden_dim=16", "head.proj_dim=8", "data.batch_size=8"]


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref():
    return load_benchmark("reference_byol")


def test_pair_loss_is_two_minus_two_cosine_and_leaves_the_target_without_gradient(ref):
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], requires_grad=True)
    z = torch.tensor([[2.0, 0.0], [0.0, -1.0], [0.0, 5.0]], requires_grad=True)
    loss = ref.pair_loss(p, z)
    assert loss.item() == pytest.approx((0 + 4 + 2) / 3)
    loss.backward()
    assert p.grad is not None and z.grad is None


def test_learning_rate_warms_up_linearly_then_follows_a_half_cosine_to_zero(ref):
    peak, warmup, total = 0.5, 4, 24
    assert [ref.lr_at(s, peak, warmup, total) for s in range(4)] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert ref.lr_at(warmup, peak, warmup, total) == pytest.approx(peak)
    assert ref.lr_at(14, peak, warmup, total) == pytest.approx(peak / 2)  # half way through the cosine
    assert ref.lr_at(19, peak, warmup, total) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert ref.lr_at(total, peak, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert ref.lr_at(total + 5, peak, warmup, total) == pytest.approx(0.0, abs=1e-12)  # past a cut schedule


def test_views_take_the_recipe_values_and_each_image_its_own_draws(ref):
    cfg = ref.settings([])
    aug = cfg["augment"]
    first, second = (ref.view_transform(aug, aug[f"view{i}"] or {}, 32, cfg["data"]["mean"], cfg["data"]["std"])
                     for i in (1, 2))
    names = [type(t).__name__ for t in second.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale", "RandomSolarize",
                     "ToTensor", "Normalize"]
    assert "RandomSolarize" not in [type(t).__name__ for t in first.transforms]  # view 1: solarize_p 0
    crop = second.transforms[0]
    assert crop.scale == tuple(aug["crop_scale"]) == (0.2, 1.0)  # experiment=cpu's crops
    assert second.transforms[4].p == aug["view2"]["solarize_p"] == 0.2
    image = Image.new("RGB", (32, 32), (200, 40, 90))
    image.putpixel((3, 3), (0, 0, 0))
    torch.manual_seed(0)
    a, b = ref.TwoViews(first, second)(image)
    assert a.shape == b.shape == (3, 32, 32) and not torch.equal(a, b)


def test_a_short_run_writes_an_encoder_our_evaluation_loads_and_trains_it(ref, tmp_path):
    data = tmp_path / "data"
    class_folders(data / "train", per_class=8, size=32, classes=("a", "b"))
    out = tmp_path / "out"
    overrides = [arg for kv in TINY for arg in ("--set", kv)]
    ref.main(["--data", str(data), "--out", str(out), "--workers", "0", "--max-steps", "2", *overrides])

    encoder, meta = load_encoder(out / "encoder.pt")
    assert encoder.config["width"] == 0.25 and encoder.config["stem"] == "imagenet"  # experiment=cpu's network
    assert encoder.config["grids"] == {"layer2.0": 4, "layer3.0": 2}  # repr=combined pools as for our runs
    assert meta["global_step"] == 2 and meta["reference"] == "benchmarks/reference_byol.py"
    torch.manual_seed(0)
    untrained = ref.Encoder("resnet18", "imagenet", width=0.25)  # the loop's first draw after seeding with 0
    assert untrained.state_dict().keys() == encoder.state_dict().keys()
    changed = [k for k, v in encoder.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, untrained.state_dict()[k])]
    assert "body.conv1.weight" in changed  # two SGD steps moved the first layer
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,loss,seconds" and rows[1].startswith("1,2,")
    assert 0 < float(rows[1].split(",")[2]) <= 8  # the symmetric loss, two terms in [0, 4]


@pytest.mark.parametrize("clip", [False, True])
def test_its_lars_written_apart_takes_the_same_steps_as_ours(ref, clip):
    """Two implementations of one rule agree (weights, a zero weight, biases excluded), so an A/B of the GPU
    recipe's optimizer compares like with like."""
    from byol.core.optim import LARS, param_groups

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    with torch.no_grad():
        net[2].weight[0].zero_()  # a row at zero: its tensor still has a norm
    twin, start = copy.deepcopy(net), copy.deepcopy(net)
    ours = LARS(param_groups([net], 1e-2), lr=0.7, momentum=0.9, eta=0.02, clip_lr=clip)
    theirs = ref.Lars([{"params": [p for p in twin.parameters() if p.ndim > 1], "weight_decay": 1e-2},
                       {"params": [p for p in twin.parameters() if p.ndim <= 1], "plain": True}],
                      lr=0.7, momentum=0.9, eta=0.02, clip=clip)
    for step in range(4):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((net, ours), (twin, theirs)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(net[0].weight, start[0].weight) and not torch.allclose(net[1].bias, start[1].bias)


def test_its_cosine_tau_is_ours_from_the_base_to_one(ref):
    from byol.core.ema import tau_at

    total = 11
    taus = [ref.tau_for(step, total, 0.99, "cosine") for step in range(total)]
    assert taus[0] == pytest.approx(0.99) and taus[-1] == pytest.approx(1.0) and taus[5] == pytest.approx(0.995)
    assert taus == pytest.approx([tau_at(step, total - 1, 0.99, "cosine") for step in range(total)])
    assert ref.tau_for(7, total, 0.96, "constant") == 0.96


def test_the_gpu_recipes_optimizer_and_ema_run_in_the_loop(ref, tmp_path):
    data = tmp_path / "data"
    class_folders(data / "train", per_class=8, size=32, classes=("a", "b"))
    overrides = [arg for kv in (*TINY, "optim=lars", "optim.optimizer.clip_lr=true", "ema.tau_schedule=cosine")
                 for arg in ("--set", kv)]
    ref.main(["--data", str(data), "--out", str(tmp_path / "out"), "--workers", "0", "--max-steps", "2", *overrides])
    assert load_encoder(tmp_path / "out" / "encoder.pt")[1]["global_step"] == 2


@pytest.mark.parametrize("override, words", [("optim=adam", "sgd and lars only"),
                                             ("ema.tau_schedule=linear", "constant and cosine")])
def test_settings_the_loop_does_not_implement_are_refused(ref, tmp_path, override, words, capsys):
    data = tmp_path / "data"
    class_folders(data / "train", per_class=2, size=32)
    with pytest.raises(SystemExit):
        ref.main(["--data", str(data), "--out", str(tmp_path / "out"), "--workers", "0", "--set", override, *(
            arg for kv in TINY for arg in ("--set", kv))])
    assert words in capsys.readouterr().err


def test_max_seconds_stops_at_the_end_of_an_epoch_and_still_writes_the_encoder(ref, tmp_path, capsys):
    """A lent machine's time limit: rather than be killed mid-epoch with nothing written, the loop ends the epoch
    after which another would pass --max-seconds, and its export says how many epochs it holds."""
    data = tmp_path / "data"
    class_folders(data / "train", per_class=8, size=32, classes=("a", "b"))
    overrides = [arg for kv in (*TINY, "trainer.max_epochs=5") for arg in ("--set", kv)]
    ref.main(["--data", str(data), "--out", str(tmp_path / "out"), "--workers", "0", "--max-seconds", "0.001",
              *overrides])
    meta = load_encoder(tmp_path / "out" / "encoder.pt")[1]
    assert (meta["epochs"], meta["global_step"]) == (1, 2)  # 16 images, batch 8: 2 steps an epoch
    assert "stopped after 1 of 5 epochs: another would pass --max-seconds 0.001" in capsys.readouterr().out
    assert len((tmp_path / "out" / "log.csv").read_text().splitlines()) == 2  # the header and epoch 1


# ----------------------------------------------------------------------------- benchmarks/compare_ab.py


def _results(folder: Path, seed: int, test_acc, repr_="avgpool", eval_="knn") -> None:
    job = folder / f"{repr_}_{eval_}"
    job.mkdir(parents=True)
    (job / "results.json").write_text(json.dumps({"repr": repr_, "eval": eval_, "seed": seed, "test_acc": test_acc}))


@pytest.fixture(scope="module")
def compare():
    return load_benchmark("compare_ab")


def test_compare_ab_pairs_the_two_sides_by_seed_with_both_t_tests(tmp_path, compare, capsys):
    a, b = [], []
    for seed, (x, y) in enumerate(((0.50, 0.40), (0.60, 0.45), (0.70, 0.65))):
        _results(tmp_path / f"a{seed}", seed, x), _results(tmp_path / f"b{seed}", seed, y)
        a.append(str(tmp_path / f"a{seed}")), b.append(str(tmp_path / f"b{seed}"))
    _results(tmp_path / "a0", 0, None, eval_="linear")  # a missing result pairs with nothing
    compare.main(["--a", *a, "--b", *b, "--names", "ours", "ref", "--out", str(tmp_path / "t.md")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| avgpool")]
    assert (tmp_path / "t.md").read_text().splitlines()[2] == rows[0]
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    # differences 10, 15, 5 points: mean 10, sd 5, t = 2 sqrt(3) on 2 df, p = 1 - t / sqrt(t^2 + 2) = 0.0742;
    # Welch: 60 +- 10 against 50 +- 13.23, t = 10 / sqrt(275 / 3) = 1.044 on 3.72 df, p 0.36
    assert cells[:7] == ["avgpool", "knn", "60.00 ± 10.00", "50.00 ± 13.23", "+10.00, +15.00, +5.00", "0 1 2", "+10.00"]
    assert float(cells[7]) == pytest.approx(0.36, abs=0.005) and float(cells[8]) == pytest.approx(0.07, abs=0.005)
    assert len(rows) == 1  # linear has no result on side b


def test_compare_ab_refuses_a_seed_twice_on_one_side_and_an_empty_folder(tmp_path, compare):
    _results(tmp_path / "a0", 0, 0.5), _results(tmp_path / "a1", 0, 0.6), _results(tmp_path / "b0", 0, 0.4)
    with pytest.raises(SystemExit, match="seed 0 twice for avgpool/knn"):
        compare.main(["--a", str(tmp_path / "a0"), str(tmp_path / "a1"), "--b", str(tmp_path / "b0")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no results.json below"):
        compare.main(["--a", str(tmp_path / "empty"), "--b", str(tmp_path / "b0")])
