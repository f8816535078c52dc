"""Downlink integrity (fedcodec.fl.downlink): a delta broadcast carries the hashes of the replica it
was made for and of the model it produces; a client refuses what it cannot reconcile with its copy
(or what is not finite) without touching its store, the server then sends the whole model once, and
both ends hold the same bits again. The Flower path of the same recovery is in test_flower_hostile.py."""

from __future__ import annotations

import hashlib
import math
import struct

import pytest
import torch

from fedcodec.codecs import build_codec, wire
from fedcodec.errors import PayloadError
from fedcodec.fl import downlink as dl
from fedcodec.fl.client import client_fit, client_receive
from fedcodec.fl.downlink import FULL, HEADER_SIZE, PREFIX, RESYNC, STEP, Downlink, DownlinkError, model_hash
from fedcodec.fl.loop import DROPPED, InProcessTransport, run_round
from fedcodec.fl.simulation import setup
from helpers import tiny_spec
from test_engine import SOURCE, small_config


def delta_config(**kw):
    base = dict(num_clients=4, clients_per_round=4, rounds=4, downlink="qsgd", downlink_options={"levels": 255},
                downlink_delta=True, threads=1)
    return small_config("fedavg", **{**base, **kw})


def replica(store) -> dict[str, torch.Tensor]:
    return {k: v for k, v in store.items() if k.startswith(PREFIX)}


def assert_in_sync(sim, state, clients):
    for c in clients:
        client, server = replica(state.client_states[c]), replica(state.server_states[c])
        assert set(client) == set(server) == {PREFIX + t.name for t in sim.spec.tensors}
        assert all(torch.equal(client[k], server[k]) for k in client), f"client {c} is out of sync"
        assert RESYNC not in state.server_states[c]


