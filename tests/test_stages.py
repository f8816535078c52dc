"""Composable stages (error feedback, entropy coding), the downlink, and per-client state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcodec.codecs import Codec, build_codec, build_uplink, wire
from fedcodec.codecs.stages import RESIDUAL, ErrorFeedback
from fedcodec.config import Config
from fedcodec.data import make_synthetic_images
from fedcodec.errors import ConfigError
from fedcodec.fl import checkpoint
from fedcodec.fl.simulation import run_round, setup
from helpers import ctx, random_update, tiny_spec

SOURCE = make_synthetic_images(400, 200, seed=0)


class Rounding(Codec):
    """A lossy test codec: every value rounded to a multiple of 0.01, sent as float32."""

    codec_id = "round"

    def encode_body(self, update, c):
        return (torch.round(torch.from_numpy(c.spec.flatten(update, list(c.spec.tensors))) * 100) / 100).numpy() \
            .astype("<f4").tobytes()

    def decode_body(self, reader, c):
        return c.spec.unflatten(reader.array("<f4", c.spec.numel(), "values"), list(c.spec.tensors))


def test_error_feedback_identity_sent_plus_memory_equals_input():
    """EF's defining property: what the server received over all rounds plus the memory equals the
    sum of the true updates, exactly up to float rounding (for trained tensors; running statistics
    keep no memory)."""
    spec = tiny_spec()
    codec = Rounding()
    ef, state = ErrorFeedback(codec), {}
    sent = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    true = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    for r in range(5):
        upd = random_update(spec, seed=r, scale=0.004)  # most values round to 0 on their own
        c = ctx(spec)
        c.state = state
        got = codec.decode(ef.encode(upd, c), c)
        for n in true:
            true[n] += upd[n]
            sent[n] += got[n]
    trained = [t.name for t in spec.tensors if t.role != "buffer"]  # running statistics get no memory
    for n in trained:
        mem = state.get(RESIDUAL + n, torch.zeros_like(true[n]))
        assert torch.allclose(sent[n] + mem, true[n], atol=1e-6)
    # without EF the error of every round stays lost: the received sum is further from the truth
    plain = Rounding()
    err_plain = err_ef = 0.0
    for n in trained:
        got = sum(plain.decode(plain.encode(random_update(spec, seed=r, scale=0.004), ctx(spec)), ctx(spec))[n]
                  for r in range(5))
        err_plain += float((got - true[n]).abs().sum())
        err_ef += float((sent[n] - true[n]).abs().sum())
    assert err_ef < 0.5 * err_plain


def test_error_feedback_needs_a_state_store_and_a_lossy_codec():
    spec = tiny_spec()
    with pytest.raises(ConfigError, match="state store"):
        ErrorFeedback(Rounding()).encode(random_update(spec), ctx(spec))
    with pytest.raises(ConfigError, match="lossless"):
        build_uplink("fp32", ef=True)
    with pytest.raises(ConfigError, match="uplink only"):  # a plain codec (the downlink's) takes no ef
        build_codec("fedmrn", ef=True)
    with pytest.raises(ConfigError, match="no symbols"):
        build_codec("fp32", entropy=True)


def test_error_feedback_keeps_the_wire_format_of_its_codec():
    spec = tiny_spec()
    plain, ef = build_codec("fedmrn"), build_uplink("fedmrn", ef=True)
    c1, c2 = ctx(spec), ctx(spec)
    c2.state = {}
    assert plain.encode(random_update(spec), c1) == ef.encode(random_update(spec), c2)  # empty memory


def test_entropy_stage_changes_the_wire_id_and_is_refused_by_the_plain_decoder():
    spec = tiny_spec()
    ec = build_codec("fedmrn", entropy=True)
    payload = ec.encode(random_update(spec), ctx(spec))
    assert ec.codec_id == "fedmrn+ec"
    assert torch.equal(ec.decode(payload, ctx(spec))["conv.weight"],
                       build_codec("fedmrn").decode(build_codec("fedmrn").encode(random_update(spec), ctx(spec)),
                                                    ctx(spec))["conv.weight"])
    with pytest.raises(Exception) as err:
        build_codec("fedmrn").decode(payload, ctx(spec))
    assert getattr(err.value, "reason", None) == "codec"


def small(**kw) -> Config:
    base = dict(method="fedmrn-binary", num_clients=6, clients_per_round=3, rounds=3, local_epochs=1,
                batch_size=16, seed=5, threads=1)
    return Config(**{**base, **kw}).validate()


def run(cfg: Config, state=None, sim=None, rounds=None):
    if sim is None:
        sim, state = setup(cfg, SOURCE)
    for _ in range(rounds or cfg.rounds):
        state = run_round(sim, state)
    return sim, state


def test_fp16_downlink_halves_the_broadcast_and_clients_train_from_the_rounded_model():
    sim32, s32 = run(small())
    sim16, s16 = run(small(downlink="fp16"))
    n = sim16.spec.numel()
    for e in s16.ledger.entries:
        if e.direction == "down":
            assert e.nbytes == wire.envelope_overhead("fp16") + 2 * n
            assert e.codec == "fp16"
    assert s16.ledger.total("down") < 0.51 * s32.ledger.total("down")
    assert any(not torch.equal(s16.global_params[k], s32.global_params[k]) for k in s16.global_params)


def test_a_lossy_model_downlink_needs_delta_mode():
    with pytest.raises(ConfigError, match="downlink_delta"):
        small(downlink="fedmrn")


def test_delta_downlink_client_copies_equal_the_server_replicas_bit_for_bit():
    sim, state = run(small(downlink="fedmrn", downlink_options={"alpha": 0.001}, downlink_delta=True, rounds=4))
    seen = [c for c in state.client_states if any(k.startswith("down/") for k in state.client_states[c])]
    assert len(seen) >= 3
    for c in seen:
        client = {k: v for k, v in state.client_states[c].items() if k.startswith("down/")}
        server = {k: v for k, v in state.server_states[c].items() if k.startswith("down/")}
        assert set(client) == set(server) == {f"down/{t.name}" for t in sim.spec.tensors}
        assert all(torch.equal(client[k], server[k]) for k in client)
    # the broadcast costs what the delta codec's payload costs, not a float32 model
    fp32_model = wire.envelope_overhead("fp32") + 4 * sim.spec.numel()
    assert all(e.nbytes < fp32_model / 10 for e in state.ledger.entries if e.direction == "down")


def test_resume_with_client_memory_and_downlink_replicas_is_bit_identical(tmp_path):
    cfg = small(codec_options={"ef": True}, downlink="fedmrn", downlink_options={"alpha": 0.001},
                downlink_delta=True, rounds=3)
    _, straight = run(cfg)
    sim, state = run(cfg, rounds=2)
    assert any(k.startswith(RESIDUAL) for s in state.client_states.values() for k in s)
    checkpoint.save(tmp_path / "ck.safetensors", cfg.to_dict(), state)
    restored = checkpoint.load(tmp_path / "ck.safetensors", cfg.to_dict())
    assert restored.client_states.keys() == state.client_states.keys()
    sim2, _ = setup(cfg, SOURCE)
    _, resumed = run(cfg, restored, sim2, rounds=1)
    assert all(torch.equal(straight.global_params[k], resumed.global_params[k]) for k in straight.global_params)
    for c, store in straight.client_states.items():
        assert all(torch.equal(v, resumed.client_states[c][k]) for k, v in store.items())


def test_checkpoint_from_an_older_version_without_new_keys_still_resumes(tmp_path):
    cfg = small(rounds=1)
    _, state = run(cfg)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("downlink_options", "downlink_delta")}
    checkpoint.save(tmp_path / "ck.safetensors", old, state)
    assert checkpoint.load(tmp_path / "ck.safetensors", cfg.to_dict()).round == 1
    changed = small(rounds=1, downlink_delta=True, downlink="fp16").to_dict()
    with pytest.raises(ConfigError, match="downlink"):
        checkpoint.load(tmp_path / "ck.safetensors", changed)


def test_ef_run_ledger_matches_payload_formula():
    sim, state = run(small(codec_options={"ef": True}, rounds=2))
    spec = sim.spec
    expected = (wire.envelope_overhead("fedmrn") + 14 + math.ceil(spec.numel(("weight",)) / 8)
                + 4 * spec.numel(("param", "buffer")))
    assert {e.nbytes for e in state.ledger.entries if e.direction == "up"} == {expected}


def test_error_feedback_keeps_no_memory_for_running_statistics_and_survives_an_undecodable_payload():
    spec = tiny_spec()
    codec = ErrorFeedback(Rounding())
    c = ctx(spec)
    c.state = {}
    codec.encode(random_update(spec, 3, 0.0123), c)
    buffers = {t.name for t in spec.tensors if t.role == "buffer"}
    assert buffers and not any(k[len(RESIDUAL):] in buffers for k in c.state)
    assert any(k.startswith(RESIDUAL) for k in c.state)
    bad = random_update(spec, 4)
    bad[spec.names[0]] = torch.full(bad[spec.names[0]].shape, float("nan"))
    payload = codec.encode(bad, c)  # the server rejects it; the client neither crashes nor keeps NaN memory
    assert payload and not any(k.startswith(RESIDUAL) for k in c.state)


def test_payload_errors_survive_pickling():
    import pickle

    from fedcodec.errors import PayloadError

    err = pickle.loads(pickle.dumps(PayloadError("size", "too long", 7)))
    assert (err.reason, err.detail, err.client, str(err)) == ("size", "too long", 7, str(PayloadError("size", "too long", 7)))


class Ternary(Codec):
    """A new codec in one small class: every value to -s, 0 or +s (s: half the largest magnitude),
    sent as a float32 scale and one symbol section of alphabet 3. Nothing but the wire format."""

    codec_id = "ternary"
    symbolic = True

    def encode_body(self, update, c):
        flat = c.spec.flatten(update, list(c.spec.tensors))
        s = np.float32(np.abs(flat).max() / 2) if flat.size else np.float32(0)
        q = np.clip(np.rint(flat / s), -1, 1) + 1 if s > 0 else np.ones(flat.size)
        return self.writer().f32(s).symbols(q.astype(np.uint8), 3).getvalue()

    def decode_body(self, reader, c):
        s = np.float32(reader.f32("scale"))
        q = reader.symbols(c.spec.numel(), 3, "levels")
        return c.spec.unflatten((q.astype(np.float32) - 1) * s, list(c.spec.tensors))


def test_a_new_codec_runs_with_error_feedback_and_the_entropy_stage_without_engine_changes(monkeypatch):
    from fedcodec.codecs import registry
    from fedcodec.config import METHODS, Method

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registered for this test only
    registry.register("ternary", "three levels per value (test codec)")(Ternary)
    monkeypatch.setitem(METHODS, "ternary-ef-ec", Method("ternary", {"ef": True, "entropy": True}, 0.03, "test"))
    uplink = build_uplink("ternary", ef=True, entropy=True)
    assert uplink.codec_id == "ternary+ec" and uplink.error_feedback and uplink.setup is None
    sim, state = run(small(method="ternary-ef-ec", rounds=3))
    ups = [e for e in state.ledger.entries if e.direction == "up"]
    assert len(ups) == 9 and {e.codec for e in ups} == {"ternary+ec"}
    assert [r["accepted"] for r in state.records] == [3, 3, 3]
    assert all(math.isfinite(r["accuracy"]) for r in state.records)
    assert any(k.startswith(RESIDUAL) for s in state.client_states.values() for k in s)  # EF kept memory
    # range coding pays: the symbols of a mostly-zero update cost less than the 2 bits of fixed width
    n = sim.spec.numel()
    assert max(e.nbytes for e in ups) < wire.envelope_overhead("ternary") + 4 + n // 4
    assert any(not torch.equal(state.global_params[k], v) for k, v in sim.runtime.downlink.initial.items())


def test_the_entropy_stage_builds_a_new_codec_and_leaves_the_plain_one_alone():
    plain, coded = build_codec("signsgd"), build_codec("signsgd", entropy=True)
    assert plain is not coded and plain.codec_id == "signsgd" and coded.codec_id == "signsgd+ec"
    assert not plain.entropy and coded.entropy
    assert build_codec("signsgd").codec_id == "signsgd" == type(coded).codec_id  # nothing shared was changed
    assert build_uplink("signsgd", entropy=True).codec_id == "signsgd+ec"


def test_options_are_typed_and_unknown_or_ill_typed_ones_name_the_option():
    with pytest.raises(ConfigError, match="levels"):
        build_codec("qsgd", levels="4")
    with pytest.raises(ConfigError, match="vote"):
        build_uplink("signsgd", vote=1)
    with pytest.raises(ConfigError, match="bits"):
        build_codec("fedmrn", bits=2)
    opts = build_codec("fedmrn", alpha=1, sm="false").options
    assert (opts.alpha, opts.sm, opts.mask) == (1.0, False, "binary")
    with pytest.raises(Exception):  # frozen: a built codec's options cannot drift
        opts.alpha = 2.0


def test_only_fedpm_has_a_non_additive_server_step():
    from fedcodec.codecs import available_codecs

    steps = {name: build_uplink(name).algorithm.additive_step for name in available_codecs()}
    assert {n for n, additive in steps.items() if not additive} == {"fedpm"}
    assert build_uplink("signsgd", vote=True).algorithm.additive_step
