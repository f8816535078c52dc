"""Splitting a labelled dataset among federated clients.

Every scheme is a pure function of the label array and a seed: the random generator is
``np.random.default_rng(np.random.SeedSequence([seed, <scheme constant>]))``, so equal arguments
give equal partitions and different schemes never share a random stream. A partition is a list
with one sorted ``int64`` index array per client; every sample index appears in exactly one
client.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fedcodec.errors import ConfigError

# Per-scheme constants mixed into the seed so each scheme has its own random stream.
_IID_STREAM = 0x11D
_DIRICHLET_STREAM = 0xD1C
_K_CLASSES_STREAM = 0xC1A55

Partition = list[np.ndarray]


def _rng(seed: int, stream: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def _check(labels: np.ndarray, num_clients: int) -> np.ndarray:
    """Validate the common arguments; return ``labels`` as a 1-D integer array."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ConfigError("labels must be non-negative")
    if not 1 <= num_clients <= len(labels):
        raise ConfigError(
            f"num_clients={num_clients} must be between 1 and the number of samples "
            f"({len(labels)})"
        )
    return labels


def _finish(parts: list[np.ndarray]) -> Partition:
    return [np.sort(p).astype(np.int64) for p in parts]


def iid(labels: np.ndarray, num_clients: int, seed: int) -> Partition:
    """Shuffle all indices and deal them out; client sizes differ by at most one."""
    labels = _check(labels, num_clients)
    perm = _rng(seed, _IID_STREAM).permutation(len(labels))
    return _finish(np.array_split(perm, num_clients))


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    beta: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
) -> Partition:
    """Label-skewed split: each class is divided among clients in ``Dir(beta)`` proportions.

    Classes are processed in increasing order. For each, proportions over clients are drawn from
    a symmetric Dirichlet with concentration ``beta``; clients that already hold more than the
    average ``N / num_clients`` samples get proportion 0 (the rest are renormalised), which keeps
    sizes from running away. The class's shuffled indices are then cut at the cumulative
    proportions. The whole draw is repeated until every client has at least ``min_size``
    samples; after ``max_tries`` failures :class:`ConfigError` is raised. Small ``beta`` means
    strong skew (``beta -> inf`` approaches IID).
    """
    labels = _check(labels, num_clients)
    if not beta > 0:
        raise ConfigError(f"dirichlet: beta={beta} must be > 0")
    if min_size < 0 or max_tries < 1:
        raise ConfigError(f"dirichlet: need min_size >= 0 and max_tries >= 1, "
                          f"got {min_size} and {max_tries}")
    n = len(labels)
    hint = "raise beta, or lower min_size or num_clients"
    if num_clients * min_size > n:
        raise ConfigError(f"dirichlet: {num_clients} clients x min_size {min_size} exceeds the "
                          f"{n} samples; {hint}")
    rng = _rng(seed, _DIRICHLET_STREAM)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    average = n / num_clients
    for _ in range(max_tries):
        chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for indices in by_class:
            shuffled = rng.permutation(indices)
            p = rng.dirichlet(np.full(num_clients, float(beta))) * (sizes <= average)
            total = p.sum()
            if not total > 0:  # every open client drew (numerically) zero mass
                break
            cuts = (np.cumsum(p / total)[:-1] * len(shuffled)).astype(np.int64)
            for client, part in enumerate(np.split(shuffled, cuts)):
                chunks[client].append(part)
                sizes[client] += len(part)
        else:
            if sizes.min() >= min_size:
                return _finish([np.concatenate(c) for c in chunks])
    raise ConfigError(
        f"dirichlet: no split with at least {min_size} samples per client for "
        f"{num_clients} clients and beta={beta} in {max_tries} tries; {hint}"
    )


def k_classes(labels: np.ndarray, num_clients: int, k: int, seed: int) -> Partition:
    """Pathological label skew: every client holds exactly ``k`` distinct classes.

    The classes present in ``labels`` are put in a seeded random order and dealt round-robin:
    client ``i`` gets the classes at positions ``i*k .. i*k+k-1`` (modulo the number of
    classes). So every class is held by ``floor`` or ``ceil`` of ``num_clients*k/C`` clients,
    and each class's shuffled samples are split evenly among its holders. Requires
    ``num_clients * k >= C`` so no sample is dropped.
    """
    labels = _check(labels, num_clients)
    classes = np.unique(labels)
    c = len(classes)
    if not 1 <= k <= c:
        raise ConfigError(f"k_classes: k={k} must be between 1 and the number of classes ({c}); "
                          f"lower k")
    if num_clients * k < c:
        raise ConfigError(
            f"k_classes: {num_clients} clients x {k} classes cannot cover all {c} classes; "
            f"raise k or num_clients to at least {c} in total"
        )
    rng = _rng(seed, _K_CLASSES_STREAM)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(cls): [] for cls in classes}
    for client in range(num_clients):
        for slot in range(client * k, client * k + k):
            holders[int(order[slot % c])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls, owners in holders.items():
        indices = rng.permutation(np.flatnonzero(labels == cls))
        if len(indices) < len(owners):
            raise ConfigError(
                f"k_classes: class {cls} has {len(indices)} samples but {len(owners)} clients "
                f"hold it; lower num_clients or k"
            )
        for owner, share in zip(owners, np.array_split(indices, len(owners))):
            parts[owner].append(share)
    return _finish([np.concatenate(p) for p in parts])


_SCHEMES: dict[str, tuple[Callable[..., Partition], frozenset[str], frozenset[str]]] = {
    # scheme: (function, required options, optional options)
    "iid": (iid, frozenset(), frozenset()),
    "dirichlet": (dirichlet, frozenset({"beta"}), frozenset({"min_size", "max_tries"})),
    "k-classes": (k_classes, frozenset({"k"}), frozenset()),
}


def partition(
    labels: np.ndarray, scheme: str, num_clients: int, seed: int, **kw: Any
) -> Partition:
    """Split ``labels`` among ``num_clients`` with ``scheme`` ("iid", "dirichlet", "k-classes").

    ``kw`` are the scheme's options: ``beta`` (required), ``min_size``, ``max_tries`` for
    "dirichlet"; ``k`` (required) for "k-classes". Unknown schemes or options, and missing
    required options, raise :class:`ConfigError`.
    """
    if scheme not in _SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; known: {', '.join(_SCHEMES)}")
    func, required, optional = _SCHEMES[scheme]
    unknown = set(kw) - required - optional
    missing = required - set(kw)
    if unknown or missing:
        raise ConfigError(
            f"partition scheme {scheme!r} takes options {sorted(required)} (required) and "
            f"{sorted(optional)} (optional); got {sorted(kw)}"
        )
    return func(labels, num_clients=num_clients, seed=seed, **kw)


def describe(parts: Partition, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Summarise a partition for logs, as plain JSON-serialisable values.

    Returns ``num_clients``, per-client ``sizes`` and ``histograms`` (label counts, length
    ``num_classes``), ``classes_per_client`` (how many classes each client has samples of) and
    ``min_size``/``max_size``.
    """
    labels = np.asarray(labels)
    hists = [np.bincount(labels[p], minlength=num_classes) for p in parts]
    sizes = [len(p) for p in parts]
    return {
        "num_clients": len(parts),
        "sizes": sizes,
        "min_size": min(sizes, default=0),
        "max_size": max(sizes, default=0),
        "histograms": [h.tolist() for h in hists],
        "classes_per_client": [int(np.count_nonzero(h)) for h in hists],
    }