def same_store(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tamper_step(sim, payload: bytes, round_num: int, client: int) -> bytes:
    """The same header and a *valid* codec payload (CRC and all) of a different step: only the
    result hash can tell."""
    down = sim.runtime.downlink
    step = down.codec.decode(payload[HEADER_SIZE:], down._ctx(round_num, client))
    name = sim.spec.tensors[0].name
    step[name] = step[name].clone()
    step[name].view(-1)[0] += 0.25
    return payload[:HEADER_SIZE] + down.codec.encode(step, down._ctx(round_num, client))


def test_delta_payload_layout_is_the_documented_header_then_the_codec_payload():
    cfg = delta_config(rounds=1)
    sim, state = setup(cfg, SOURCE)
    down = sim.runtime.downlink
    initial = {k: v.clone() for k, v in down.initial.items()}
    moved = {k: v + 0.01 for k, v in state.global_params.items()}
    payloads, views = down.send(moved, 1, [2], state.server_states)
    payload = payloads[2]
    kind, base, result = struct.unpack_from("<B8s8s", payload)
    assert (kind, HEADER_SIZE) == (STEP, 17)
    # BLAKE2b-8 over little-endian float32 values, tensor after tensor in spec order
    blob = b"".join(initial[t.name].numpy().astype("<f4").tobytes() for t in sim.spec.tensors)
    assert base == hashlib.blake2b(blob, digest_size=8).digest() == model_hash(initial, sim.spec)
    assert result == model_hash(views[2], sim.spec)
    body = payload[HEADER_SIZE:]
    wire.unpack(body, "qsgd", sim.spec.fingerprint)  # the codec's own envelope, CRC and all
    # the client takes it in and ends on the server's bits
    store = {}
    got = down.receive(payload, 1, 2, store)
    assert all(torch.equal(got[k], views[2][k]) for k in got) and same_store(replica(store), state.server_states[2])


def test_model_mode_payloads_are_the_codec_payload_unchanged():
    cfg = small_config("fedavg", rounds=1)
    sim, state = setup(cfg, SOURCE)
    payloads, _ = sim.runtime.downlink.send(state.global_params, 1, [0, 1], state.server_states)
    assert payloads[0] == payloads[1] == build_codec("fp32").encode(state.global_params,
                                                                     sim.runtime.downlink._ctx(1, -1))
    assert len(payloads[0]) == wire.envelope_overhead("fp32") + 4 * sim.spec.numel()


def test_tampered_step_is_refused_then_a_full_resend_puts_both_ends_back_on_the_same_bits(tmp_path):
    cfg = delta_config()
    sim, state = setup(cfg, SOURCE)
    down = sim.runtime.downlink
    real_send = down.send
    seen = []

    def send(global_params, round_num, clients, server_state):
        payloads, views = real_send(global_params, round_num, clients, server_state)
        if round_num == 2:
            payloads[1] = tamper_step(sim, payloads[1], round_num, 1)
        return payloads, views

    down.send = send
    transport = InProcessTransport(sim)
    state = run_round(sim, state, transport)
    assert_in_sync(sim, state, range(4))
    before = {k: v.clone() for k, v in state.client_states[1].items()}
    state = run_round(sim, state, transport, callbacks=(lambda st, rep: seen.append(rep),))
    # round 2: client 1 refused and answered instead of training; its store is untouched
    rep = seen[-1]
    assert rep.replies[1].status == DROPPED and rep.replies[1].resync
    assert rep.inbox.dropped[1].startswith("downlink out of sync (out-of-sync): the resulting model has hash")
    assert state.records[-1]["dropped"] == 1 and state.records[-1]["accepted"] == 3
    assert same_store(state.client_states[1], before)
    assert RESYNC in state.server_states[1]
    assert_in_sync(sim, state, (0, 2, 3))
    assert not any(e.client == 1 and e.direction == "up" and e.round == 2 for e in state.ledger.entries)
    # the marker is part of the run state: a checkpoint keeps it
    from fedcodec.fl import checkpoint

    checkpoint.save(tmp_path / "c.safetensors", cfg.to_dict(), state)
    state = checkpoint.load(tmp_path / "c.safetensors", cfg.to_dict())
    assert RESYNC in state.server_states[1]
    # round 3: client 1 gets the whole model (fp32, exact) and is back in step; the others get steps
    state = run_round(sim, state, transport, callbacks=(lambda st, rep: seen.append(rep),))
    sent = seen[-1].plan.broadcasts
    full_len = HEADER_SIZE + wire.envelope_overhead("fp32") + 4 * sim.spec.numel()
    assert sent[1][0] == FULL and len(sent[1]) == full_len
    assert all(sent[c][0] == STEP and len(sent[c]) < full_len / 3 for c in (0, 2, 3))
    down_rows = {e.client: e.nbytes for e in state.ledger.entries if e.round == 3 and e.direction == "down"}
    assert down_rows == {c: len(sent[c]) for c in range(4)}  # the ledger counts what was sent
    assert state.records[-1]["accepted"] == 4
    assert_in_sync(sim, state, range(4))
    state = run_round(sim, state, transport, callbacks=(lambda st, rep: seen.append(rep),))
    assert seen[-1].plan.broadcasts[1][0] == STEP  # one full resend, then steps again
    assert_in_sync(sim, state, range(4))


def test_a_client_whose_copy_was_lost_refuses_by_base_hash_and_recovers():
    """A node whose stored replica was corrupted (here: reset, as after losing its state) no longer
    holds what the server's step was made for: the base hash says so before anything is decoded."""
    cfg = delta_config(rounds=3, dropout=0.0)
    sim, state = setup(cfg, SOURCE)
    transport = InProcessTransport(sim)
    state = run_round(sim, state, transport)
    state.client_states[2] = {k: v.clone() for k, v in state.client_states[2].items()}
    name = sim.spec.tensors[-1].name
    state.client_states[2][PREFIX + name] = state.client_states[2][PREFIX + name] + 1.0  # corrupted copy
    corrupted = {k: v.clone() for k, v in state.client_states[2].items()}
    seen = []
    state = run_round(sim, state, transport, callbacks=(lambda st, rep: seen.append(rep),))
    assert seen[-1].inbox.dropped == {2: seen[-1].inbox.dropped[2]}
    assert "(out-of-sync): the step was made for a copy of the model with hash" in seen[-1].inbox.dropped[2]
    assert same_store(state.client_states[2], corrupted)
    state = run_round(sim, state, transport, callbacks=(lambda st, rep: seen.append(rep),))
    assert seen[-1].plan.broadcasts[2][0] == FULL and not seen[-1].inbox.dropped
    assert_in_sync(sim, state, range(4))


def test_a_simulated_dropout_refuses_too_and_is_resynced():
    """client_receive (a dropout takes in its broadcast, then fails) refuses a bad broadcast the same way."""
    cfg = delta_config(rounds=2, dropout=0.5, seed=6)
    sim, state = setup(cfg, SOURCE)
    from fedcodec.fl import rng

    dropouts = rng.round_failures(cfg.seed, 1, list(range(4)), cfg.dropout, 0.0)[0]
    victim = min(dropouts)
    state.client_states[victim] = {PREFIX + sim.spec.tensors[0].name: torch.full(sim.spec.tensors[0].shape, 9.0)}
    seen = []
    state = run_round(sim, state, InProcessTransport(sim), callbacks=(lambda st, rep: seen.append(rep),))
    assert seen[-1].inbox.dropped[victim].startswith("downlink out of sync (out-of-sync)")
    assert RESYNC in state.server_states[victim]
    state = run_round(sim, state, InProcessTransport(sim), callbacks=(lambda st, rep: seen.append(rep),))
    assert seen[-1].plan.broadcasts[victim][0] == FULL and victim not in seen[-1].inbox.dropped or \
        seen[-1].inbox.dropped[victim] == "simulated dropout"
    assert_in_sync(sim, state, range(4))


def fp32_delta(spec=None):
    spec = spec or tiny_spec()
    initial = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    return Downlink(build_codec("fp32"), True, spec, 0, initial), spec


def step_payload(down: Downlink, spec, replica, step, round_num=1, client=0, result=None) -> bytes:
    """A STEP broadcast built by hand: correct base hash, ``result`` the hash of replica + step by default."""
    body = down.codec.encode(step, down._ctx(round_num, client))
    if result is None:
        result = model_hash({n: replica[n] + step[n] for n in replica}, spec)
    return struct.pack("<B8s8s", STEP, model_hash(replica, spec), result) + body


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_non_finite_step_is_a_payload_error_and_changes_nothing(bad):
    down, spec = fp32_delta()
    store: dict[str, torch.Tensor] = {}
    step = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    step[spec.tensors[0].name].view(-1)[3] = bad
    payload = step_payload(down, spec, down.initial, step)
    with pytest.raises(PayloadError) as err:
        down.receive(payload, 1, 0, store)
    assert isinstance(err.value, DownlinkError) and err.value.reason == "nonfinite" and err.value.client == 0
    assert store == {}


def test_a_finite_step_that_overflows_the_model_is_refused():
    down, spec = fp32_delta()
    name = spec.tensors[0].name
    store = {PREFIX + t.name: torch.zeros(t.shape) for t in spec.tensors}
    store[PREFIX + name] = torch.full(spec.tensors[0].shape, 3e38)
    kept = {k: v.clone() for k, v in store.items()}
    step = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    step[name] = torch.full(spec.tensors[0].shape, 3e38)  # finite, but 3e38 + 3e38 = inf in float32
    payload = step_payload(down, spec, {t.name: store[PREFIX + t.name] for t in spec.tensors}, step,
                           result=bytes(8))
    with pytest.raises(DownlinkError, match="resulting model holds NaN or Inf") as err:
        down.receive(payload, 1, 0, store)
    assert err.value.reason == "nonfinite" and same_store(store, kept)


def test_full_model_and_model_mode_broadcasts_with_nan_are_refused():
    down, spec = fp32_delta()
    model = {t.name: torch.ones(t.shape) for t in spec.tensors}
    model[spec.tensors[1].name].view(-1)[0] = math.nan
    body = down.full.encode(model, down._ctx(1, 0))
    store: dict[str, torch.Tensor] = {}
    with pytest.raises(DownlinkError) as err:
        down.receive(struct.pack("<B8s8s", FULL, bytes(8), bytes(8)) + body, 1, 0, store)
    assert err.value.reason == "nonfinite" and store == {}
    plain = Downlink(build_codec("fp32"), False, spec, 0, down.initial)
    with pytest.raises(PayloadError) as err:
        plain.receive(plain.codec.encode(model, plain._ctx(1, -1)), 1, 5, None)
    assert isinstance(err.value, DownlinkError) and err.value.reason == "nonfinite" and err.value.client == 5


def test_malformed_delta_headers_are_refused():
    down, spec = fp32_delta()
    good = step_payload(down, spec, down.initial, {t.name: torch.ones(t.shape) for t in spec.tensors})
    store: dict[str, torch.Tensor] = {}
    for payload, reason in [(good[:10], "truncated"), (b"\x07" + good[1:], "downlink"),
                            (good[:-1], "size"),
                            (struct.pack("<B8s8s", FULL, bytes(8), bytes(8)) + good[HEADER_SIZE:], "out-of-sync")]:
        with pytest.raises(DownlinkError) as err:
            down.receive(payload, 1, 0, store)
        assert err.value.reason == reason, (reason, err.value)
        assert store == {}
    assert down.receive(good, 1, 0, store) and set(store) == {PREFIX + t.name for t in spec.tensors}


def test_client_fit_refuses_before_training_or_touching_any_store_entry():
    cfg = small_config("ef-signsgd", num_clients=4, clients_per_round=4, rounds=2, downlink="qsgd",
        downlink_options={"levels": 255}, downlink_delta=True, threads=1)
    sim, state = setup(cfg, SOURCE)
    state = run_round(sim, state, InProcessTransport(sim))
    store = state.client_states[0]
    assert any(not k.startswith(PREFIX) for k in store)  # error-feedback memory besides the copy
    kept = {k: v.clone() for k, v in store.items()}
    payloads, _ = sim.runtime.downlink.send(state.global_params, 2, [0], {0: dict(state.server_states[0])})
    bad = tamper_step(sim, payloads[0], 2, 0)
    x, y = sim.client_data(0)
    with pytest.raises(DownlinkError, match="refused broadcast \\(out-of-sync\\)"):
        client_fit(sim.runtime, bad, x, y, sim.training, 2, 0, state=store)
    with pytest.raises(DownlinkError):
        client_receive(sim.runtime, bad, 2, 0, state=store)
    assert same_store(store, kept)
    client_fit(sim.runtime, payloads[0], x, y, sim.training, 2, 0, state=store)  # the honest one goes in
    assert not same_store(store, kept)


def test_refusal_reason_is_short_and_distinctive():
    assert dl.refusal_reason("out-of-sync", "x" * 1000).startswith("downlink out of sync (out-of-sync): xxx")
    assert len(dl.refusal_reason("nonfinite", "y" * 1000)) < 400
