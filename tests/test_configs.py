"""Every option of every config group composes, resolves, passes the value checks and builds; struct
mode rejects typos.

Groups are discovered from the folders of conf/, and each primary config (train.yaml, and
evaluate.yaml when it exists) is tested with the groups named in its own defaults list, so a
new option or group is covered without editing this file.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import CONF_DIR, compose_config, plain_config
from hydra.errors import ConfigCompositionException
from in_process import run_here
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationToMissingValueError
from torch import nn

from byol.core.optim import OPTIMIZERS, build_optimizer, build_schedule, param_groups
from byol.jobs.build import LOGGERS, build_byol, build_trainer, loss_mode, make_loggers, progress_bar_on
from byol.jobs.config_check import check_config

PRIMARY = [name for name in ("train", "evaluate") if (CONF_DIR / f"{name}.yaml").is_file()]
GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))


def default_groups(config_name: str) -> set[str]:
    """Group names in a primary config's defaults list (``- loss: classic``, ``- optional x: y``...)."""
    defaults = yaml.safe_load((CONF_DIR / f"{config_name}.yaml").read_text()).get("defaults", [])
    groups = set()
    for entry in defaults:
        if isinstance(entry, dict):
            for key in entry:
                groups.add(key.split()[-1].split("@")[0].strip("/"))
    return groups


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


CASES = [(c, g, o) for c in PRIMARY for g in GROUPS if g in default_groups(c) for o in options(g)]


def resolve_every_value(cfg, path: str = "") -> None:
    """Resolve each leaf; only interpolations of a value the user must give (``???``) may stay open."""
    items = cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else enumerate(cfg)
    for key, _ in items:
        full = f"{path}.{key}" if path else str(key)
        if OmegaConf.is_missing(cfg, key):
            continue
        try:
            value = cfg[key]
        except InterpolationToMissingValueError:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            resolve_every_value(value, full)


def test_primary_configs_found():
    assert "train" in PRIMARY
    assert {"backbone", "loss", "data", "optim", "trainer", "logger", "experiment"} <= default_groups("train")


def test_every_group_with_options_is_used():
    used = set().union(*(default_groups(c) for c in PRIMARY))
    orphans = [g for g in GROUPS if options(g) and g not in used]
    assert not orphans, f"config groups no primary config lists in its defaults: {orphans}"


@pytest.mark.parametrize(("config_name", "group", "option"), CASES, ids=[f"{c}-{g}={o}" for c, g, o in CASES])
def test_every_option_composes(tmp_path, config_name, group, option):
    cfg = compose_config(config_name, [f"{group}={option}"], tmp_path)
    with pytest.raises(Exception):  # noqa: B017 -- struct mode: any error type, as long as it is refused
        cfg.no_such_key = 1
    cfg_without_hydra = cfg.copy()
    with open_dict(cfg_without_hydra):
        del cfg_without_hydra["hydra"]
    resolve_every_value(cfg_without_hydra)
    if group != "experiment":  # an experiment may override any group's choice
        chosen = cfg.hydra.runtime.choices[group]
        assert chosen == option


def test_train_resolves_completely(tmp_path):
    cfg = plain_config(compose_config("train", [], tmp_path))
    text = OmegaConf.to_yaml(OmegaConf.create(cfg))
    assert "${" not in text and "_target_" not in text  # plain values only: nothing names code


@pytest.mark.parametrize(("config_name", "group", "option"), CASES, ids=[f"{c}-{g}={o}" for c, g, o in CASES])
def test_every_option_passes_the_value_checks(tmp_path, config_name, group, option):
    check_config(plain_config(compose_config(config_name, [f"{group}={option}"], tmp_path)))


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_builds(tmp_path, option):
    cfg = plain_config(compose_config("train", [f"trainer={option}", "trainer.max_epochs=3"], tmp_path))
    trainer = build_trainer(cfg["trainer"], logger=False, enable_checkpointing=False,
                            default_root_dir=str(tmp_path))
    assert isinstance(trainer, pl.Trainer)
    assert trainer.max_epochs == 3
    assert trainer.accumulate_grad_batches == cfg["trainer"]["accumulate_grad_batches"]


