"""config_check's bounds at their edges and the shapes a file's config may not hold, value by value."""

from __future__ import annotations

import copy
import math

import pytest
from conftest import compose_config, plain_config

from byol.core.errors import ConfigError
from byol.jobs.config_check import check_config, check_file_config


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return plain_config(compose_config("train", ["experiment=smoke"], tmp_path_factory.mktemp("cfg")))


def changed(config: dict, dotted: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return config


@pytest.mark.parametrize("seed", [0, 1, 2 ** 32 - 1])
def test_every_seed_torch_and_numpy_take_is_accepted(smoke, seed):
    check_config(changed(smoke, "seed", seed))


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 1.5])
def test_seeds_outside_0_to_2_32_minus_1_are_refused(smoke, seed):
    with pytest.raises(ConfigError) as err:
        check_config(changed(smoke, "seed", seed), "src")
    assert str(err.value) == f"seed must be a whole number from 0 to 4294967295, not {seed!r} (src)"


@pytest.mark.parametrize("key,value,bound", [
    ("optim.base_lr", 0.0, "positive"), ("backbone.width", 0, "positive"),
    ("optim.base_lr", math.inf, "positive"), ("optim.base_lr", math.nan, "positive"),
    ("optim.weight_decay", math.inf, "zero or more"), ("optim.weight_decay", -1e-6, "zero or more"),
])
def test_a_rate_must_be_finite_and_positive_where_zero_means_nothing(smoke, key, value, bound):
    with pytest.raises(ConfigError) as err:
        check_config(changed(smoke, key, value), "src")
    assert str(err.value) == f"{key} must be {bound}, not {value!r} (src)"


def test_zero_is_fine_where_zero_means_none(smoke):
    check_config(changed(changed(smoke, "optim.weight_decay", 0.0), "optim.scheduler.warmup_epochs", 0))


def test_a_setting_this_project_does_not_have_is_refused_on_the_command_line_and_dropped_from_a_file(smoke):
    """+data.bach_size=64 composes (the + adds it); it would be ignored while the run trains at the default."""
    typo = changed(smoke, "data.bach_size", 64)
    with pytest.raises(ConfigError) as err:
        check_config(typo, "the command line")
    assert str(err.value) == ("refusing the command line: data.bach_size = 64 is not a setting of this project "
                              "(see conf/)")
    assert "bach_size" not in check_file_config(typo, "old checkpoint")["data"]  # a file's old keys are dropped


@pytest.mark.parametrize("value", ["abc", [1.0], None, True])
def test_a_per_tap_loss_weight_must_be_a_number(smoke, value):
    config = changed(smoke, "loss.weights", {"layer2.0": value})
    for check in (lambda: check_config(config, "src"), lambda: check_file_config(config, "src")):
        with pytest.raises(ConfigError) as err:
            check()
        assert str(err.value) == f"refusing src: loss.weights.layer2.0 = {value!r} must be a number"
    assert check_file_config(changed(smoke, "loss.weights", {"layer2.0": 0.5}), "src")["loss"]["weights"] == \
        {"layer2.0": 0.5}


@pytest.mark.parametrize("value,kind", [(b"x", "bytes"), ({1, 2}, "set"), (complex(1, 2), "complex")])
def test_a_files_config_holds_plain_values_only(smoke, value, kind):
    """Keyword-argument dicts (trainer, optimizer) take any plain value: anything else is refused by its kind."""
    with pytest.raises(ConfigError) as err:
        check_file_config(changed(smoke, "optim.optimizer.eta", value), "checkpoint 'x.ckpt'")
    assert str(err.value).startswith(f"refusing checkpoint 'x.ckpt': optim.optimizer.eta = {value!r} is a {kind}, "
                                     f"not a plain value")


def test_a_files_config_has_string_keys_only(smoke):
    config = changed(smoke, "optim.optimizer", {**smoke["optim"]["optimizer"], 1: 0.9})
    with pytest.raises(ConfigError) as err:
        check_file_config(config, "src")
    assert str(err.value) == "refusing src: optim.optimizer = 1 has a key that is not a string"


@pytest.mark.parametrize("raw,kind", [([1, 2], "list"), ("seed: 0", "str"), (None, "NoneType")])
def test_a_files_config_is_a_mapping(raw, kind):
    with pytest.raises(ConfigError) as err:
        check_file_config(raw, "src")
    assert str(err.value) == f"refusing src: its config is a {kind}, not a mapping"


@pytest.mark.parametrize(("repr_name", "taps", "noted"), [("avgpool", ["layer1.0"], True), ("avgpool", [], False),
                                                            ("avgpool", ["avgpool"], False),
                                                            ("combined", ["layer1.0"], False)])
def test_taps_given_to_the_avgpool_representation_are_noted_as_unused(tmp_path, capsys, repr_name, taps, noted):
    from byol.jobs.evaluate import _start_job

    cfg = compose_config("evaluate", ["preset=smoke", f"repr={repr_name}", f"repr.taps=[{','.join(taps)}]"],
                         tmp_path)
    _start_job(cfg, tmp_path / "job")
    assert ("repr=avgpool is the global average pool alone" in capsys.readouterr().out) is noted
