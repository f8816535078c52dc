"""One hostile client among ten: the server's defaults keep the model (fedcodec.fl.robust,
fedcodec.fl.attacks), and each defence does what it says on small literal cases."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from fedcodec.codecs import ModelSpec, TensorSpec, build_uplink
from fedcodec.config import Config
from fedcodec.data import make_synthetic_images
from fedcodec.errors import ConfigError
from fedcodec.fl import robust
from fedcodec.fl.attacks import HostileTransport, scale_fedmrn_alpha
from fedcodec.fl.loop import InProcessTransport, run_round
from fedcodec.fl.robust import Defense
from fedcodec.fl.server import aggregate, server_round
from fedcodec.fl.simulation import setup

SPEC = ModelSpec((TensorSpec("fc.weight", (2,), "weight"), TensorSpec("fc.bias", (1,), "param"),
                  TensorSpec("bn.running_var", (1,), "buffer")))


def upd(w, b=0.0, v=0.0):
    return {"fc.weight": torch.tensor(w, dtype=torch.float32), "fc.bias": torch.tensor([b]),
            "bn.running_var": torch.tensor([v])}


# ------------------------------------------------------------------------------------------------
# the defences on literal numbers


def test_clipping_scales_only_the_outlier_to_twice_the_median_norm():
    ups = [(0, 1.0, upd([3.0, 4.0])), (1, 1.0, upd([0.0, 5.0])), (2, 1.0, upd([300.0, 400.0]))]
    out = robust.clip(ups, [["fc.weight"]], 2.0)
    assert out[0][2] is ups[0][2] and out[1][2] is ups[1][2]  # honest updates: the same objects
    assert out[2][2]["fc.weight"].tolist() == [6.0, 8.0]  # norm 500 -> 2 * median(5, 5, 500) = 10
    assert out[2][2]["fc.bias"] is ups[2][2]["fc.bias"]  # other groups untouched
    two = [ups[0], ups[2]]
    assert robust.clip(two, [["fc.weight"]], 2.0) is two  # two updates: no median to trust


def test_groups_are_roles_with_running_statistics_apart():
    spec = ModelSpec((TensorSpec("a.weight", (2,), "weight"), TensorSpec("a.bias", (2,), "param"),
                      TensorSpec("b.weight", (2,), "weight"), TensorSpec("bn.running_mean", (2,), "buffer"),
                      TensorSpec("bn.running_var", (2,), "buffer")))
    assert robust.groups(spec, spec.names) == [["a.weight", "b.weight"], ["a.bias"], ["bn.running_mean"],
                                               ["bn.running_var"]]


def test_median_trimmed_mean_and_krum_on_literal_values():
    ups = [(c, 1.0, upd([x, -x], b=x)) for c, x in enumerate([1.0, 2.0, 3.0, 4.0, 100.0])]
    med = robust.robust_mean(ups, ["fc.weight", "fc.bias"], Defense(aggregator="median"))
    assert med["fc.weight"].tolist() == [3.0, -3.0] and med["fc.bias"].tolist() == [3.0]
    even = robust.robust_mean(ups[:4], ["fc.bias"], Defense(aggregator="median"))
    assert even["fc.bias"].tolist() == [2.5]
    trimmed = robust.robust_mean(ups, ["fc.bias"], Defense(aggregator="trimmed-mean", trim_fraction=0.2))
    assert trimmed["fc.bias"].tolist() == [3.0]  # (2 + 3 + 4) / 3
    krum = robust.robust_mean(ups, ["fc.weight", "fc.bias"], Defense(aggregator="krum", krum_byzantine=1))
    assert krum["fc.bias"].tolist() == [2.0]  # closest to its 2 nearest neighbours: x = 2 (tie with 3: lower index)


def test_invalid_statistics_and_the_aggregate_check():
    ref = upd([0.0, 0.0], v=1.0)
    assert robust.invalid_statistics(ref, upd([5.0, 5.0], v=-0.5)) is None
    assert "variance <= 0 (-0.5)" in robust.invalid_statistics(ref, upd([0.0, 0.0], v=-1.5))
    assert "variance <= 0 (0)" in robust.invalid_statistics(ref, upd([0.0, 0.0], v=-1.0))
    new = robust.check_statistics(ref, upd([1.0, 1.0], v=float("nan")), 1)
    assert new["bn.running_var"].tolist() == [1.0] and new["fc.weight"].tolist() == [1.0, 1.0]


def test_replays_from_any_recent_round_or_the_same_round_are_rejected():
    uplink = build_uplink("fp32")
    spec = SPEC
    from fedcodec.codecs import CodecContext

    g = upd([0.0, 0.0], v=1.0)

    def payload(x):
        return uplink.codec.encode(upd([x, x]), CodecContext(spec, 0, 1))

    stores: dict = {}
    _, first = server_round(uplink, spec, g, 1, {0: (payload(1.0), 1.0), 1: (payload(2.0), 1.0)}, stores=stores)
    assert first.accepted == [0, 1]
    assert stores[0][robust.SEEN_KEY].shape == (1, 16)
    _, second = server_round(uplink, spec, g, 2, {0: (payload(3.0), 1.0), 2: (payload(1.0), 1.0),
                                                  3: (payload(4.0), 1.0), 4: (payload(4.0), 1.0)}, stores=stores)
    assert second.accepted == [0]
    assert "replay of one accepted from client 0" in second.rejected[2]
    assert "clients 3, 4 sent the same payload this round" in second.rejected[3]
    assert "clients 3, 4 sent the same payload this round" in second.rejected[4]
    # the window keeps a client's last N accepted payloads
    for r in range(3, 6):
        server_round(uplink, spec, g, r, {0: (payload(10.0 + r), 1.0)}, stores=stores, defense=Defense(replay_window=2))
    assert stores[0][robust.SEEN_KEY].shape == (2, 16)
    _, later = server_round(uplink, spec, g, 9, {5: (payload(1.0), 1.0)}, stores=stores, defense=Defense(replay_window=2))
    assert later.accepted == [5]  # client 0's round-1 payload has left its window


def test_defense_settings_are_checked():
    with pytest.raises(ConfigError, match="clip_factor must be 0"):
        Config(clip_factor=0.5).validate()
    with pytest.raises(ConfigError, match="aggregator"):
        Config(aggregator="average").validate()
    with pytest.raises(ConfigError, match="trim_fraction"):
        Config(trim_fraction=0.5).validate()


def test_vote_and_fedpm_kernels_keep_their_own_rule():
    from fedcodec.codecs.base import split_specs

    spec = ModelSpec((TensorSpec("fc.weight", (2,), "weight"), TensorSpec("fc.bias", (1,), "param")))
    vote = build_uplink("signsgd", vote=True).algorithm
    assert robust.robust_names(vote, spec) == ["fc.bias"]
    assert robust.robust_names(build_uplink("fedpm").algorithm, spec) == ["fc.bias"]
    assert robust.robust_names(build_uplink("fedmrn").algorithm, spec) == ["fc.weight", "fc.bias"]
    assert [t.name for t in split_specs(spec)[0]] == ["fc.weight"]


def test_fedmrn_payload_fields_are_bound_to_the_run():
    from fedcodec.codecs import CodecContext
    from fedcodec.errors import PayloadError

    uplink = build_uplink("fedmrn")
    ctx = CodecContext(SPEC, client=2, round=3, seed=77, rng=torch.Generator().manual_seed(0))
    honest = uplink.codec.encode(upd([0.001, -0.002], v=0.5), ctx)
    assert uplink.codec.decode(honest, ctx)["fc.bias"].tolist() == [0.0]
    with pytest.raises(PayloadError, match=r"\(binding\): mask binary, noise uniform, alpha 10; this run uses "
                                           r"mask binary, noise uniform, alpha 0.0099999998"):
        uplink.codec.decode(scale_fedmrn_alpha(honest, 1000.0, "fedmrn", SPEC.fingerprint), ctx)
    with pytest.raises(PayloadError, match=r"\(binding\): seed 0x4d is not this client-round's seed"):
        uplink.codec.decode(honest, CodecContext(SPEC, client=2, round=4, seed=78))


# ------------------------------------------------------------------------------------------------
# one hostile client among ten, end to end (synthetic images, all ten sampled every round)

ROUNDS = 8


@functools.cache
def data():
    return make_synthetic_images(1000, 300, shape=(1, 16, 16), seed=0)


def run(method: str, attack: str | None, defense: Defense | None = None, rounds: int = ROUNDS, **kw):
    cfg = Config(method=method, num_clients=10, clients_per_round=10, rounds=rounds, local_epochs=2, batch_size=16,
                 seed=5, **kw).validate()
    sim, state = setup(cfg, data())
    if defense is not None:
        sim.defense = defense
    transport = InProcessTransport(sim)
    if attack is not None:
        transport = HostileTransport(transport, sim, 3, attack)
    for _ in range(rounds):
        state = run_round(sim, state, transport)
    return state.records, transport


@functools.cache
def honest(method: str) -> float:
    records, _ = run(method, None)
    return records[-1]["accuracy"]


@pytest.mark.parametrize("method,attack", [
    ("fedavg", "boost"), ("fedavg", "sign-flip"), ("fedavg", "bn-variance"), ("fedavg", "replay"),
    ("fedmrn-binary", "alpha"), ("fedmrn-binary", "replay"), ("fedmrn-binary", "bn-variance"),
])
def test_one_hostile_client_costs_at_most_two_points_at_default_settings(method, attack, caplog):
    with caplog.at_level(logging.WARNING):
        records, transport = run(method, attack)
    assert transport.rounds_attacked >= ROUNDS - 1
    assert honest(method) >= 0.95, "the honest run must learn for the comparison to mean anything"
    assert records[-1]["accuracy"] >= honest(method) - 0.02
    if attack in ("alpha", "replay", "bn-variance"):  # these are rejected outright, every round they happen
        assert sum(r["rejected"] for r in records) == transport.rounds_attacked
        assert {"alpha": "(binding)", "replay": "replay", "bn-variance": "(statistics)"}[attack] in caplog.text


def test_without_defences_a_boosted_client_destroys_the_model():
    """The attack is real: with Defense.off() the same client sends the model to chance level (within
    3 rounds; the honest run is the 8-round one the other tests compare with)."""
    records, _ = run("fedavg", "boost", defense=Defense.off(), rounds=3)
    assert records[-1]["accuracy"] <= 0.2 < honest("fedavg") - 0.5


def test_a_decoder_filed_under_another_client_is_refused():
    records, transport = run("ae-4", "foreign-decoder", rounds=3)  # decoders go up at the first selection
    assert transport.rounds_attacked >= 1
    assert sum(r["dropped"] for r in records) >= 1 + transport.rounds_attacked  # the attacker, and its victim


def test_an_absurd_decoder_is_rejected_with_its_updates(caplog):
    with caplog.at_level(logging.WARNING):
        records, transport = run("ae-4", "decoder", rounds=3)
    assert transport.rounds_attacked == 1  # a decoder goes up once, at the first selection
    assert "decoder layer 0 weight holds a weight of magnitude" in caplog.text
    assert [r["rejected"] for r in records] == [1, 1, 1]  # no decoder on the server: every update refused
