"""Byzantine-robust aggregation: what keeps one hostile client from poisoning the global model.

A payload can be perfectly well-formed and still hostile: an update multiplied by 1000, its sign
flipped, a BatchNorm running variance pushed below zero, another client's payload replayed. The
codecs reject what is malformed and bind what the configuration fixes (FedMRN's alpha, mask and
noise kinds and its seed, QSGD's levels, top-k's count, the AE's decoder shape). This module handles
the rest, on the server, after every payload of the round is decoded:

1. **Validity** (:func:`invalid_statistics`): a client whose BatchNorm running variances would be
   ``<= 0`` (or not finite) once applied to the model it trained from is rejected. A convex
   combination of positive variances is positive, so the aggregate stays valid without any change
   to honest runs (a log-space mean would move them); the aggregate is checked again afterwards
   (:func:`check_statistics`), and a tensor that fails keeps its previous value.
2. **Replay** (:class:`ReplayGuard`): a payload byte-identical to one accepted from any client in
   its last ``replay_window`` accepted rounds is rejected. Honest clients never repeat themselves:
   each client-round has its own training seed. FedMRN's payload also carries its seed, which must
   equal the seed derived for (run, round, client).
3. **Clipping** (``clip_factor = c``, default 2): per group of tensors (:func:`groups`: kernels,
   other trainables, running means, running variances), a client's update whose L2 norm exceeds
   ``c`` times the round's median norm of that group is scaled down to it. Honest
   updates of the same round have similar norms, so they are almost never touched (and when they
   are, only slightly), while a boosted update can weigh at most ``c`` honest updates' worth. It
   needs at least :data:`MIN_ROBUST` updates (with two, a median says nothing about which is honest).
4. **Aggregator** (``aggregator``): ``mean`` (the algorithm's own, by default the example-weighted
   mean), or the unweighted rules Flower users know: ``median`` (coordinate-wise), ``trimmed-mean``
   (drop the ``trim_fraction`` largest and smallest values of each coordinate; Flower's
   FedTrimmedAvg), ``krum`` (the update closest to its ``n - f - 2`` nearest neighbours, for
   ``f = krum_byzantine`` assumed attackers; Blanchard et al. 2017). With fewer than
   :data:`MIN_ROBUST` updates in a round they fall back to the mean. They replace the mean of the
   tensors an algorithm aggregates by a mean; FedPM's posterior and signSGD's vote aggregate their
   kernels their own way (each client moves a coordinate by at most one count or vote), so only
   their dense tensors are robustly aggregated. Clipping applies to every tensor of an additive
   algorithm (it bounds the scale a signSGD voter brings), and to FedPM's dense tensors only (its
   kernels are masks, which scaling would corrupt).

All arithmetic is float64 and in client-id order, so the result is deterministic.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import torch

from ..codecs import ModelSpec, Update
from ..errors import ConfigError

log = logging.getLogger("fedcodec.server")

AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")
#: fewest updates in a round for clipping and the robust aggregators to act
MIN_ROBUST = 3
#: the server-store key of a client's recently accepted payload digests (a (k, 16) uint8 tensor)
SEEN_KEY = "seen/digests"


@dataclass(frozen=True)
class Defense:
    """The server's defences against valid-but-hostile updates (see the module docstring).

    ``Defense()`` is the default of every run; ``Defense.off()`` is plain FedAvg with no defence
    but the codecs' own checks and the float32 range check, as fedcodec did before robust
    aggregation existed (for experiments that measure what the defences prevent).
    """

    aggregator: str = "mean"
    clip_factor: float = 2.0  # 0: no clipping
    trim_fraction: float = 0.1
    krum_byzantine: int = 1
    replay_window: int = 8  # 0: replays are not checked
    max_update_norm: float | None = None
    #: reject clients whose BatchNorm variances would be <= 0, check the aggregate's (no config key:
    #: only :meth:`off` turns it off, to measure what the check prevents)
    statistics: bool = True

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if not (isinstance(self.clip_factor, (int, float)) and math.isfinite(self.clip_factor)
                and (self.clip_factor == 0 or self.clip_factor >= 1)):
            raise ConfigError(f"clip_factor must be 0 (off) or a number >= 1, got {self.clip_factor!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if not (isinstance(self.krum_byzantine, int) and self.krum_byzantine >= 0):
            raise ConfigError(f"krum_byzantine must be an integer >= 0, got {self.krum_byzantine!r}")
        if not (isinstance(self.replay_window, int) and 0 <= self.replay_window <= 1024):
            raise ConfigError(f"replay_window must be an integer in 0..1024, got {self.replay_window!r}")

    @classmethod
    def off(cls) -> "Defense":
        return cls(clip_factor=0.0, replay_window=0, statistics=False)

    @classmethod
    def from_config(cls, cfg) -> "Defense":
        return cls(cfg.aggregator, float(cfg.clip_factor), float(cfg.trim_fraction), int(cfg.krum_byzantine),
                   int(cfg.replay_window), cfg.max_update_norm)


# ---------------------------------------------------------------------------------------------
# validity of BatchNorm statistics


def is_variance(name: str) -> bool:
    return name.endswith("running_var")


def invalid_statistics(reference: Update, update: Update) -> str | None:
    """Why ``reference + update`` holds an invalid BatchNorm running variance, else None."""
    for name, upd in update.items():
        if is_variance(name) and upd.numel():
            value = reference[name].double() + upd.double()
            if not bool((value > 0).all()):
                return f"BatchNorm {name!r} would hold a variance <= 0 ({float(value.min()):.4g})"
    return None


def check_statistics(old: Update, new: Update, round_num: int) -> Update:
    """``new`` with every running variance that is not finite and positive reset to its ``old`` value."""
    bad = [n for n, t in new.items() if is_variance(n) and not bool((torch.isfinite(t) & (t > 0)).all())]
    if not bad:
        return new
    log.error("round %d: aggregated %s invalid; kept the previous values", round_num, ", ".join(bad))
    return new | {n: old[n] for n in bad}


# ---------------------------------------------------------------------------------------------
# replays


def digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def same_round_copies(payloads: dict[int, tuple[bytes, float]]) -> dict[int, str]:
    """{client: why} for every client whose payload another client of the round sent too: all
    copies are rejected, since nothing tells the original from the replay."""
    senders: dict[bytes, list[int]] = {}
    for client in sorted(payloads):
        senders.setdefault(digest(payloads[client][0]), []).append(client)
    return {c: f"clients {', '.join(map(str, group))} sent the same payload this round (a replay)"
            for group in senders.values() if len(group) > 1 for c in group}


class ReplayGuard:
    """Digests of the payloads recently accepted from every client, kept in the server's per-client
    stores (so checkpoints carry them): at most ``window`` per client, newest last."""

    def __init__(self, stores: dict[int, dict[str, torch.Tensor]] | None, window: int):
        self.stores, self.window = stores, window
        self.known: dict[bytes, int] = {}
        if stores is None or not window:
            return
        for client in sorted(stores):
            seen = stores[client].get(SEEN_KEY)
            if seen is not None:
                for row in seen.reshape(-1, 16):
                    self.known.setdefault(bytes(row.tolist()), client)

    def replayed(self, payload: bytes) -> str | None:
        """Why ``payload`` is a replay, else None."""
        if not self.window:
            return None
        first = self.known.get(digest(payload))
        if first is None:
            return None
        return f"the payload is a replay of one accepted from client {first} in a recent round"

    def remember(self, client: int, payload: bytes) -> None:
        """Record an accepted payload (call once per accepted client, in client order)."""
        if self.stores is None or not self.window:
            return
        d = digest(payload)
        self.known.setdefault(d, client)
        store = self.stores.setdefault(client, {})
        row = torch.tensor(list(d), dtype=torch.uint8).reshape(1, 16)
        seen = store.get(SEEN_KEY)
        seen = row if seen is None else torch.cat([seen.reshape(-1, 16), row])[-self.window:]
        store[SEEN_KEY] = seen.contiguous()


# ---------------------------------------------------------------------------------------------
# clipping and aggregation


def groups(spec: ModelSpec, names: list[str]) -> list[list[str]]:
    """``names`` grouped for clipping: the conv/linear kernels, the other trainable tensors (biases,
    BatchNorm scales and shifts), the running means, the running variances, other buffers. A group
    of whole roles, not single tensors: a sparse codec (top-k) leaves most tensors of most clients
    at zero, and a per-tensor median would then clip every honest client that sent one."""
    def kind(t) -> str:
        if t.role != "buffer":
            return t.role
        return "running_mean" if t.name.endswith("running_mean") else "running_var" if is_variance(t.name) else "buffer"

    wanted, out = set(names), {}
    for t in spec.tensors:
        if t.name in wanted:
            out.setdefault(kind(t), []).append(t.name)
    return list(out.values())


def _group_norm(update: Update, names: list[str]) -> float:
    return math.sqrt(sum(float(update[n].double().pow(2).sum()) for n in names))


def clip(updates: list[tuple[int, float, Update]], tensor_groups: list[list[str]], factor: float,
         round_num: int = 0, clipped: set[int] | None = None) -> list[tuple[int, float, Update]]:
    """Per group of tensors: scale each client's update of the group down to ``factor`` times the
    median norm of that group over ``updates``. Updates that need no clipping are passed on as the
    same objects, so an honest round's arithmetic is unchanged. The clients clipped are added to
    ``clipped``."""
    if not factor or len(updates) < MIN_ROBUST:
        return updates
    scaled: dict[int, dict[str, torch.Tensor]] = {}
    for names in tensor_groups:
        norms = torch.tensor([_group_norm(u, names) for _, _, u in updates], dtype=torch.float64)
        bound = factor * float(_median(norms))
        for i, (client, _, upd) in enumerate(updates):
            if float(norms[i]) > bound:
                scale = bound / float(norms[i])
                if clipped is not None:
                    clipped.add(client)
                for n in names:
                    scaled.setdefault(i, {})[n] = (upd[n].double() * scale).to(upd[n].dtype)
                log.info("round %d: client %d's %s clipped from norm %.4g to %.4g", round_num, client,
                         names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}", float(norms[i]), bound)
    if not scaled:
        return updates
    return [(c, w, upd | scaled[i]) if i in scaled else (c, w, upd) for i, (c, w, upd) in enumerate(updates)]


def _median(stack: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of ``stack`` (n, ...): the mean of the two middle values when n is even."""
    s = stack.sort(dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _trimmed_mean(stack: torch.Tensor, fraction: float) -> torch.Tensor:
    n = stack.shape[0]
    k = int(fraction * n)
    return stack.sort(dim=0).values[k:n - k].mean(dim=0)


def krum_select(flat: torch.Tensor, byzantine: int) -> int:
    """Index of the Krum choice among the rows of ``flat`` (n, d): the row with the smallest sum of
    squared distances to its ``n - f - 2`` nearest other rows (at least one); ties to the lowest index."""
    n = flat.shape[0]
    dist = torch.cdist(flat, flat).pow(2)
    k = max(1, n - byzantine - 2)
    scores = [float(dist[i][torch.arange(n) != i].sort().values[:k].sum()) for i in range(n)]
    return min(range(n), key=lambda i: (scores[i], i))


def robust_mean(updates: list[tuple[int, float, Update]], names: list[str], defense: Defense) -> dict[str, torch.Tensor]:
    """The float64 aggregate of ``names`` by ``defense.aggregator`` (not ``mean``), unweighted."""
    if defense.aggregator == "krum":
        flat = torch.cat([torch.cat([u[n].double().reshape(-1) for n in names]).reshape(1, -1)
                          for _, _, u in updates])
        chosen = updates[krum_select(flat, defense.krum_byzantine)][2]
        return {n: chosen[n].double() for n in names}
    out = {}
    for name in names:
        stack = torch.stack([u[name].double() for _, _, u in updates])
        out[name] = _median(stack) if defense.aggregator == "median" else _trimmed_mean(stack, defense.trim_fraction)
    return out


def robust_names(algorithm, spec: ModelSpec) -> list[str]:
    """The tensors whose aggregate is a mean of the updates, so clipping and a robust rule apply."""
    own = set(algorithm.own_aggregate(spec)) if algorithm is not None else set()
    return [t.name for t in spec.tensors if t.name not in own]
