"""The round loop (fedcodec.fl.loop): plan → exchange → ingest → server step → callbacks, shared by
the in-process and the Flower transport (tests/test_flower.py checks the two agree)."""

from __future__ import annotations

import logging

import torch

from fedcodec.fl import loop
from fedcodec.fl.downlink import PREFIX
from fedcodec.fl.loop import DROPPED, OK, TIMED_OUT, InProcessTransport, Reply, run_round
from fedcodec.fl.simulation import setup
from test_engine import SOURCE, small_config


def test_a_dropout_still_takes_in_its_broadcast_under_a_delta_downlink():
    """A simulated dropout fails *after* the broadcast: its copy of the model must advance with the
    server's replica, or the two drift apart for good (the client would train from one model and the
    server decode its update against another)."""
    cfg = small_config("fedavg", num_clients=4, clients_per_round=4, rounds=4, dropout=0.5, downlink="qsgd",
                       downlink_options={"levels": 15}, downlink_delta=True)
    sim, state = setup(cfg, SOURCE)
    for _ in range(cfg.rounds):
        state = run_round(sim, state, InProcessTransport(sim))
    assert [r["dropped"] for r in state.records] == [2, 2, 2, 2]
    for c in range(cfg.num_clients):
        client, server = state.client_states[c], state.server_states[c]
        names = sorted(k for k in server if k.startswith(PREFIX))
        assert names and names == sorted(k for k in client if k.startswith(PREFIX))
        assert all(torch.equal(client[k], server[k]) for k in names), f"client {c}'s copy drifted"


def test_weights_are_the_partition_sizes_the_server_knows(monkeypatch, caplog):
    """A client claiming a huge number of examples gets no more say in the aggregate."""
    cfg = small_config("fedavg", rounds=1)
    sim, honest = setup(cfg, SOURCE)
    honest = run_round(sim, honest, InProcessTransport(sim))
    real = loop.client_fit

    def boasting(rt, broadcast, x, y, training, rnd, client, **kw):
        payload, info = real(rt, broadcast, x, y, training, rnd, client, **kw)
        return payload, info | ({"num_examples": 10**9} if client == 1 else {})

    monkeypatch.setattr(loop, "client_fit", boasting)
    sim, state = setup(cfg, SOURCE)
    with caplog.at_level(logging.WARNING, logger="fedcodec.loop"):
        state = run_round(sim, state, InProcessTransport(sim))
    assert "client 1 reports 1000000000 examples" in caplog.text
    assert all(torch.equal(state.global_params[k], honest.global_params[k]) for k in honest.global_params)


def test_ingest_counts_bytes_of_stragglers_not_of_dropouts_and_keeps_client_order():
    cfg = small_config("fedmrn-binary", rounds=1)
    sim, state = setup(cfg, SOURCE)
    plan = loop.plan_round(sim, state, lambda cs: set(cs[1:]))  # the first sampled client is unreachable
    a, b, c, d = plan.clients
    assert plan.unreachable == {a} and set(plan.broadcasts) == {b, c, d}
    replies = {b: Reply(b, DROPPED, reason="simulated dropout"),
               c: Reply(c, TIMED_OUT, payload=b"x" * 7, setup=b"y" * 3, num_examples=1, train_loss=2.0),
               d: Reply(d, OK, payload=b"z" * 5, num_examples=sim.client_size(d), train_loss=4.0,
                        metrics={"m": 1.0})}
    inbox = loop.ingest(sim, state, plan, replies)
    rows = [(e.client, e.direction, e.codec, e.nbytes) for e in state.ledger.entries]
    n = len(plan.broadcasts[b])
    assert rows == [(b, "down", "fp32", n), (c, "down", "fp32", n), (c, "up", "fedmrn/setup", 3),
                    (c, "up", "fedmrn", 7), (d, "down", "fp32", n), (d, "up", "fedmrn", 5)]
    assert inbox.payloads == {d: (b"z" * 5, float(sim.client_size(d)))}
    assert inbox.setups == {c: b"y" * 3} and inbox.losses == [2.0, 4.0] and inbox.metrics == [{}, {"m": 1.0}]
    assert inbox.dropped == {a: "no SuperNode holds this partition", b: "simulated dropout"}
    assert set(inbox.timed_out) == {c}


def test_callbacks_see_every_round_after_its_record():
    cfg = small_config("fedavg", rounds=2, dropout=0.25)
    sim, state = setup(cfg, SOURCE)
    seen = []

    def callback(st, report):
        seen.append((st.round, report.record is st.records[-1], sorted(report.replies),
                     [c for c, r in sorted(report.replies.items()) if r.status == DROPPED]))

    for _ in range(cfg.rounds):
        state = run_round(sim, state, InProcessTransport(sim), callbacks=(callback,))
    assert [s[:2] for s in seen] == [(1, True), (2, True)]
    assert all(len(s[3]) == 1 and s[2] == sorted(s[2]) and len(s[2]) == 4 for s in seen)


