"""Every random choice in a run is a pure function of (run seed, round, purpose, client).

No generator state is carried from round to round, so a run resumed at round r makes exactly the
choices an uninterrupted run makes, and clients can be trained in any order or place.
"""

from __future__ import annotations

import numpy as np
import torch

# purposes (the third element of every seed path)
SAMPLING, CLIENT_TRAIN, CLIENT_CODEC, CLIENT_NOISE, FAILURES, DOWNLINK, EVAL, PREPASS = 1, 2, 3, 4, 5, 6, 7, 8


def derive_seed(*path: int) -> int:
    """A 64-bit seed from a path of non-negative integers."""
    lo, hi = np.random.SeedSequence([int(p) for p in path]).generate_state(2, np.uint32)
    return int(lo) | (int(hi) << 32)


def codec_seed(run_seed: int, round_num: int, client: int) -> int:
    """The seed of client ``client``'s codec in round ``round_num`` (FedMRN's noise; the codec may
    send it, and the server checks that it is this one)."""
    return derive_seed(run_seed, round_num, CLIENT_NOISE, client)


def torch_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)


def sample_clients(run_seed: int, round_num: int, num_clients: int, per_round: int) -> list[int]:
    rng = np.random.default_rng(derive_seed(run_seed, round_num, SAMPLING))
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def round_failures(run_seed: int, round_num: int, clients: list[int], dropout: float,
                   stragglers: float) -> tuple[set[int], set[int]]:
    """Which sampled clients drop out and which arrive late this round: exactly
    ``round(dropout * k)`` and ``round(stragglers * k)`` of the ``k`` clients, disjoint."""
    k = len(clients)
    n_drop, n_late = round(dropout * k), round(stragglers * k)
    if not n_drop + n_late:
        return set(), set()
    rng = np.random.default_rng(derive_seed(run_seed, round_num, FAILURES))
    chosen = [clients[i] for i in rng.permutation(k)[:n_drop + n_late]]
    return set(chosen[:n_drop]), set(chosen[n_drop:])
