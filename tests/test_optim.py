"""LARS against hand-computed steps (with and without clip_lr), parameter grouping, the
learning-rate schedules, and the GPU recipe's optimizer (experiment=cifar10)."""

import math
import re

import pytest
import torch
from torch import nn

from byol.core.errors import ConfigError
from byol.core.optim import LARS, build_optimizer, check_optimizer_options, constant, param_groups, warmup_cosine

LR, MOMENTUM, ETA, WD = 0.5, 0.9, 0.02, 0.1


def test_lars_matches_hand_computed_steps():
    """trust ratio = eta ||w|| / (||g|| + wd ||w||), applied to g + wd w, then SGD momentum."""
    w = nn.Parameter(torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64))  # ||w|| = 5
    g = torch.tensor([[0.3, 0.0], [0.4, 0.0]], dtype=torch.float64)  # ||g|| = 0.5
    opt = LARS([w], lr=LR, momentum=MOMENTUM, weight_decay=WD, eta=ETA, eps=0.0)

    # step 1 by hand: ratio = 0.02 * 5 / (0.5 + 0.1 * 5) = 0.1
    # update = 0.1 * (g + 0.1 w) = [[0.04, 0.02], [0.06, 0.04]]; w -= 0.5 * update
    w.grad = g.clone()
    opt.step()
    expected1 = torch.tensor([[0.98, 1.99], [1.97, 3.98]], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), expected1, rtol=0, atol=1e-12)

    # step 2: the momentum buffer carries step 1's update
    buf1 = torch.tensor([[0.04, 0.02], [0.06, 0.04]], dtype=torch.float64)
    w_norm = math.sqrt(sum(v * v for v in (0.98, 1.99, 1.97, 3.98)))
    ratio2 = ETA * w_norm / (0.5 + WD * w_norm)
    buf2 = MOMENTUM * buf1 + ratio2 * (g + WD * expected1)
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), expected1 - LR * buf2, rtol=0, atol=1e-12)


def test_lars_zero_weight_gets_plain_sgd_step():
    """A zero-norm tensor has no scale to trust: ratio 1 instead of 0 (it would never move)."""
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    w.grad = torch.full((2, 2), 0.5, dtype=torch.float64)
    LARS([w], lr=LR, momentum=MOMENTUM, weight_decay=WD, eta=ETA).step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -LR * 0.5, dtype=torch.float64))


def _bias_under_lars_and_sgd(**lars_options):
    """Three steps of LARS (with ``lars_options``) and of plain SGD with momentum on the same bias
    gradients: (LARS-trained net, SGD-trained reference, the bias before)."""
    torch.manual_seed(0)
    net, reference = nn.Linear(3, 2), nn.Linear(3, 2)
    reference.load_state_dict(net.state_dict())
    # LARS defaults carry a weight decay; the excluded group's own 0.0 must win
    lars = LARS(param_groups([net], weight_decay=0.5), lr=LR, momentum=MOMENTUM, weight_decay=0.5, eta=ETA,
                **lars_options)
    sgd = torch.optim.SGD([reference.bias], lr=LR, momentum=MOMENTUM)
    start = net.bias.detach().clone()
    for step in range(3):
        grad = torch.randn(2, generator=torch.Generator().manual_seed(step))
        net.bias.grad, reference.bias.grad = grad.clone(), grad.clone()
        lars.step()
        sgd.step()
    return net, reference, start


