"""The BYOL network: online encoder with one projector/predictor pair per head, and its EMA target."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from byol.core.backbone import AVGPOOL, Encoder, _key
from byol.core.ema import ema_update
from byol.core.errors import ConfigError
from byol.core.heads import mlp
from byol.core.losses import normalized_std, symmetric_loss, weighted_sum


class BYOL(nn.Module):
    """Online and target networks for BYOL.

    ``heads`` lists the encoder taps that get a projector/predictor pair: ``["avgpool"]`` is
    the classic loss, ``["avgpool", "layer2.0", "layer3.0"]`` the multi-loss variant.

    The target (encoder + projectors) is a deep copy of the online one, so both start equal
    (the paper's initialisation), and it never receives gradients: it moves only by
    :meth:`update_target`.

    The two views pass through the networks separately, so each view's BatchNorm statistics
    are its own, as in the paper's implementation.

    ``feature_taps``: encoder taps whose view-1 online features each forward pass keeps, detached,
    in :attr:`last_features` (for online linear probes: no gradient can reach the encoder).
    """

    def __init__(
        self,
        encoder: Encoder,
        heads: Sequence[str] = (AVGPOOL,),
        weights: Mapping[str, float] | None = None,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
    ):
        super().__init__()
        missing = [h for h in heads if h not in encoder.taps]
        if missing:
            raise ValueError(f"heads {missing} are not taps of the encoder ({encoder.taps})")
        self.heads = list(heads)
        self.weights = dict(weights or {})
        stray = [w for w in self.weights if w not in self.heads]
        if stray:  # a misspelt head would otherwise keep weight 1.0 without a word
            raise ConfigError(
                f"loss.weights names {', '.join(repr(w) for w in stray)}, which {'is' if len(stray) == 1 else 'are'} "
                f"not a head of this run (heads: {', '.join(self.heads)}); add the layer to loss.taps or "
                "drop its weight (a dotted name goes inside braces: '+loss.weights={layer2.0: 0.5}')"
            )
        bad = {h: w for h, w in self.weights.items() if not math.isfinite(w) or w < 0}
        if bad:  # a negative weight would push that head's predictions away from its targets
            raise ConfigError(f"loss.weights {bad}: each weight must be a finite number >= 0 (0 turns a head's "
                              f"loss off)")
        self.online_encoder = encoder
        self.online_projectors = nn.ModuleDict(
            {_key(h): mlp(encoder.dims[h], proj_hidden_dim, proj_dim) for h in self.heads}
        )
        self.predictors = nn.ModuleDict(
            {_key(h): mlp(proj_dim, pred_hidden_dim, proj_dim) for h in self.heads}
        )
        self.feature_taps: list[str] = []
        self.last_features: dict[str, torch.Tensor] = {}
        self.target_encoder = copy.deepcopy(self.online_encoder).requires_grad_(False)
        self.target_projectors = copy.deepcopy(self.online_projectors).requires_grad_(False)

    def _project(self, encoder, projectors, x, keep: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        feats = encoder(x, taps=list(dict.fromkeys([*self.heads, *keep])))
        if keep:
            self.last_features = {t: feats[t].detach() for t in keep}
        return {h: projectors[_key(h)](feats[h]) for h in self.heads}

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses per head (``loss/<tap>``), their weighted sum (``loss``) and, per head, the
        spread of the online projections of view 1 (``std/<tap>``, see :func:`normalized_std`)."""
        z1 = self._project(self.online_encoder, self.online_projectors, view1, keep=self.feature_taps)
        z2 = self._project(self.online_encoder, self.online_projectors, view2)
        with torch.no_grad():
            t1, t2 = (self._project(self.target_encoder, self.target_projectors, v) for v in (view1, view2))
        per_head = {
            h: symmetric_loss(self.predictors[_key(h)](z1[h]), self.predictors[_key(h)](z2[h]), t1[h], t2[h])
            for h in self.heads
        }
        out = {f"loss/{h}": loss for h, loss in per_head.items()}
        out["loss"] = weighted_sum(per_head, self.weights)
        out.update({f"std/{h}": normalized_std(z1[h]) for h in self.heads})
        return out

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """EMA step of the target towards the online encoder and projectors."""
        ema_update(self.target_encoder, self.online_encoder, tau)
        ema_update(self.target_projectors, self.online_projectors, tau)