def test_server_optimizer_state_is_checkpointed_and_resume_is_bit_identical(tmp_path):
    from fedcodec.fl import checkpoint

    cfg = small_config("fedavg", rounds=3, server_optimizer="adam", server_lr=0.01)
    sim, whole = setup(cfg, SOURCE)
    for _ in range(cfg.rounds):
        whole = run_round(sim, whole, InProcessTransport(sim))
    assert {"m/classifier.weight", "v/classifier.weight"} <= set(whole.optimizer_state)
    assert not any("running" in k for k in whole.optimizer_state)  # running statistics have no optimizer
    sim, part = setup(cfg, SOURCE)
    part = run_round(sim, part, InProcessTransport(sim))
    checkpoint.save(tmp_path / "c.safetensors", cfg.to_dict(), part)
    sim, part = setup(cfg, SOURCE)  # a new process
    part = checkpoint.load(tmp_path / "c.safetensors", cfg.to_dict())
    assert set(part.optimizer_state) == set(whole.optimizer_state)
    for _ in range(2):
        part = run_round(sim, part, InProcessTransport(sim))
    assert all(torch.equal(part.global_params[k], whole.global_params[k]) for k in whole.global_params)
    assert all(torch.equal(part.optimizer_state[k], whole.optimizer_state[k]) for k in whole.optimizer_state)
    sim, plain = setup(small_config("fedavg", rounds=3), SOURCE)
    for _ in range(cfg.rounds):
        plain = run_round(sim, plain, InProcessTransport(sim))
    assert plain.optimizer_state == {}
    assert not torch.equal(plain.global_params["classifier.weight"], whole.global_params["classifier.weight"])
    # running statistics are averaged plainly under every optimizer: round 1 moves them identically
    sim, a = setup(small_config("fedavg", rounds=1), SOURCE)
    sim2, b = setup(small_config("fedavg", rounds=1, server_optimizer="adam", server_lr=0.01), SOURCE)
    a, b = run_round(sim, a, InProcessTransport(sim)), run_round(sim2, b, InProcessTransport(sim2))
    buffers = [t.name for t in sim.spec.tensors if t.role == "buffer"]
    assert buffers and all(torch.equal(a.global_params[n], b.global_params[n]) for n in buffers)


def test_the_loop_hands_the_round_number_to_the_warm_up():
    """server_warmup=4: round 1 moves the model a quarter of the plain FedAvg step (same clients,
    same updates)."""
    sim, plain = setup(small_config("fedavg", rounds=1), SOURCE)
    start = {k: v.clone() for k, v in plain.global_params.items()}
    plain = run_round(sim, plain, InProcessTransport(sim))
    sim2, ramped = setup(small_config("fedavg", rounds=1, server_warmup=4), SOURCE)
    ramped = run_round(sim2, ramped, InProcessTransport(sim2))
    weights = [t.name for t in sim.spec.tensors if t.role != "buffer"]
    for n in weights:
        torch.testing.assert_close(ramped.global_params[n] - start[n], 0.25 * (plain.global_params[n] - start[n]),
                                   rtol=0, atol=1e-6)
    assert any(not torch.equal(ramped.global_params[n], plain.global_params[n]) for n in weights)


def test_a_round_that_keeps_the_model_leaves_the_optimizer_state_alone():
    cfg = small_config("fedavg", rounds=2, server_optimizer="momentum", max_update_norm=1e-9)
    sim, state = setup(cfg, SOURCE)
    state = run_round(sim, state, InProcessTransport(sim))
    assert state.records[-1]["accepted"] == 0 and state.optimizer_state == {}


def test_server_optimizers_refuse_a_method_that_sets_the_model_directly():
    """FedPM's server step is a Beta posterior (it sets θ), not "add the aggregated update": a server
    optimizer has nothing to act on, and the config says so instead of silently mixing them."""
    import pytest

    from fedcodec.errors import ConfigError

    with pytest.raises(ConfigError, match="server step is not 'add the aggregated update'"):
        small_config("fedpm", server_optimizer="adam")
    with pytest.raises(ConfigError, match="leave server_optimizer=sgd"):
        small_config("fedpm", server_lr=0.5)
    assert small_config("fedpm", server_lr=1.0).server_lr == 1.0  # plain FedAvg step: allowed
    assert small_config("fedmrn-binary", server_optimizer="yogi").server_optimizer == "yogi"