def test_excluded_group_is_sgd_with_momentum_without_weight_decay():
    net, reference, start = _bias_under_lars_and_sgd()
    torch.testing.assert_close(net.bias.detach(), reference.bias.detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(net.bias.detach(), start)  # it moved


def _clip_example():
    """Two weight tensors in one group: ratio 0.1 (||w|| 5, ||g|| 0.5) and ratio 0.02 (||w|| 1, ||g|| 0.9)."""
    a = nn.Parameter(torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([[0.6, 0.0], [0.0, 0.8]], dtype=torch.float64))
    ga = torch.tensor([[0.3, 0.0], [0.4, 0.0]], dtype=torch.float64)
    gb = torch.tensor([[0.0, 0.9], [0.0, 0.0]], dtype=torch.float64)
    return a, b, ga, gb


@pytest.mark.parametrize("lr", [0.05, 0.5])
def test_clip_lr_caps_each_tensors_rate_at_lr(lr):
    """clip_lr (solo-learn's rule): scale = min(ratio / lr, 1), so the step is lr x min(ratio / lr, 1)
    x (g + wd w) = min(ratio, lr) x (g + wd w): the ratio is the tensor's own rate, capped at lr (not
    lr x ratio as without the option). Ratios by hand: a: 0.02 * 5 / (0.5 + 0.1 * 5) = 0.1;
    b: 0.02 * 1 / (0.9 + 0.1 * 1) = 0.02. At lr 0.05 a is capped (rate 0.05), b is not (0.02); at
    lr 0.5 neither is (rates 0.1 and 0.02)."""
    a, b, ga, gb = _clip_example()
    start_a, start_b = a.detach().clone(), b.detach().clone()
    opt = LARS([a, b], lr=lr, momentum=MOMENTUM, weight_decay=WD, eta=ETA, eps=0.0, clip_lr=True)
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    rate_a, rate_b = {0.05: (0.05, 0.02), 0.5: (0.1, 0.02)}[lr]  # min(ratio, lr), written out
    torch.testing.assert_close(a.detach(), start_a - rate_a * (ga + WD * start_a), rtol=0, atol=1e-12)
    torch.testing.assert_close(b.detach(), start_b - rate_b * (gb + WD * start_b), rtol=0, atol=1e-12)

    # step 2: the buffer holds step 1's scaled update; the new one is scaled by the new norms' ratio
    buf_a = (rate_a / lr) * (ga + WD * start_a)
    w1 = a.detach().clone()
    ratio2 = ETA * w1.norm().item() / (0.5 + WD * w1.norm().item())
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    buf_a = MOMENTUM * buf_a + min(ratio2 / lr, 1.0) * (ga + WD * w1)
    torch.testing.assert_close(a.detach(), w1 - lr * buf_a, rtol=0, atol=1e-12)


def test_clip_lr_off_is_the_unclipped_rule():
    """Without clip_lr (the default) the rate is lr x ratio: 0.05 x 0.1 = 0.005 for a (clip_lr: 0.05)."""
    a, b, ga, gb = _clip_example()
    start = a.detach().clone()
    opt = LARS([a, b], lr=0.05, momentum=MOMENTUM, weight_decay=WD, eta=ETA, eps=0.0)
    assert opt.defaults["clip_lr"] is False
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    torch.testing.assert_close(a.detach(), start - 0.05 * 0.1 * (ga + WD * start), rtol=0, atol=1e-12)


def test_clip_lr_leaves_excluded_groups_and_zero_norms_alone():
    """Biases/norm parameters (lars_exclude) stay SGD with momentum; a zero-norm tensor gets the plain
    lr step as without clip_lr; lr 0 (the end of a cosine) moves nothing and makes no NaN."""
    net, reference, _ = _bias_under_lars_and_sgd(clip_lr=True)
    torch.testing.assert_close(net.bias.detach(), reference.bias.detach(), rtol=0, atol=1e-6)

    zero = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    zero.grad = torch.full((2, 2), 0.5, dtype=torch.float64)
    LARS([zero], lr=LR, momentum=MOMENTUM, weight_decay=WD, eta=ETA, clip_lr=True).step()
    torch.testing.assert_close(zero.detach(), torch.full((2, 2), -LR * 0.5, dtype=torch.float64))

    a, _, ga, _ = _clip_example()
    start = a.detach().clone()
    opt = LARS([a], lr=0.0, momentum=MOMENTUM, weight_decay=WD, eta=ETA, clip_lr=True)
    a.grad = ga.clone()
    opt.step()
    assert torch.equal(a.detach(), start)
    assert torch.isfinite(opt.state[a]["momentum_buffer"]).all()


def test_optimizer_state_saved_before_clip_lr_loads_unclipped():
    """A checkpoint's optimizer state from before the option (no clip_lr key) steps as before."""
    a, _, ga, _ = _clip_example()
    start = a.detach().clone()
    opt = LARS([a], lr=0.05, momentum=MOMENTUM, weight_decay=WD, eta=ETA, eps=0.0)
    state = opt.state_dict()
    del state["param_groups"][0]["clip_lr"]
    opt.load_state_dict(state)
    a.grad = ga.clone()
    opt.step()
    torch.testing.assert_close(a.detach(), start - 0.05 * 0.1 * (ga + WD * start), rtol=0, atol=1e-12)


def test_cifar10_recipe_builds_lars_with_clip_lr(tmp_path):
    """experiment=cifar10: solo-learn's BYOL CIFAR recipe, through the config and the builder."""
    from conftest import compose_config, plain_config

    from byol.jobs.config_check import check_config

    cfg = plain_config(compose_config("train", ["experiment=cifar10", "loss=multi"], tmp_path))
    check_config(cfg)
    optim = cfg["optim"]
    assert (optim["name"], optim["base_lr"], optim["scale_lr_with_batch"], optim["weight_decay"]) == (
        "lars", 1.0, True, 1e-5)
    assert optim["optimizer"] == {"momentum": 0.9, "eta": 0.02, "clip_lr": True}
    assert optim["scheduler"] == {"name": "warmup_cosine", "warmup_epochs": 10}
    assert (cfg["backbone"]["name"], cfg["backbone"]["stem"], cfg["data"]["batch_size"]) == ("resnet18", "cifar", 256)
    head = cfg["head"]
    assert (head["proj_hidden_dim"], head["proj_dim"], head["pred_hidden_dim"]) == (4096, 256, 4096)
    assert (cfg["ema"]["tau_base"], cfg["ema"]["tau_schedule"]) == (0.99, "cosine")
    assert cfg["augment"]["blur_p"] == 0.0
    assert (cfg["augment"]["view1"]["solarize_p"], cfg["augment"]["view2"]["solarize_p"]) == (0.0, 0.2)
    assert cfg["trainer"]["precision"] == "auto" and cfg["trainer"]["max_epochs"] == 200  # bf16-mixed on a GPU
    assert cfg["loss"]["taps"] == ["layer2.0", "layer3.0"]  # the loss stays a free axis
    net = nn.Linear(3, 2)
    opt = build_optimizer(optim["name"], param_groups([net], optim["weight_decay"]), 1.0, optim["optimizer"])
    assert isinstance(opt, LARS)
    assert [g["clip_lr"] for g in opt.param_groups] == [True, True]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-5, 0.0]


