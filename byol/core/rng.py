"""Global random-number-generator state as plain tensors, and per-step generators.

Checkpoints are read with ``weights_only=True``, so the RNG states they hold must be tensors and
plain types; and augmentation randomness is a function of (seed, epoch, batch), so a resumed
run draws exactly the views the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def step_generator(generator: torch.Generator | None, device, *keys: int) -> torch.Generator:
    """``generator`` (a new one on ``device`` if None or elsewhere) seeded by the integers ``keys``,
    e.g. (seed, epoch, batch index): the same keys give the same stream in any process."""
    if generator is None or generator.device != torch.device(device):
        generator = torch.Generator(device=device)
    return generator.manual_seed(hash(tuple(int(k) for k in keys)) & (2**63 - 1))


def process_keys(seed: int, epoch: int, batch: int, rank: int = 0, world: int = 1) -> tuple[int, ...]:
    """What seeds a step's augmentation: (seed, epoch, batch), and the rank when several processes train
    (each rank draws its own views, still a function of the keys: exact on resume; one process keeps the
    stream it had before ranks existed)."""
    return (seed, epoch, batch, rank) if world > 1 else (seed, epoch, batch)


def rng_state() -> dict:
    """Every global RNG as tensors/plain types (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_state_problem(state) -> str | None:
    """What is wrong with a saved :func:`rng_state` (None: it loads), tried on generators of its own so
    that a bad one changes no global state."""
    if not isinstance(state, dict) or not {"torch", "python", "numpy"} <= set(state):
        return "rng is not a saved random-number state (a mapping of 'torch', 'python' and 'numpy')"
    try:
        torch.Generator().set_state(state["torch"])
        random.Random().setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
        name, keys, *rest = state["numpy"]
        np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), *rest))
        cuda = state.get("cuda", [])
        if not isinstance(cuda, list | tuple) or not all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in cuda):
            raise TypeError("the CUDA states are not byte tensors")
    except (TypeError, ValueError, RuntimeError, AttributeError, OverflowError, IndexError) as e:
        return f"rng is not a saved random-number state ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    return None