class _Console:
    def __init__(self, terminal: bool):
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_by_default_only_in_a_terminal(tmp_path, monkeypatch, terminal):
    """trainer.enable_progress_bar null (the default) draws the bar in a terminal and leaves log files, SLURM
    output and pipes free of it; true and false are kept as given."""
    monkeypatch.setattr("sys.stderr", _Console(terminal))
    cfg = plain_config(compose_config("train", ["trainer.max_epochs=1"], tmp_path))
    assert cfg["trainer"]["enable_progress_bar"] is None
    trainer = build_trainer(cfg["trainer"], logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    assert (trainer.progress_bar_callback is not None) == terminal
    assert progress_bar_on(None) == terminal and progress_bar_on(True) and not progress_bar_on(False)
    forced = build_trainer({**cfg["trainer"], "enable_progress_bar": True}, logger=False, enable_checkpointing=False,
                           default_root_dir=str(tmp_path))
    assert forced.progress_bar_callback is not None


@pytest.mark.parametrize("option", options("logger"))
def test_logger_builds(tmp_path, option):
    cfg = plain_config(compose_config("train", [f"logger={option}"], tmp_path))
    if option in LOGGERS:
        pytest.importorskip(LOGGERS[option][2])
    loggers = make_loggers(cfg["logger"], tmp_path)
    assert all(isinstance(logger, pl.loggers.Logger) for logger in loggers)
    assert [type(logger).__name__ for logger in loggers[1:]] == ([LOGGERS[option][1]] if option in LOGGERS else [])
    assert all(str(tmp_path) in str(logger.save_dir) for logger in loggers)


@pytest.mark.parametrize("option", options("optim"))
def test_optimizer_and_scheduler_build(tmp_path, option):
    """As BYOLModule.configure_optimizers does: the optimizer and schedule by name, warm-up in epochs."""
    cfg = plain_config(compose_config("train", [f"optim={option}"], tmp_path))["optim"]
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = build_optimizer(cfg["name"], param_groups([net], cfg["weight_decay"]), cfg["base_lr"],
                                cfg["optimizer"])
    assert type(optimizer) is OPTIMIZERS[cfg["name"]]
    assert [g["lr"] for g in optimizer.param_groups] == [cfg["base_lr"], cfg["base_lr"]]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg["weight_decay"], 0.0]
    sched = dict(cfg["scheduler"])
    warmup = 2 if sched.pop("warmup_epochs") else 0
    scheduler = build_schedule(sched.pop("name"), optimizer, 10, warmup, sched)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    net(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("override", ["foo=1", "data.foo=1", "loss.weight=2", "optim.optimizer.lr_typo=1"])
def test_unknown_keys_are_rejected(tmp_path, override):
    with pytest.raises(ConfigCompositionException):
        compose_config("train", [override], tmp_path)


@pytest.mark.parametrize("data", options("data"))
def test_keys_scripts_rely_on_exist(tmp_path, data):
    cfg = compose_config("train", [f"data={data}"], tmp_path)
    for key in ("root", "batch_size", "subset"):
        assert key in cfg.data.keys(), f"data={data} lacks data.{key}"  # `in` alone is False for ???
    for key in ("trainer.max_epochs", "seed", "loss.taps", "backbone.name", "backbone.stem"):
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None, key
    overrides = ["data.root=/somewhere", "data.batch_size=64", "data.subset=100", "trainer.max_epochs=3",
                 "seed=5", "loss.taps=[layer3.0]", "backbone.name=resnet50", "backbone.stem=imagenet"]
    cfg = compose_config("train", [f"data={data}", *overrides], tmp_path)
    assert (cfg.data.root, cfg.data.batch_size, cfg.data.subset) == ("/somewhere", 64, 100)
    assert (cfg.trainer.max_epochs, cfg.seed, list(cfg.loss.taps)) == (3, 5, ["layer3.0"])
    assert (cfg.backbone.name, cfg.backbone.stem) == ("resnet50", "imagenet")


def test_loss_options_name_their_taps(tmp_path):
    classic = compose_config("train", ["loss=classic"], tmp_path).loss
    multi = compose_config("train", ["loss=multi"], tmp_path).loss
    assert list(classic.taps) == [] and loss_mode(classic) == "classic"
    assert list(multi.taps) == ["layer2.0", "layer3.0"] and loss_mode(multi) == "multi"
    # every head weighs 1.0 unless given: no default weight names a head, so other taps need no other weights
    assert dict(multi.weights) == {} == dict(classic.weights)
    other_taps = compose_config("train", ["loss=multi", "loss.taps=[layer3.0]"], tmp_path)
    assert build_byol(OmegaConf.to_container(other_taps)).heads == ["avgpool", "layer3.0"]


def test_original_experiment_is_the_original_implementation(tmp_path):
    cfg = compose_config("train", ["experiment=original"], tmp_path)
    assert (cfg.backbone.name, cfg.backbone.stem) == ("resnet18", "imagenet")
    assert cfg.optim.name == "adam" and cfg.optim.base_lr == 3e-4
    assert not cfg.optim.scale_lr_with_batch
    assert (cfg.ema.tau_base, cfg.ema.tau_schedule) == (0.99, "constant")
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (2048, 1000)
    assert sorted(cfg.loss.taps) == ["layer2.0", "layer3.0"]


def test_smoke_experiment_is_tiny(tmp_path):
    cfg = compose_config("train", ["experiment=smoke"], tmp_path)
    assert cfg.data.name == "synthetic" and cfg.data.num_train <= 256
    assert cfg.head.proj_hidden_dim <= 256 and cfg.trainer.max_epochs <= 2


@pytest.mark.parametrize("config_name", PRIMARY)
def test_help_lists_this_entry_points_groups_and_their_options(config_name):
    """``--help`` names the groups of this entry point's defaults list, each with every option in conf/,
    and no group of the other entry point."""
    template = yaml.safe_load((CONF_DIR / f"{config_name}.yaml").read_text())["hydra"]["help"]["template"]
    listed = {line.split(":")[0]: line.split(": ")[1].split(", ") for line in template.splitlines()
              if ": " in line and line.split(":")[0] in GROUPS}
    assert listed == {g: options(g) for g in default_groups(config_name)}


def test_evaluate_help_shows_only_the_settings_an_evaluation_takes():
    """``python evaluate.py --help`` listed trainer.max_epochs, data.batch_size and trainer.accumulate_grad_batches,
    which evaluate.py refuses: they are left out of its config and named once with the key that does their job."""

    from conftest import ROOT

    from byol.jobs.evaluation_help import NOT_FOR_EVALUATION

    out = run_here(str(ROOT / "evaluate.py"), "--help").stdout
    shown = yaml.safe_load(out.split("== Config (override any key: key=value; unknown keys are refused) ==\n")[1])
    for key in NOT_FOR_EVALUATION:
        parent, _, leaf = key.partition(".")
        assert leaf not in shown[parent], key
        assert f"{key} (use {NOT_FOR_EVALUATION[key]})" in out.splitlines()[-1]
    assert shown["eval"]["epochs"] and shown["trainer"]["precision"] and shown["data"]["name"] == "cifar10"
    assert "backbone:  # pretrained=random only" in out


def test_trainer_strategy_devices_and_nodes_need_no_plus(tmp_path):
    cfg = compose_config("train", ["trainer.strategy=ddp", "trainer.devices=2", "trainer.num_nodes=2"], tmp_path)
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", 2, 2)