def test_param_groups_put_one_dimensional_params_in_the_excluded_group():
    conv, bn, fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    decay, excluded = param_groups([nn.Sequential(conv, bn), fc, frozen], weight_decay=1e-5)
    assert {id(p) for p in decay["params"]} == {id(conv.weight), id(fc.weight)}
    assert {id(p) for p in excluded["params"]} == {id(conv.bias), id(bn.weight), id(bn.bias), id(fc.bias)}
    assert decay["weight_decay"] == 1e-5 and not decay.get("lars_exclude", False)
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True


def learning_rates(make_scheduler, steps: int, lr: float = 2.0) -> list[float]:
    """The learning rate in force at optimizer steps 0..steps (one scheduler step per optimizer step)."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_warmup_cosine_shape():
    total, warmup, lr = 25, 5, 2.0
    lrs = learning_rates(lambda o: warmup_cosine(o, total_steps=total, warmup_steps=warmup), total, lr)
    # linear warm-up reaching the full rate at its last step
    assert lrs[:warmup] == pytest.approx([lr * (k + 1) / warmup for k in range(warmup)])
    # then half a cosine: full rate, half at the midpoint, 0 at the end
    assert lrs[warmup] == pytest.approx(lr)
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx(lr / 2)
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    for k in range(warmup, total + 1):
        assert lrs[k] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))))
    assert all(b < a for a, b in zip(lrs[warmup:], lrs[warmup + 1:], strict=False))


def test_warmup_cosine_without_warmup_starts_at_full_rate():
    lrs = learning_rates(lambda o: warmup_cosine(o, total_steps=10), 10)
    assert lrs[0] == pytest.approx(2.0) and lrs[10] == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_after_warmup():
    lrs = learning_rates(lambda o: constant(o, total_steps=10, warmup_steps=4), 10)
    assert lrs == pytest.approx([0.5, 1.0, 1.5] + [2.0] * 8)


@pytest.mark.parametrize("clip_lr", [False, True])
def test_lars_leaves_a_tensor_without_gradient_undecayed(clip_lr):
    """A zero gradient (a head whose loss weight is 0) gets no weight decay: the tensor keeps its values over
    many steps, while one with a gradient in the same group is decayed (g + wd w, scaled by its ratio)."""
    idle = nn.Parameter(torch.full((3, 3), 2.0, dtype=torch.float64))
    busy = nn.Parameter(torch.full((3, 3), 2.0, dtype=torch.float64))
    opt = LARS([idle, busy], lr=LR, momentum=MOMENTUM, weight_decay=WD, eta=ETA, eps=0.0, clip_lr=clip_lr)
    idle.grad = torch.zeros(3, 3, dtype=torch.float64)
    busy.grad = torch.full((3, 3), 0.1, dtype=torch.float64)
    w, g = busy.detach().clone(), busy.grad.clone()
    ratio = ETA * w.norm() / (g.norm() + WD * w.norm())
    expected = w - LR * (min(ratio / LR, 1.0) if clip_lr else ratio) * (g + WD * w)
    opt.step()
    torch.testing.assert_close(busy.detach(), expected, rtol=0, atol=1e-12)
    for _ in range(200):
        idle.grad = torch.zeros(3, 3, dtype=torch.float64)
        opt.step()
    assert torch.equal(idle.detach(), torch.full((3, 3), 2.0, dtype=torch.float64))


@pytest.mark.parametrize(("name", "options", "refusal"), [
    ("lars", {"eta": "abc"}, "option 'eta' must be a number, not 'abc'"),  # failed inside the first step
    ("lars", {"clip_lr": "abc"}, "option 'clip_lr' must be true or false, not 'abc'"),  # was bool("abc"): on
    ("lars", {"clip_lr": 1}, "option 'clip_lr' must be true or false, not 1"),
    ("sgd", {"nesterov": "yes"}, "option 'nesterov' must be true or false"),
    ("adam", {"betas": [0.9]}, "option 'betas' must be a list of 2 numbers, not [0.9]"),
    ("adam", {"eps": True}, "option 'eps' must be a number, not True"),
])
def test_an_optimizer_option_of_the_wrong_kind_is_refused(name, options, refusal):
    net = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        build_optimizer(name, param_groups([net], 0.0), 0.1, options)
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        check_optimizer_options(name, options)
    fine = {"eta": 0.02, "clip_lr": True, "nesterov": False, "betas": [0.9, 0.99], "eps": 1e-6}
    build_optimizer(name, param_groups([net], 0.0), 0.1, {k: fine[k] for k in options})  # the right kinds pass


@pytest.mark.parametrize(("name", "options", "refusal"), [
    ("sgd", {"momentum": 0, "nesterov": True}, "Nesterov momentum requires a momentum and zero dampening"),
])
def test_optimizer_values_torch_refuses_are_refused_by_the_check(name, options, refusal):
    """Values of the right kind that the optimizer itself refuses (eval.optimizer.momentum=0 with the default
    nesterov) were a ValueError traceback after the data and the model were loaded, and an evaluation folder's
    earlier result was set aside for a failed one: the check builds the optimizer over one number first."""
    with pytest.raises(ConfigError, match=re.escape(f"optimizer '{name}' refuses its settings")) as err:
        check_optimizer_options(name, options)
    assert refusal in str(err.value)
    fine = {"momentum": 0.9, "nesterov": True, "weight_decay": 0, "betas": [0.9, 0.99], "eps": 1e-8}
    check_optimizer_options(name, {k: fine[k] for k in options})  # the same keys with values it takes pass


@pytest.mark.parametrize(("override", "refusal"), [
    ("optim.optimizer.momentum=abc", "optim.optimizer.momentum must be a number, not 'abc' (the test)"),
    ("optim.optimizer.eta=abc", "optim.optimizer.eta must be a number, not 'abc' (the test)"),
])
def test_the_config_check_refuses_optimizer_options_of_the_wrong_kind(tmp_path, override, refusal):
    """In the config's check, before the run folder is made (a string momentum was a TypeError traceback there,
    from a checkpoint's config on resume as from the command line)."""
    from conftest import compose_config, plain_config

    from byol.jobs.config_check import check_config

    container = plain_config(compose_config("train", ["experiment=smoke", override], tmp_path))
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        check_config(container, "the test")


