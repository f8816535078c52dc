"""The autoencoder codec (issue 4): pre-pass, decoder shipping, per-client decoders, refresh."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcodec.codecs import CodecContext, build_uplink, wire
from fedcodec.codecs.autoencoder import KEY, SETUP_ID, fingerprint
from fedcodec.config import Config
from fedcodec.data import make_synthetic_images
from fedcodec.errors import ConfigError, PayloadError
from fedcodec.fl import checkpoint
from fedcodec.fl.server import server_round
from fedcodec.fl.simulation import run_round, setup
from fedcodec.fl.rng import torch_generator
from helpers import random_update, tiny_spec

SOURCE = make_synthetic_images(400, 200, seed=0)
OPTS = dict(chunk=16, latent=4, hidden=0, ae_steps=50, snapshots=6)


def ae(**kw):
    """The ae uplink: its codec, and its setup (pre-pass, fit, decoder acceptance)."""
    return build_uplink("ae", **{**OPTS, **kw})


def client_ctx(spec, store, rnd=1, client=3, reference=None, metrics=None):
    if reference is None:
        reference = {t.name: torch.ones(t.shape) for t in spec.tensors}
    return CodecContext(spec, client=client, round=rnd, seed=9, rng=torch_generator(rnd * 100 + client),
                        reference=reference, state=store, metrics=metrics)


def snapshots(spec, n=6, seed=0):
    base = random_update(spec, seed, 0.01)
    return [{k: v * (i + 1) / n + 0.001 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed + i))
             for k, v in base.items()} for i in range(n)]


def fitted(codec, spec, client=3, seed=0):
    store, metrics = {}, {}
    message = codec.setup.fit(snapshots(spec, seed=seed), client_ctx(spec, store, client=client, metrics=metrics))
    return store, message, metrics


def server_store(codec, spec, message, client=3):
    store = {}
    codec.setup.accept_setup(message, CodecContext(spec, client=client, round=1, state=store))
    return store


@pytest.mark.parametrize("hidden,dtype", [(0, "fp16"), (8, "fp32"), (8, "fp16")])
def test_decoder_bytes_round_trip_to_an_identical_decoder(hidden, dtype):
    spec = tiny_spec()
    codec = ae(hidden=hidden, decoder_dtype=dtype)
    store, message, metrics = fitted(codec, spec)
    got = codec.setup.read_decoder(message, spec)
    mine = {k: v for k, v in store.items() if k.startswith(KEY + "dec/")}
    assert got.keys() == mine.keys() and len(got) == (4 if hidden else 2)
    assert all(torch.equal(got[k], mine[k]) for k in got)
    itemsize = 2 if dtype == "fp16" else 4
    assert len(message) == wire.envelope_overhead(SETUP_ID) + 13 + itemsize * codec.codec.decoder_numel()
    assert metrics["ae_decoder_bytes"] == len(message) and 0 <= metrics["ae_fit_error"] < 1
    assert bytes(store[KEY + "fingerprint"].numpy()) == fingerprint(message)


@pytest.mark.parametrize("bits,entropy", [(8, False), (8, True), (4, False), (0, False)])
def test_latents_decode_on_the_server_to_the_update_the_client_computed(bits, entropy):
    spec = tiny_spec()
    codec = ae(bits=bits, entropy=entropy) if bits else ae(bits=0)
    store, message, _ = fitted(codec, spec)
    update = random_update(spec, 5, 0.01)
    metrics = {}
    payload = codec.encode(update, client_ctx(spec, store, rnd=2, metrics=metrics))
    mine = codec.decode(payload, client_ctx(spec, store, rnd=2))
    theirs = codec.decode(payload, client_ctx(spec, server_store(codec, spec, message), rnd=2))
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    coded = [t.name for t in codec.codec.coded_specs(spec)[0]]  # the error is the AE's: of the tensors it codes
    err = math.sqrt(sum(float((mine[k].double() - update[k].double()).pow(2).sum()) for k in coded)
                    / sum(float(update[k].double().pow(2).sum()) for k in coded))
    assert metrics["ae_error"] == pytest.approx(err, rel=1e-6)
    assert float(store[KEY + "error"]) == pytest.approx(err, rel=1e-6)


def test_payload_length_matches_the_format():
    spec = tiny_spec()
    for dense, bits in (("ae", 8), ("fp32", 8), ("ae", 0), ("ae", 3)):
        codec = ae(dense=dense, bits=bits)
        store, _, _ = fitted(codec, spec)
        payload = codec.encode(random_update(spec, 1), client_ctx(spec, store, rnd=2))
        coded, plain = codec.codec.coded_specs(spec)
        count = codec.codec.num_chunks(spec) * codec.codec.latent
        latents = 2 * count if bits == 0 else 4 * codec.codec.latent + math.ceil(count * bits / 8)
        width = 2 if dense == "ae" else 4  # running statistics in float16 beside the AE's latents
        assert all(t.role == "buffer" for t in plain) == (dense == "ae")
        expected = (wire.envelope_overhead("ae") + 8 + 4 * len(coded) + latents + width * sum(t.numel for t in plain))
        assert len(payload) == expected, (dense, bits)


def test_a_linear_ae_reconstructs_updates_from_its_own_subspace_almost_exactly():
    """Snapshots spanning a 2-dimensional subspace of chunks: a 4-latent linear AE must learn it
    (relative error well below 1), while a 1-latent one cannot."""
    spec = tiny_spec()
    g = torch.Generator().manual_seed(0)
    codec = ae(latent=4, ae_steps=400, ae_lr=1e-2, chunk=16, dense="ae")
    n = sum(t.numel for t in spec.tensors)
    chunks = -(-n // 16)
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    snaps = []
    for i in range(8):
        coeff = torch.randn(chunks, 2, generator=g)
        flat = (coeff[:, :1] * a + coeff[:, 1:] * b).reshape(-1)[:n]
        snaps.append(spec.unflatten(flat.numpy().copy(), list(spec.tensors)))
    ref = {t.name: torch.ones(t.shape) for t in spec.tensors}
    # keep running variances out of the log transform's way: their "update" is log-coded
    store = {}
    codec.setup.fit(snaps, client_ctx(spec, store, reference=ref))
    m = {}
    codec.encode(snaps[-1], client_ctx(spec, store, rnd=2, reference=ref, metrics=m))
    assert m["ae_error"] < 0.2


def test_a_client_without_a_registered_decoder_is_rejected_and_the_model_kept():
    spec = tiny_spec()
    codec = ae()
    store, message, _ = fitted(codec, spec)
    payload = codec.encode(random_update(spec, 1), client_ctx(spec, store, rnd=2))
    glob = {t.name: torch.ones(t.shape) for t in spec.tensors}
    new, outcome = server_round(codec, spec, glob, 2, {3: (payload, 1.0)}, stores={})
    assert outcome.rejected and "no-decoder" in outcome.rejected[3] and "client 3" in outcome.rejected[3]
    assert new is glob
    # with the decoder shipped in the same round, the same payload is accepted
    stores = {}
    new, outcome = server_round(codec, spec, glob, 2, {3: (payload, 1.0)}, setups={3: message}, stores=stores)
    assert outcome.accepted == [3] and KEY + "fingerprint" in stores[3]


def test_latents_for_another_decoder_are_rejected():
    spec = tiny_spec()
    codec = ae()
    store_a, message_a, _ = fitted(codec, spec, seed=0)
    store_b, _, _ = fitted(codec, spec, seed=1)  # a refit the server never received
    payload = codec.encode(random_update(spec, 1), client_ctx(spec, store_b, rnd=2))
    with pytest.raises(PayloadError, match="decoder-mismatch") as err:
        codec.decode(payload, client_ctx(spec, server_store(codec, spec, message_a), rnd=2))
    assert err.value.client == 3


def test_malformed_decoders_are_rejected_and_leave_the_store_unchanged():
    spec = tiny_spec()
    codec = ae()
    _, message, _ = fitted(codec, spec)
    store = server_store(codec, spec, message)
    before = {k: v.clone() for k, v in store.items()}
    body = bytes(wire.unpack(message, SETUP_ID, spec.fingerprint))
    bad = [
        ("size", message[:-7]),  # truncated in transit: the envelope's declared length disagrees
        ("checksum", message[:-1] + bytes([message[-1] ^ 1])),
        ("decoder", wire.pack(SETUP_ID, spec.fingerprint, body[:4] + (5).to_bytes(4, "little") + body[8:])),
        ("size", wire.pack(SETUP_ID, spec.fingerprint, body + b"\0\0")),
        ("truncated", wire.pack(SETUP_ID, spec.fingerprint, body[:6])),
        ("nonfinite", wire.pack(SETUP_ID, spec.fingerprint, body[:13] + np.float16(np.inf).tobytes() + body[15:])),
    ]
    for reason, msg in bad:
        with pytest.raises(PayloadError) as err:
            codec.setup.accept_setup(msg, CodecContext(spec, client=4, round=3, state=store))
        assert err.value.reason == reason and err.value.client == 4
        assert store.keys() == before.keys() and all(torch.equal(store[k], before[k]) for k in store)
    with pytest.raises(PayloadError, match="for codec .ae.,"):  # latents sent where a decoder belongs
        codec.setup.accept_setup(codec.encode(random_update(spec), client_ctx(spec, fitted(codec, spec)[0])),
                           CodecContext(spec, client=4, round=3, state=store))


def test_refresh_after_r_rounds_and_after_a_large_error():
    spec = tiny_spec()
    store = {}
    assert ae().setup.prepass(client_ctx(spec, store)) is not None  # never fitted: pre-pass
    ae().setup.fit(snapshots(spec), client_ctx(spec, store, rnd=2))
    assert ae().setup.prepass(client_ctx(spec, store, rnd=5)) is None
    assert ae(refresh_every=3).setup.prepass(client_ctx(spec, store, rnd=4)) is None
    assert ae(refresh_every=3).setup.prepass(client_ctx(spec, store, rnd=5)) is not None
    store[KEY + "error"] = torch.tensor(0.5)
    assert ae(refresh_error=0.6).setup.prepass(client_ctx(spec, store, rnd=5)) is None
    assert ae(refresh_error=0.4).setup.prepass(client_ctx(spec, store, rnd=5)) is not None
    plan = ae(prepass_epochs=3, snapshots=7).setup.prepass(client_ctx(spec, {}))
    assert (plan.epochs, plan.snapshots) == (3, 7)


def test_running_variances_stay_positive_whatever_the_reconstruction():
    spec = tiny_spec()
    codec = ae(latent=1, ae_steps=5)  # a poor AE
    store, message, _ = fitted(codec, spec)
    ref = {t.name: torch.full(t.shape, 0.05) for t in spec.tensors}
    update = random_update(spec, 2, 0.04)
    update["bn.running_var"] = torch.tensor([-0.0499, 0.3, -0.02])  # the client's variance: tiny, large, small
    out = codec.decode(codec.encode(update, client_ctx(spec, store, rnd=2, reference=ref)),
                       client_ctx(spec, store, rnd=2, reference=ref))
    assert (ref["bn.running_var"] + out["bn.running_var"] > 0).all()


def test_options_are_validated():
    for bad in ({"latent": 16, "chunk": 16}, {"bits": 17}, {"dense": "fp16"}, {"decoder_dtype": "int8"},
                {"hidden": -1}, {"ae_lr": 0.0}, {"refresh_error": -1.0}, {"chunk": 1}):
        with pytest.raises(ConfigError):
            ae(**bad)
    with pytest.raises(ConfigError, match="entropy"):
        ae(bits=0, entropy=True)
    with pytest.raises(ConfigError, match="fitted"):
        ae().encode(random_update(tiny_spec()), client_ctx(tiny_spec(), {}))


# -- in the engine --------------------------------------------------------------------------------------

def small(**kw) -> Config:
    base = dict(method="ae-4", num_clients=8, clients_per_round=3, rounds=4, local_epochs=1, batch_size=16,
                seed=3, threads=1, codec_options={"chunk": 64, "ae_steps": 30, "snapshots": 4})
    return Config(**{**base, **kw}).validate()


def run(cfg, state=None, sim=None, rounds=None):
    if sim is None:
        sim, state = setup(cfg, SOURCE)
    for _ in range(rounds or cfg.rounds):
        state = run_round(sim, state)
    return sim, state


def test_each_client_ships_its_decoder_once_on_first_selection_and_the_ledger_counts_it():
    sim, state = run(small())
    ups = [e for e in state.ledger.entries if e.direction == "up"]
    setups = [e for e in ups if e.codec == "ae/setup"]
    first = {}
    for e in ups:
        first.setdefault(e.client, e.round)
    # newcomers (clients first selected after round 1) run their own pre-pass on first selection
    assert {(e.client, e.round) for e in setups} == set(first.items())
    assert any(r > 1 for r in first.values())
    assert len(setups) == len(first)  # once each (no refresh)
    for r in state.records:
        assert r["uplink_bytes"] == sum(e.nbytes for e in ups if e.round == r["round"])
        assert r.get("setup_bytes", 0) == sum(e.nbytes for e in setups if e.round == r["round"])
        assert r["accepted"] == r["clients"] and 0 < r["client/ae_error"] < 2
    assert all(KEY + "fingerprint" in state.server_states[c] for c in first)
    assert not any(k.startswith(KEY + "enc/") for s in state.server_states.values() for k in s)  # encoders stay


def test_refresh_every_ships_new_decoders():
    """refresh_every = 1: both clients refit and ship a new decoder every round they take part in."""
    _, state = run(small(codec_options={"chunk": 64, "ae_steps": 30, "snapshots": 4, "refresh_every": 1},
                         num_clients=2, clients_per_round=2, rounds=2))
    setups = sorted((e.round, e.client) for e in state.ledger.entries if e.codec.endswith("/setup"))
    assert setups == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r["accepted"] == 2 for r in state.records)  # the new decoders decode that round's latents


def test_error_feedback_with_the_ae_and_resume_is_bit_identical(tmp_path):
    cfg = small(method="ae-4-ef", rounds=2)
    _, straight = run(cfg)
    sim, state = run(cfg, rounds=1)
    assert any(k.startswith("ef/") for s in state.client_states.values() for k in s)
    checkpoint.save(tmp_path / "ck.safetensors", cfg.to_dict(), state)
    restored = checkpoint.load(tmp_path / "ck.safetensors", cfg.to_dict())
    sim2, _ = setup(cfg, SOURCE)
    _, resumed = run(cfg, restored, sim2, rounds=1)
    assert all(torch.equal(straight.global_params[k], resumed.global_params[k]) for k in straight.global_params)
    assert [e.nbytes for e in straight.ledger.entries] == [e.nbytes for e in resumed.ledger.entries]


def test_report_separates_decoder_bytes_from_per_update_bytes():
    from fedcodec.report import markdown_table, summarize

    sim, state = run(small(rounds=2))
    s = summarize("ae-4", state.records, sim.spec)
    setup_bytes = sum(e.nbytes for e in state.ledger.entries if e.codec.endswith("/setup"))
    updates = [e.nbytes for e in state.ledger.entries if e.codec == "ae"]
    assert s["setup_total_bytes"] == setup_bytes > 0
    assert s["uplink_total_bytes"] == setup_bytes + sum(updates)
    assert s["uplink_bytes_per_update"] == pytest.approx(sum(updates) / len(updates))
    assert 0 < s["codec_metrics"]["ae_error"] < 2 and s["codec_metrics"]["ae_decoder_bytes"] > 0
    table = markdown_table([s])
    assert "ratio per update" in table and table.splitlines()[1].count("|") == table.splitlines()[2].count("|")
