"""Fuzzing every registered codec's decoder (issue 7, item 2).

For each codec in the registry, built with its defaults, the decoder is fed random bytes,
truncations, extensions, bit flips and overwrites of valid payloads, valid envelopes (correct CRC)
around mutated bodies, and envelopes declaring absurd sizes. The property is always the same:
``decode`` returns exactly the spec's tensors (right shapes, float32, all finite) or raises
:class:`PayloadError` naming the client, never anything else, never slowly, and without allocating
memory that the payload merely declares. A codec registered later is fuzzed without touching this
file. ``benchmarks/fuzz.py`` runs the longer campaign.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import struct
import threading
import tracemalloc
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcodec.codecs import Codec, CodecContext, ModelSpec, Uplink, available_codecs, build_uplink, wire
from fedcodec.errors import PayloadError
from fedcodec.fl.server import aggregate, server_round
from fedcodec.fl.robust import Defense, invalid_statistics
from helpers import ctx, random_update, tiny_spec

# every codec with its defaults, and every symbol-writing codec with its entropy stage ("name+ec")
CODECS = sorted(available_codecs()) + sorted(f"{n}+ec" for n, info in available_codecs().items()
                                             if info.codec.symbolic)
N_VALID = 3  # valid payloads per codec and spec that the mutations start from
SEED = 0x5EED  # the codec seed of every valid payload (FedMRN sends it; decoders are told it)


def fuzz_settings(max_examples: int, deadline_s: float = 2.0) -> settings:
    # derandomize: the same examples on every run, so CI is deterministic. The deadline flags a slow
    # decode (hypothesis fails an example that runs past it); the alarm in no_hang() stops a real hang.
    return settings(max_examples=max_examples, derandomize=True, database=None,
                    deadline=timedelta(seconds=deadline_s),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------------
# the codecs under test and their valid payloads


@functools.cache
def cnn4_spec() -> ModelSpec:
    from fedcodec.models import build_model

    return ModelSpec.from_model(build_model("cnn4", (1, 28, 28), 10, seed=0))


@dataclass(frozen=True)
class Case:
    name: str
    uplink: Uplink
    codec: Codec
    spec: ModelSpec
    valid: tuple[bytes, ...]
    #: a codec that fits itself on the client (AE): the client's store, and the server's store for it
    client_store: dict | None = None
    server_store: dict | None = None

    def encode_ctx(self, seed: int, rng_seed: int = 11) -> CodecContext:
        return dataclasses.replace(ctx(self.spec, seed=seed, rng_seed=rng_seed), state=self.client_store)

    @property
    def bodies(self) -> tuple[bytes, ...]:
        return tuple(bytes(wire.unpack(p, self.codec.codec_id, self.spec.fingerprint)) for p in self.valid)

    def wrap(self, body: bytes | bytearray) -> bytes:
        """``body`` in a correct envelope (right codec id, fingerprint, length and CRC)."""
        return wire.pack(self.codec.codec_id, self.spec.fingerprint, bytes(body))


@functools.cache
def case(name: str, model: str = "tiny") -> Case:
    base, _, stage = name.partition("+")
    uplink = build_uplink(base, entropy=stage == "ec")
    codec, setup = uplink.codec, uplink.setup
    spec = tiny_spec() if model == "tiny" else cnn4_spec()
    client_store = server_store = None
    first = dataclasses.replace(ctx(spec, seed=1), state={})
    if setup is not None and setup.prepass(first) is not None:  # fit it on a few update-like snapshots; the server keeps its setup
        client_store, server_store = first.state, {}
        message = setup.fit([random_update(spec, seed=50 + j, scale=0.01) for j in range(4)], first)
        setup.accept_setup(message, CodecContext(spec, client=0, round=1, state=server_store))
    c = Case(name, uplink, codec, spec, (), client_store, server_store)
    # one codec seed for all (FedMRN binds its payload to the client-round's seed; the decoder is given it)
    valid = tuple(codec.encode(random_update(spec, seed=i, scale=0.01 * 10 ** i), c.encode_ctx(SEED, i))
                  for i in range(N_VALID))
    return dataclasses.replace(c, valid=valid)


@pytest.fixture(autouse=True, scope="module")
def _build_cases():
    """Build every tiny-spec case before any test runs, so hypothesis' per-example deadline never
    times a case's construction (fitting the AE codec imports torch's optimizer machinery: seconds)."""
    for name in CODECS:
        case(name)


def layout(payload: bytes) -> tuple[int, int]:
    """(offset of the body_len field, offset of the body) in an envelope; see wire.py."""
    at = 4 + 1 + 1 + payload[5] + 8
    return at, at + 4


def recrc(buf: bytearray) -> bytes:
    buf[-4:] = struct.pack("<I", zlib.crc32(bytes(buf[:-4])))
    return bytes(buf)


# ---------------------------------------------------------------------------------------------------------
# the property


class Hang(Exception):
    pass


@contextmanager
def no_hang(seconds: float):
    """Interrupt the block with :class:`Hang` after ``seconds`` (SIGALRM; main thread only)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum, frame):
        raise Hang(f"decode ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@functools.cache
def zero_model(spec: ModelSpec) -> dict[str, torch.Tensor]:
    return {t.name: torch.zeros(t.shape) for t in spec.tensors}


def check_decode(c: Case, payload: bytes, client: int = 5, hang_s: float = 20.0,
                 reference: dict[str, torch.Tensor] | None = None, seed: int = None) -> dict | None:
    """Decode ``payload``: return the update if it is well formed, None if it was rejected properly.

    ``reference`` (the model the update is relative to; FedPM needs one) defaults to the zero model,
    as in ``helpers.ctx``. Any other exception propagates and fails the test.
    """
    ref = zero_model(c.spec) if reference is None else reference
    with no_hang(hang_s):
        try:
            out = c.codec.decode(payload, CodecContext(c.spec, client=client, round=1, reference=ref,
                                                       seed=SEED if seed is None else seed, state=c.server_store))
        except PayloadError as err:
            assert err.client == client, err
            assert f"client {client}" in str(err)
            assert isinstance(err.reason, str) and err.reason
            return None
    assert isinstance(out, dict)
    assert sorted(out) == sorted(c.spec.names)
    for t in c.spec.tensors:
        v = out[t.name]
        assert isinstance(v, torch.Tensor), t.name
        assert v.dtype == torch.float32, (t.name, v.dtype)
        assert tuple(v.shape) == t.shape, (t.name, v.shape, t.shape)
        assert bool(torch.isfinite(v).all()), f"{t.name} holds NaN/Inf"
    return out


def peak_alloc(fn) -> int:
    """Peak bytes allocated (Python objects and NumPy arrays, as tracemalloc sees them) while ``fn`` runs."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()


# ---------------------------------------------------------------------------------------------------------
# strategies

F32 = [float("nan"), float("inf"), float("-inf"), 3.4028235e38, -3.4028235e38, 1e-45, -0.0, 1e30]
SPECIAL_WORDS = ([np.float32(x).tobytes() for x in F32]
                 + [b"\x01\x00\x80\x7f", b"\xff\xff\xff\xff", b"\xff" * 8, b"\x00" * 8,
                    struct.pack("<Q", 2**63), struct.pack("<I", 2**31), b"\x07", b"\xff"])
positions = st.integers(0, 2**20)  # taken modulo the buffer length when applied; shrinks towards the start
chunk = st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from(SPECIAL_WORDS))
edit = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("set"), positions, chunk),                # overwrite bytes at a position
    st.tuples(st.just("set_end"), st.integers(0, 64), chunk),   # ... counted from the end, 4-aligned there
    st.tuples(st.just("insert"), positions, chunk),
    st.tuples(st.just("delete"), positions, st.integers(1, 64)),
    st.tuples(st.just("truncate"), positions, st.just(b"")),
    st.tuples(st.just("extend"), st.just(0), st.binary(min_size=1, max_size=64)),
)
same_length_edit = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("set"), positions, chunk),
    st.tuples(st.just("set_end"), st.integers(0, 64), chunk),
)


def apply(buf: bytes, edits) -> bytearray:
    b = bytearray(buf)
    for kind, pos, arg in edits:
        n = len(b)
        if kind == "flip":
            if n:
                b[pos % n] ^= 1 << arg
        elif kind == "set":
            if n:
                p = pos % n
                b[p:p + len(arg)] = arg[:n - p]
        elif kind == "set_end":
            p = n - 4 * (pos + 1)
            if p >= 0:
                b[p:p + len(arg)] = arg[:n - p]
        elif kind == "insert":
            p = pos % (n + 1)
            b[p:p] = arg
        elif kind == "delete":
            if n:
                p = pos % n
                del b[p:p + arg]
        elif kind == "truncate":
            del b[pos % (n + 1):]
        else:  # extend
            b += arg
    return b


@st.composite
def mutated_bodies(draw, c: Case) -> bytes:
    """A body for a correct envelope: a valid body edited, spliced with another, or random bytes."""
    bodies = c.bodies
    i = draw(st.integers(0, len(bodies) - 1))
    how = draw(st.sampled_from(["edit", "edit", "edit", "splice", "random_same_length", "random"]))
    if how == "edit":
        return bytes(apply(bodies[i], draw(st.lists(edit, min_size=1, max_size=6))))
    if how == "splice":
        j = draw(st.integers(0, len(bodies) - 1))
        cut = draw(positions) % (len(bodies[i]) + 1)
        return bodies[i][:cut] + bodies[j][cut:]
    if how == "random_same_length":  # random bytes (the first 4 KiB at most, zeros after) of a valid length
        n = len(bodies[i])
        return draw(st.binary(min_size=min(n, 4096), max_size=min(n, 4096))).ljust(n, b"\0")
    return draw(st.binary(max_size=512))


@st.composite
def absurd_envelopes(draw, c: Case) -> bytes:
    """Envelopes whose body_len or codec-id length lies, with and without a CRC that matches."""
    buf = bytearray(c.valid[draw(st.integers(0, len(c.valid) - 1))])
    at, _ = layout(buf)
    field = draw(st.sampled_from(["body_len", "body_len", "id_len"]))
    if field == "body_len":
        n = len(buf) - at - 8
        value = draw(st.one_of(st.sampled_from([2**32 - 1, 2**31, 2**31 - 1, 0, 1, max(n - 1, 0), n + 1, 4 * n, 2**24]),
                               st.integers(0, 2**32 - 1)))
        struct.pack_into("<I", buf, at, value)
    else:
        buf[5] = draw(st.sampled_from([0, 1, 255, (buf[5] + 1) % 256, (buf[5] - 1) % 256]))
    return recrc(buf) if draw(st.booleans()) else bytes(buf)


@st.composite
def fuzzed_payloads(draw, c: Case) -> bytes:
    """Any of the strategies above, for the mixed tests."""
    kind = draw(st.sampled_from(["random", "truncate", "extend", "edit", "body", "body", "absurd"]))
    valid = c.valid[draw(st.integers(0, len(c.valid) - 1))]
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "truncate":
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if kind == "extend":
        return valid + draw(st.binary(min_size=1, max_size=32))
    if kind == "edit":
        return bytes(apply(valid, draw(st.lists(edit, min_size=1, max_size=4))))
    if kind == "body":
        return c.wrap(draw(mutated_bodies(c)))
    return draw(absurd_envelopes(c))


clients = st.integers(0, 10**6)


# ---------------------------------------------------------------------------------------------------------
# (a) random bytes


@pytest.mark.parametrize("name", CODECS)
@fuzz_settings(150)
@given(data=st.data(), noise=st.binary(max_size=400), client=clients)
def test_random_bytes(name, data, noise, client):
    c = case(name)
    valid = c.valid[0]
    # random bytes behind ever longer correct prefixes, so the randomness reaches every check
    prefix_len = data.draw(st.sampled_from([0, 4, 5, 6, 6 + valid[5], layout(valid)[0], layout(valid)[1]]))
    check_decode(c, valid[:prefix_len] + noise, client)


@pytest.mark.parametrize("name", CODECS)
def test_non_bytes_payloads_are_rejected(name):
    c = case(name)
    for bad in (None, "FCDC", 123, [1, 2, 3]):
        with pytest.raises(PayloadError) as info:
            c.codec.decode(bad, CodecContext(c.spec, client=8, round=1))
        assert info.value.client == 8 and info.value.reason == "type"
    for ok in (bytearray(c.valid[0]), memoryview(c.valid[0])):  # other byte buffers decode like bytes
        assert check_decode(c, ok) is not None


# ---------------------------------------------------------------------------------------------------------
# (b) truncations, (c) extensions


@pytest.mark.parametrize("name", CODECS)
def test_every_truncation_is_rejected(name):
    c = case(name)
    for valid, body in zip(c.valid, c.bodies):
        assert check_decode(c, valid) is not None
        for n in range(len(valid)):
            assert check_decode(c, valid[:n], client=n) is None, f"truncation to {n} bytes accepted"
        for n in range(len(body)):  # the body truncated inside a correct envelope: valid or rejected
            check_decode(c, c.wrap(body[:n]), client=n)


@pytest.mark.parametrize("name", CODECS)
@fuzz_settings(100)
@given(i=st.integers(0, N_VALID - 1), tail=st.binary(min_size=1, max_size=256), client=clients)
def test_extensions(name, i, tail, client):
    c = case(name)
    assert check_decode(c, c.valid[i] + tail, client) is None  # the envelope's length no longer matches
    check_decode(c, c.wrap(c.bodies[i] + tail), client)         # a longer body in a correct envelope


# ---------------------------------------------------------------------------------------------------------
# (d) bit flips and overwrites of a valid payload (the CRC is left as it was)


@pytest.mark.parametrize("name", CODECS)
@fuzz_settings(150)
@given(i=st.integers(0, N_VALID - 1), edits=st.lists(same_length_edit, min_size=1, max_size=6), client=clients)
def test_bit_flips_and_overwrites(name, i, edits, client):
    c = case(name)
    valid = c.valid[i]
    bad = bytes(apply(valid, edits))
    out = check_decode(c, bad, client)
    flipped = sum(bin(x ^ y).count("1") for x, y in zip(valid, bad))
    if 0 < flipped <= 3:  # CRC-32 detects every error of up to 3 bits at these lengths
        assert out is None, f"{flipped} flipped bits were accepted"


# ---------------------------------------------------------------------------------------------------------
# (e) correct envelopes around mutated bodies: only the codec's own checks stand between these and the model


@pytest.mark.parametrize("name", CODECS)
@fuzz_settings(300)
@given(data=st.data(), client=clients)
def test_valid_envelope_mutated_body(name, data, client):
    c = case(name)
    payload = c.wrap(data.draw(mutated_bodies(c)))
    result = []
    peak = peak_alloc(lambda: result.append(check_decode(c, payload, client)))
    # a decoder may allocate what the model needs and what it was sent, never what a field claims
    model_bytes = 4 * c.spec.numel()
    assert peak < 1_000_000 + 4 * model_bytes + 2 * len(payload), peak


@pytest.mark.parametrize("name", CODECS)
def test_nonfinite_values_behind_a_valid_crc_are_rejected(name):
    """Every float32 word of every valid body, one at a time, replaced by NaN/Inf: never accepted as such."""
    c = case(name)
    body = c.bodies[0]
    for special in (float("nan"), float("inf"), float("-inf")):
        word = np.float32(special).tobytes()
        for at in range(len(body) - 3):
            bad = body[:at] + word + body[at + 4:]
            check_decode(c, c.wrap(bad), client=at)  # accepted only if the value was not taken as a float


# ---------------------------------------------------------------------------------------------------------
# (f) absurd declared sizes


@pytest.mark.parametrize("name", CODECS)
@fuzz_settings(150)
@given(data=st.data(), client=clients)
def test_absurd_declared_sizes(name, data, client):
    c = case(name)
    payload = data.draw(absurd_envelopes(c))
    peak = peak_alloc(lambda: check_decode(c, payload, client))
    assert peak < 1_000_000, peak


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("model", ["tiny", "cnn4"])
def test_huge_declared_or_real_body_allocates_little(name, model):
    c = case(name, model)
    payload = bytearray(c.valid[0])
    at, _ = layout(payload)
    struct.pack_into("<I", payload, at, 2**32 - 1)  # declares a 4 GiB body, CRC recomputed
    huge_claim = recrc(payload)
    assert peak_alloc(lambda: check_decode(c, huge_claim)) < 1_000_000
    # a real 16 MiB body: rejected, after at most a model-sized allocation (not one the size of the body)
    huge_body = c.wrap(bytes(16 << 20))
    model_bytes = 4 * c.spec.numel()
    peak = peak_alloc(lambda: check_decode(c, huge_body))
    assert peak < 1_000_000 + 2 * model_bytes < 16 << 20, peak


# ---------------------------------------------------------------------------------------------------------
# everything at once, on the real CNN4 spec


@pytest.mark.parametrize("name", CODECS)
@fuzz_settings(40, deadline_s=10.0)
@given(data=st.data(), client=clients)
def test_cnn4_mixed(name, data, client):
    c = case(name, "cnn4")
    check_decode(c, data.draw(fuzzed_payloads(c)), client)


# ---------------------------------------------------------------------------------------------------------
# the server: fuzzed payloads never reach the global model


@pytest.mark.parametrize("name", CODECS)
@fuzz_settings(60)
@given(data=st.data(), min_clients=st.integers(1, 3))
def test_server_round_never_poisons_the_global_model(name, data, min_clients):
    c = case(name)
    n = data.draw(st.integers(1, 6))
    payloads = {}
    for client in data.draw(st.lists(clients, min_size=n, max_size=n, unique=True)):
        if data.draw(st.booleans()):
            payload = c.codec.encode(random_update(c.spec, seed=client), c.encode_ctx(client))
        else:
            payload = data.draw(fuzzed_payloads(c))
        payloads[client] = (payload, data.draw(st.floats(1.0, 1000.0)))
    global_params = random_update(c.spec, seed=99, scale=0.1)
    global_params["bn.running_var"] = global_params["bn.running_var"].abs() + 1  # a valid model
    stores = {client: c.server_store for client in payloads} if c.server_store is not None else None
    defense = Defense(replay_window=0)  # fuzzed copies of a valid payload are not replays here
    new, outcome = server_round(c.uplink, c.spec, global_params, 1, payloads, min_clients=min_clients, stores=stores,
                                defense=defense, seed_of=lambda client: client)

    assert sorted(outcome.accepted + list(outcome.rejected)) == sorted(payloads)
    assert not set(outcome.accepted) & set(outcome.rejected)
    expected = []
    for client, (payload, weight) in sorted(payloads.items()):
        upd = check_decode(c, payload, client, reference=global_params, seed=client)
        if upd is not None and invalid_statistics(global_params, upd):  # a valid encoding of an invalid model
            upd = None
        if upd is None:
            assert client in outcome.rejected and f"client {client}" in outcome.rejected[client]
        else:
            assert client in outcome.accepted
            expected.append((client, weight, upd))
    for t in c.spec.tensors:
        assert new[t.name].dtype == torch.float32 and tuple(new[t.name].shape) == t.shape
        assert bool(torch.isfinite(new[t.name]).all()), t.name
    # rejected payloads leave no trace: the model is what the accepted ones alone make
    want = (aggregate(c.spec, global_params, expected, c.uplink.algorithm, defense=defense)
            if len(expected) >= min_clients else global_params)
    for t in c.spec.tensors:
        assert torch.equal(new[t.name], want[t.name]), t.name