@pytest.mark.parametrize(("override", "refusal"), [
    ("optim=lars optim.optimizer.eta=-1", "optim.optimizer.eta must be above 0, not -1: LARS's trust coefficient; 0 "
                                          "freezes the weights, below 0 climbs the loss (the test)"),
    ("optim=lars optim.optimizer.eta=0", "optim.optimizer.eta must be above 0"),
    ("optim=lars +optim.optimizer.eps=-1", "optim.optimizer.eps must be zero or more, not -1: a small number that "
                                           "keeps a division finite (the test)"),
    ("optim=lars optim.optimizer.momentum=1", "optim.optimizer.momentum must lie in [0, 1)"),
    ("optim=sgd optim.optimizer.momentum=nan", "optim.optimizer.momentum must lie in [0, 1)"),
    ("optim=sgd +optim.optimizer.dampening=-1", "optim.optimizer.dampening must lie in [0, 1]"),
    ("optim=sgd +optim.optimizer.weight_decay=-5", "optim.optimizer.weight_decay must be zero or more"),
    ("optim=sgd +optim.optimizer.maximize=true", "optim.optimizer.maximize must be false: it climbs the loss"),
    ("optim=adam +optim.optimizer.eps=inf", "optim.optimizer.eps must be zero or more"),
    ("optim=adam +optim.optimizer.betas=[0.9,1.5]", "optim.optimizer.betas must lie in [0, 1), not [0.9, 1.5]: Adam's "
                                                    "averaging factors, each"),
    ("+optim.scheduler.final_ratio=2", "optim.scheduler.final_ratio must lie in [0, 1]"),
    ("+optim.scheduler.final_rati=0", "optim.scheduler: schedule 'warmup_cosine' takes no option 'final_rati'; "
                                      "it takes: final_ratio (the test)"),
])
def test_optimizer_and_schedule_options_out_of_range_are_one_line(tmp_path, override, refusal):
    """A value of the right kind outside the range that means something: LARS's eta=-1 trained to "done" with a
    rising loss (torch checks some of SGD's and Adam's values, LARS none); said before the run folder is made."""
    from conftest import compose_config, plain_config

    from byol.jobs.config_check import check_config

    container = plain_config(compose_config("train", ["experiment=smoke", *override.split()], tmp_path))
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        check_config(container, "the test")


