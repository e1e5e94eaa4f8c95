"""Online monitors: is the run learning? Weighted kNN and linear probes per representation, during training.

A low BYOL loss proves nothing (a collapsed network reaches one too); what users judge a run by is
the accuracy of its representations over epochs. Both monitors see the **online** encoder:

- :class:`OnlineKNN` embeds a bank of training images and held-out labelled queries in eval mode
  every ``every_n_epochs`` and scores weighted kNN (the offline ``eval=knn`` on the same images);
- :class:`OnlineProbes` trains a linear classifier per representation on the detached features of
  each training batch (view 1, as the network saw it; under DDP the batch gathered from every rank),
  with its own optimizer: no gradient reaches the encoder, and the global random stream is untouched.

Representations are named lists of taps: ``{"avgpool": ["avgpool"], "combined": ["avgpool",
"layer2.0", "layer3.0"], "layer2.0": ["layer2.0"], ...}``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from byol.core.data import ImageTensors
from byol.core.features import extract_features
from byol.core.knn import knn_accuracy
from byol.core.state_check import optimizer_problem, shown, tensors_problem, weights_problem, whole
from byol.lightning.internals import epoch_cut_short

KNN_PREFIX, PROBE_PREFIX = "monitor/knn/", "monitor/probe/"


def all_taps(representations: Mapping[str, Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(t for taps in representations.values() for t in taps))


def _columns(encoder, taps: Sequence[str], wanted: Sequence[str]) -> torch.Tensor:
    """Indices of the features of ``wanted`` taps inside the concatenation of ``taps``."""
    starts, offset = {}, 0
    for tap in taps:
        starts[tap] = (offset, offset + encoder.dims[tap])
        offset += encoder.dims[tap]
    return torch.cat([torch.arange(*starts[t]) for t in wanted])


class OnlineKNN(pl.Callback):
    """Weighted kNN (cosine, votes ``exp(sim / T)``) of ``queries`` against ``bank`` per representation."""

    def __init__(self, bank: ImageTensors, queries: ImageTensors, representations: Mapping[str, Sequence[str]],
                 mean: Sequence[float], std: Sequence[float], num_classes: int, every_n_epochs: int = 1,
                 k: int = 200, temperature: float = 0.1, batch_size: int = 512, dtype: torch.dtype | None = None):
        self.bank, self.queries, self.representations = bank, queries, dict(representations)
        self.mean, self.std, self.num_classes, self.every = mean, std, num_classes, max(1, every_n_epochs)
        self.k, self.temperature, self.batch_size, self.dtype = k, temperature, batch_size, dtype
        self.last: dict[str, float] = {}
        self.epoch: int | None = None  # the epoch whose end ``last`` was measured at
        self.initial: dict[str, float] = {}
        self.seconds = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        device = pl_module.device
        self.bank, self.queries = self.bank.to(device), self.queries.to(device)

    @torch.no_grad()
    def scores(self, encoder) -> dict[str, float]:
        """kNN accuracy of each representation, from one pass over the bank and the queries."""
        taps = all_taps(self.representations)
        bank, queries = (extract_features(encoder, data.images, taps, self.mean, self.std, self.batch_size,
                                          self.dtype) for data in (self.bank, self.queries))
        scores = {}
        for name, wanted in self.representations.items():
            cols = _columns(encoder, taps, wanted).to(bank.device)
            scores[name] = knn_accuracy(bank[:, cols], self.bank.labels, queries[:, cols], self.queries.labels,
                                        self.num_classes, k=self.k, temperature=self.temperature)
        return scores

    def on_train_start(self, trainer, pl_module) -> None:
        """The random-init encoder's scores, before the first step: where the curve starts."""
        if trainer.global_step != 0 or not trainer.is_global_zero:
            return
        self.initial = self.scores(pl_module.model.online_encoder)
        for logger in trainer.loggers:
            logger.log_metrics({KNN_PREFIX + name: value for name, value in self.initial.items()}, step=0)
        shown = ", ".join(f"{name} {100 * value:.1f}%" for name, value in self.initial.items())
        print(f"[byol] kNN before training (random init): {shown}", flush=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Under DDP rank 0 alone scores (every rank holds the same online weights; eval mode, so
        # SyncBatchNorm runs no collective) and logs; the other ranks go on to the next epoch.
        final = trainer.current_epoch + 1 == trainer.max_epochs  # a run's curve always ends with a score
        if ((trainer.current_epoch + 1) % self.every and not final) or not trainer.is_global_zero or \
                epoch_cut_short(trainer):  # scored once, when a resumed run ends the epoch
            return
        start = time.perf_counter()
        self.last = self.scores(pl_module.model.online_encoder)
        self.seconds = time.perf_counter() - start
        self.epoch = trainer.current_epoch
        for name, accuracy in self.last.items():
            pl_module.log(KNN_PREFIX + name, accuracy, rank_zero_only=True)
        pl_module.log("monitor/knn_seconds", self.seconds, rank_zero_only=True)


class OnlineProbes(pl.Callback):
    """A linear classifier per representation, trained on each training batch's detached features.

    Each probe standardises its input (a BatchNorm without affine parameters) before one linear
    layer, so features of very different scales (avgpool, pooled intermediate blocks) train at one
    learning rate. Its accuracy on the batches of an epoch (before each step) is logged at the end.
    Probe weights and optimizer state are saved in checkpoints (``state_dict``), so a resumed run
    continues them.
    """

    def __init__(self, representations: Mapping[str, Sequence[str]], dims: Mapping[str, int], num_classes: int,
                 lr: float = 0.1, seed: int = 0):
        self.representations = dict(representations)
        generator = torch.Generator().manual_seed(seed)  # its own stream: the run's randomness is untouched
        self.heads = nn.ModuleDict()
        for name, taps in self.representations.items():
            linear = nn.Linear(sum(dims[t] for t in taps), num_classes)
            with torch.no_grad():
                bound = linear.in_features ** -0.5
                linear.weight.copy_(torch.rand(linear.weight.shape, generator=generator) * 2 * bound - bound)
                linear.bias.zero_()
            self.heads[name.replace(".", "_")] = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False),
                                                               linear)
        # foreach: the update of all probes in a few fused operations (the default on GPUs only)
        self.optimizer = torch.optim.SGD(self.heads.parameters(), lr=lr, momentum=0.9, foreach=True)
        self._correct: torch.Tensor | None = None  # this epoch's correct predictions, one count per representation
        self._seen = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.heads.to(pl_module.device)
        for state in self.optimizer.state.values():  # after a load: momentum buffers follow the heads
            for key, value in state.items():
                if torch.is_tensor(value):
                    state[key] = value.to(pl_module.device)
        if self._correct is not None:  # ... and so do a mid-epoch state's counts (not moved in every step)
            self._correct = self._correct.to(pl_module.device)

    @staticmethod
    def _global_batch(trainer, pl_module, tensor: torch.Tensor) -> torch.Tensor:
        """Under DDP the global batch (every rank's share, in rank order), so each rank's probe takes the
        same step on the same data and all ranks hold one probe, as one process would on that batch."""
        if getattr(trainer, "world_size", 1) <= 1:
            return tensor
        return pl_module.all_gather(tensor).flatten(0, 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        features, labels = pl_module.model.last_features, batch[1]
        if not features or outputs is None:  # a skipped (non-finite) step
            return
        taps = all_taps(self.representations)  # one all-gather for every tap's features under DDP
        stacked = self._global_batch(trainer, pl_module, torch.cat([features[t].float() for t in taps], dim=1))
        gathered = dict(zip(taps, stacked.split([features[t].shape[1] for t in taps], dim=1), strict=True))
        labels = self._global_batch(trainer, pl_module, labels)
        with torch.enable_grad(), torch.autocast(labels.device.type, enabled=False):
            self.optimizer.zero_grad(set_to_none=True)
            total, logits = 0, []
            for name, wanted in self.representations.items():
                x = torch.cat([gathered[t] for t in wanted], dim=1)
                logits.append(self.heads[name.replace(".", "_")](x))
                total = total + F.cross_entropy(logits[-1], labels)
            total.backward()
            self.optimizer.step()
        with torch.no_grad():  # counted for all probes at once (a few operations, not a few per probe)
            correct = (torch.stack(logits).argmax(2) == labels).sum(1)
            self._correct = correct if self._correct is None else self._correct + correct
        self._seen += labels.shape[0]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if epoch_cut_short(trainer):
            return  # its counts so far are in the checkpoint: a resumed run reports the whole epoch
        for name, correct in self.correct_counts().items():  # counted on the global batch: the same on every rank
            pl_module.log(PROBE_PREFIX + name, float(correct) / max(1, self._seen), rank_zero_only=True)
        self._correct, self._seen = None, 0

    def correct_counts(self) -> dict[str, torch.Tensor]:
        """This epoch's correct predictions so far, by representation."""
        if self._correct is None:
            return {}
        return dict(zip(self.representations, self._correct.cpu().unbind(), strict=True))

    def state_dict(self) -> dict:
        """Probe weights, optimizer and this epoch's counts: a run resumed mid-epoch reports what the
        uninterrupted one would have."""
        return {"heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                "correct": self.correct_counts(), "seen": self._seen}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._loading = trainer  # named in the note when the probes' state does not fit them

    def load_state_dict(self, state_dict: dict) -> None:
        """The probes' state from a checkpoint. One that does not fit them (the probes of other monitor
        settings, or a damaged file) is not loaded: they start again from their initialisation, with a
        note. They measure the run; they are not part of what it trains."""
        problem = self.state_problem(state_dict)
        if problem:
            trainer = getattr(self, "_loading", None)
            if trainer is None or trainer.is_global_zero:
                where = f" in {trainer.ckpt_path}" if trainer is not None else ""
                print(f"[byol] note: the online probes' state{where} does not fit these probes ({problem}); they "
                      f"start again from their initialisation", flush=True)
            return
        self.heads.load_state_dict(state_dict["heads"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        correct = state_dict.get("correct") or {}
        # a checkpoint saved before the epoch's first step, or by an earlier version with other probes, counts none
        known = set(correct) == set(self.representations)
        self._correct = torch.stack([torch.as_tensor(correct[n]) for n in self.representations]) if known else None
        self._seen = int(state_dict.get("seen") or 0) if known else 0

    def state_problem(self, state) -> str | None:
        """What keeps a saved state from loading into these probes (None: it loads)."""
        if not isinstance(state, Mapping) or not {"heads", "optimizer"} <= set(state):
            return f"it is {shown(state)}, not a mapping of 'heads' and 'optimizer'"
        problem = tensors_problem(state["heads"], "heads") or \
            weights_problem(state["heads"], self.heads.state_dict(), "the checkpoint") or \
            optimizer_problem(state["optimizer"], self.optimizer, "optimizer")
        if problem:
            return problem
        correct, seen = state.get("correct") or {}, state.get("seen") or 0
        if not (isinstance(correct, Mapping) and all(
                isinstance(k, str) and (whole(v) or (torch.is_tensor(v) and v.dim() == 0))
                for k, v in correct.items())):
            return f"correct is {shown(correct)}, not a count per representation"
        return None if whole(seen) else f"seen is {shown(seen)}, not a whole number of 0 or more"
