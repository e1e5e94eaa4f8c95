"""Online monitors: which columns make a representation, which network the kNN scores, the probes'
standardisation."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from conftest import ended_epoch

from byol.lightning.monitors import OnlineKNN, OnlineProbes, _columns


def test_columns_of_a_representation_inside_the_concatenated_taps():
    encoder = SimpleNamespace(dims={"avgpool": 3, "layer2.0": 2, "layer3.0": 4})
    taps = ["avgpool", "layer2.0", "layer3.0"]
    assert _columns(encoder, taps, ["layer3.0", "avgpool"]).tolist() == [5, 6, 7, 8, 0, 1, 2]
    assert _columns(encoder, taps, ["layer2.0"]).tolist() == [3, 4]


def test_knn_monitor_scores_the_online_encoder():
    knn = OnlineKNN(None, None, {"avgpool": ["avgpool"]}, [0.0] * 3, [1.0] * 3, num_classes=2)
    scored = []
    knn.scores = lambda encoder: (scored.append(encoder), {"avgpool": 0.5})[1]
    logged = {}
    module = SimpleNamespace(model=SimpleNamespace(online_encoder="online", target_encoder="target"),
                             log=lambda name, value, **kwargs: logged.__setitem__(name, value))
    knn.on_train_epoch_end(SimpleNamespace(current_epoch=0, max_epochs=1, is_global_zero=True, **ended_epoch()),
                           module)
    assert scored == ["online"] and logged["monitor/knn/avgpool"] == 0.5
    # the last epoch cut after 3 of its 4 batches by a stop limit: scored once, when a resumed run ends it
    scored.clear(), logged.clear()
    knn.on_train_epoch_end(SimpleNamespace(current_epoch=0, max_epochs=1, is_global_zero=True,
                                           **ended_epoch(4, done=3)), module)
    assert scored == [] and logged == {}


def test_probes_standardise_their_features_so_a_per_dimension_scale_changes_nothing():
    """Features x and 100 x + 7 (per dimension): the same predictions and the same step."""
    reps, dims = {"avgpool": ["avgpool"]}, {"avgpool": 4}
    probes = [OnlineProbes(reps, dims, num_classes=3, seed=0) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    trainer = SimpleNamespace(world_size=1)
    for probe, features in zip(probes, (x, 100 * x + 7), strict=True):
        module = SimpleNamespace(model=SimpleNamespace(last_features={"avgpool": features}))
        probe.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, (None, labels), 0)
    a, b = (p.heads["avgpool"][-1] for p in probes)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    assert int(probes[0].correct_counts()["avgpool"]) == int(probes[1].correct_counts()["avgpool"])