def test_every_numeric_optimizer_option_of_the_configs_has_a_range():
    """The class of the gap: every number an optimizer of conf/optim or conf/eval takes is refused when it is NaN
    or negative, for each optimizer, as the config gives it and as LARS is called directly."""
    import yaml

    from byol.core.optim import OPTION_RANGES
    from byol.jobs.config_check import CONF_DIR

    checked = set()
    for path in [*sorted((CONF_DIR / "optim").glob("*.yaml")), *sorted((CONF_DIR / "eval").glob("*.yaml"))]:
        node = yaml.safe_load(path.read_text())
        options = dict(node.get("optimizer") or {})
        name = node["name"] if path.parent.name == "optim" else options.pop("name", None)
        for key, value in options.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            assert key in OPTION_RANGES, f"{path.name}: optimizer.{key} has no range"
            for bad in (math.nan, -1.0):
                with pytest.raises(ConfigError, match=re.escape(f"option '{key}' must")):
                    check_optimizer_options(name, {**options, key: bad})
            checked.add((name, key))
    assert {("lars", "eta"), ("lars", "momentum"), ("sgd", "momentum")} <= checked
    for key in ("momentum", "weight_decay", "eta", "eps"):  # LARS called directly refuses them as torch's do
        with pytest.raises(ValueError, match=f"LARS {key} must"):
            LARS([torch.zeros(1, requires_grad=True)], lr=0.1, **{key: -1.0})
