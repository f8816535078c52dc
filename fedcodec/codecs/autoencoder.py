"""Autoencoder-compressed updates (``ae``; after Chandar et al., FTL-IJCAI 2021).

Each client learns its own autoencoder (AE) of what its weight updates look like. The encoder stays
on the client; the decoder is sent to the server once, as bytes, and the server keeps one decoder per
client. Every later update travels as the AE's latent code.

**Lifecycle.**

1. *Pre-pass* (:meth:`AESetup.prepass`): the first time a client is selected, it trains locally from
   the model it received for ``prepass_epochs`` epochs (0: its usual local epochs) and records the
   update ``snapshots`` times at evenly spaced steps: its "weights dataset". A client selected for
   the first time in round 1 starts from the initial global model, as in the paper; a client first
   selected later (partial participation) runs its pre-pass then, from the current global model.
2. *Fit* (:meth:`AESetup.fit`): the client trains its AE on the snapshots (Adam, ``ae_steps`` steps,
   batches of 256 chunks, MSE) and returns its decoder as a *setup message* (codec id
   ``ae-decoder``), which the engine sends uplink in the same round and counts in the ledger.
3. *Rounds*: the client's update is encoded to latents; the server decodes them with that client's
   decoder. A payload from a client whose decoder the server does not hold, or that names another
   decoder (fingerprint mismatch), is rejected with a typed error.
4. *Refresh*: with ``refresh_every = R`` the client refits (a new pre-pass and decoder) when R rounds
   have passed since its last fit; with ``refresh_error = e`` it refits at its next selection after
   an update whose relative reconstruction error exceeded ``e``.

**Unit: fixed-length chunks.** An update of a 390k-weight CNN is far too long for an AE input, and
per-layer AEs would need one network per tensor shape (and a decoder per layer shipped). Instead the
coded tensors are each divided by their RMS (sent as float32, one per tensor), concatenated in spec
order, and cut into chunks of ``chunk`` values (the last one zero-padded); one AE maps every chunk
to ``latent`` numbers and back. Per-tensor normalisation makes chunks of tensors with very different
update magnitudes alike, and makes the small early updates of the pre-pass look like later ones.
``hidden = 0`` gives a linear AE (chunk → latent → chunk, a learned projection); ``hidden > 0`` puts
one tanh layer of that width on both sides. The coded tensors are the conv/linear kernels, plus
the biases and BatchNorm scales and shifts when ``dense = "ae"``; the BatchNorm running statistics
then travel beside the latents as float16 (1.9 KB for CNN4), a running variance as
``log((v + d) / v)`` against the reference model ``v`` so that it stays positive. With
``dense = "fp32"`` everything but the kernels travels as float32, as in every other codec (7.7 KB for
CNN4, which caps the ratio near 200x). Running statistics do not go through the AE: coded that way
(first version) their reconstruction error broke the global model's BatchNorm and it stayed at 10%
accuracy, while a chunk AE cannot compress 960 unrelated statistics anyway.

Each tensor's reconstruction is multiplied by a *gain*, the least-squares factor
``rms · <x, x̂> / <x̂, x̂>`` of the normalised tensor ``x`` and its reconstruction ``x̂``, sent in place
of the RMS: the codec never expands a tensor's error beyond the tensor, which error feedback needs.

**Latents.** ``bits = b > 0``: per latent dimension ``j`` a scale ``a_j = max |z_j|`` over the chunks
(float32) and symbols ``q = round((z / a_j + 1) / 2 · (2^b - 1))`` in one symbol section (so
``entropy=true`` range codes them); ``bits = 0`` sends float16 latents. Error feedback (``ef=true``)
keeps what the AE could not represent for the next round.

Wire formats::

    ae-decoder setup message body: chunk u32 | latent u32 | hidden u32 | dtype u8 (0 f32, 1 f16)
        | decoder weights, layer by layer (weight then bias), little-endian
    ae payload body: decoder fingerprint (8 bytes) | gain f32 per coded tensor
        | bits > 0: scale f32 per latent dimension, latent symbols (chunks × latent, alphabet 2^bits)
          bits = 0: chunks × latent float16
        | the other tensors: float16 running statistics (dense = "ae"; variances log-coded)
          or float32 biases and BatchNorm values (dense = "fp32")

The fingerprint is the first 8 bytes of BLAKE2b over the whole setup message. The decoder is rounded
to its shipping dtype on the client too, so both ends decode with the same weights and the same
float32 operations: the server's update equals the one the client computed (bit for bit at equal
thread counts).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, PayloadError
from . import wire
from .base import Codec, CodecContext, ModelSpec, Options, TensorSpec, Update, split_specs
from .registry import register
from .setup import Prepass, Setup
from .signsgd import read_scales
from .symbols import fixed_size
from .wire import BodyReader

KEY = "ae/"
SETUP_ID = "ae-decoder"
DTYPES = {"fp32": (0, "<f4"), "fp16": (1, "<f2")}
BATCH = 256
MAX_DIM = 1 << 20


def _positive(name: str, value, lo: int = 1) -> int:
    if not lo <= value <= MAX_DIM:
        raise ConfigError(f"ae option {name} must be an integer in {lo}..{MAX_DIM}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class AEOptions(Options):
    chunk: int = 1024
    latent: int = 16
    hidden: int = 0
    bits: int = 8
    dense: str = "ae"
    decoder_dtype: str = "fp16"
    prepass_epochs: int = 0
    snapshots: int = 10
    ae_steps: int = 500
    ae_lr: float = 3e-3
    refresh_every: int = 0
    refresh_error: float = 0.0

    def check(self) -> None:
        for name, lo in (("chunk", 2), ("latent", 1), ("hidden", 0), ("prepass_epochs", 0), ("snapshots", 1),
                         ("ae_steps", 1), ("refresh_every", 0)):
            _positive(name, getattr(self, name), lo)
        if self.latent >= self.chunk:
            raise ConfigError(f"ae latent ({self.latent}) must be smaller than chunk ({self.chunk}) to compress "
                              "anything")
        if not 0 <= self.bits <= 16:
            raise ConfigError(f"ae option bits must be 0 (float16 latents) or 1..16, got {self.bits!r}")
        if self.dense not in ("ae", "fp32"):
            raise ConfigError(f"ae option dense must be 'ae' (the AE codes biases and BatchNorm scales/shifts "
                              f"too; running statistics go as float16) or 'fp32' (all of those as float32), "
                              f"got {self.dense!r}")
        if self.decoder_dtype not in DTYPES:
            raise ConfigError(f"ae option decoder_dtype must be one of {sorted(DTYPES)}, got {self.decoder_dtype!r}")
        if not (math.isfinite(self.ae_lr) and self.ae_lr > 0):
            raise ConfigError(f"ae option ae_lr must be a positive number, got {self.ae_lr!r}")
        if not self.refresh_error >= 0:
            raise ConfigError(f"ae option refresh_error must be >= 0 (0: never), got {self.refresh_error!r}")


class AESetup(Setup):
    """The AE's pre-pass, fit (client) and decoder acceptance (server); see the module docstring."""

    codec: "AECodec"

    def prepass(self, ctx: CodecContext) -> Prepass | None:
        o, state = self.codec.options, ctx.state
        due = (state is None or KEY + "fingerprint" not in state  # never fitted
               or (o.refresh_every and ctx.round - int(state[KEY + "round"]) >= o.refresh_every)
               or (o.refresh_error and float(state.get(KEY + "error", torch.tensor(0.0))) > o.refresh_error))
        return Prepass(o.prepass_epochs or None, o.snapshots) if due else None

    @staticmethod
    def _install(store: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], message: bytes) -> None:
        """Replace the AE entries of ``store`` (a client's or the server's) with ``tensors`` and the
        fingerprint of the setup ``message`` they came with."""
        for k in [k for k in store if k.startswith(KEY)]:
            del store[k]
        store.update(tensors)
        store[KEY + "fingerprint"] = torch.from_numpy(np.frombuffer(fingerprint(message), np.uint8).copy())

    def _init_layers(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        params = {}
        for part in ("enc", "dec"):
            for i, (o, n) in enumerate(self.codec.layer_shapes(part)):
                bound = 1.0 / math.sqrt(n)  # PyTorch's default Linear init range
                params[f"{KEY}{part}/{i}.weight"] = (torch.rand(o, n, generator=gen) * 2 - 1) * bound
                params[f"{KEY}{part}/{i}.bias"] = (torch.rand(o, generator=gen) * 2 - 1) * bound
        return params

    def fit(self, snapshots: list[Update], ctx: CodecContext) -> bytes:
        codec, o = self.codec, self.codec.options
        if ctx.state is None or ctx.rng is None:
            raise ConfigError("the ae codec fits on the client and needs its store and generator "
                              "(CodecContext.state, .rng); run it through fedcodec's client function")
        if not snapshots:
            raise ConfigError("the ae pre-pass recorded no snapshots (no training steps: is the client's data empty?)")
        data = torch.cat([codec.normalise(s, ctx.spec)[0] for s in snapshots])
        params = {k: v.requires_grad_(True) for k, v in self._init_layers(ctx.rng).items()}
        opt = torch.optim.Adam(params.values(), lr=o.ae_lr)
        for _ in range(o.ae_steps):
            idx = torch.randint(len(data), (min(BATCH, len(data)),), generator=ctx.rng)
            x = data[idx]
            loss = F.mse_loss(codec.decode_chunks(params, codec.encode_chunks(params, x)), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        dtype = DTYPES[o.decoder_dtype][1]
        with torch.no_grad():
            for k in list(params):
                params[k] = params[k].detach()
                if k.startswith(KEY + "dec/"):  # what the server will hold: rounded to the shipping dtype
                    params[k] = torch.from_numpy(params[k].numpy().astype(dtype).astype(np.float32))
            recon = codec.decode_chunks(params, codec.encode_chunks(params, data))
            fit_error = float((recon - data).pow(2).sum().sqrt() / data.pow(2).sum().sqrt().clamp_min(1e-30))
        message = self.decoder_message(params, ctx.spec)
        self._install(ctx.state, params, message)
        ctx.state[KEY + "round"] = torch.tensor(ctx.round, dtype=torch.int64)
        ctx.state[KEY + "error"] = torch.tensor(0.0)
        if ctx.metrics is not None:
            ctx.metrics["ae_fit_error"] = fit_error
            ctx.metrics["ae_decoder_bytes"] = len(message)
        return message

    def decoder_message(self, params: Mapping[str, torch.Tensor], spec: ModelSpec) -> bytes:
        o = self.codec.options
        code, dtype = DTYPES[o.decoder_dtype]
        w = wire.BodyWriter().u32(o.chunk).u32(o.latent).u32(o.hidden).u8(code)
        for i in range(len(self.codec.layer_shapes("dec"))):
            for kind in ("weight", "bias"):
                w.raw(params[f"{KEY}dec/{i}.{kind}"].numpy().astype(dtype))
        return wire.pack(SETUP_ID, spec.fingerprint, w.getvalue())

    def read_decoder(self, message: bytes, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """The decoder tensors of a setup message; raises PayloadError (sizes checked before reading)."""
        o = self.codec.options
        body = wire.unpack(message, SETUP_ID, spec.fingerprint)
        reader = BodyReader(body)
        dims = (reader.u32("chunk"), reader.u32("latent"), reader.u32("hidden"))
        if dims != (o.chunk, o.latent, o.hidden):
            raise PayloadError("decoder", f"decoder for chunk/latent/hidden {dims}; this run's ae codec uses "
                                          f"{(o.chunk, o.latent, o.hidden)}")
        code, dtype = DTYPES[o.decoder_dtype]
        got = reader.u8("decoder dtype")
        if got != code:
            raise PayloadError("decoder", f"decoder dtype code {got}; this run ships {o.decoder_dtype} ({code})")
        itemsize = np.dtype(dtype).itemsize
        if reader.remaining != self.codec.decoder_numel() * itemsize:
            raise PayloadError("size", f"decoder body holds {reader.remaining} bytes of weights, the configured "
                                       f"decoder needs {self.codec.decoder_numel() * itemsize}")
        out = {}
        for i, (rows, cols) in enumerate(self.codec.layer_shapes("dec")):
            for kind, shape in (("weight", (rows, cols)), ("bias", (rows,))):
                arr = reader.array(dtype, int(np.prod(shape)), f"decoder layer {i} {kind}").astype(np.float32)
                if not np.isfinite(arr).all():
                    raise PayloadError("nonfinite", f"decoder layer {i} {kind} holds NaN or Inf")
                if arr.size and float(np.abs(arr).max()) > MAX_DECODER_WEIGHT:
                    raise PayloadError("decoder", f"decoder layer {i} {kind} holds a weight of magnitude "
                                                  f"{float(np.abs(arr).max()):.4g} > {MAX_DECODER_WEIGHT:g}; a "
                                                  "decoder fitted to normalised chunks has weights of order 1")
                out[f"{KEY}dec/{i}.{kind}"] = torch.from_numpy(arr.reshape(shape))
        reader.finish()
        return out

    def accept_setup(self, message: bytes, ctx: CodecContext) -> None:
        try:
            if ctx.state is None:
                raise ConfigError("the server needs a per-client store to keep decoders (CodecContext.state)")
            decoder = self.read_decoder(message, ctx.spec)
        except PayloadError as err:
            raise err.for_client(ctx.client) from None
        self._install(ctx.state, decoder, message)


@register("ae", "per-client autoencoder over fixed-length chunks; decoder shipped once (Chandar et al. 2021)",
          setup=AESetup)
class AECodec(Codec):
    codec_id = "ae"
    options_type = AEOptions
    symbolic = True
    options: AEOptions

    def __init__(self, options: AEOptions | None = None, entropy: bool = False):
        self.symbolic = (options or AEOptions()).bits > 0  # bits = 0 sends float16 latents: no symbols
        super().__init__(options, entropy)
        o = self.options
        self.chunk, self.latent, self.hidden, self.bits, self.dense = o.chunk, o.latent, o.hidden, o.bits, o.dense

    # -- geometry ----------------------------------------------------------------------------------
    def coded_specs(self, spec: ModelSpec) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """(coded by the AE, sent beside the latents: float16 with dense = "ae", float32 otherwise)."""
        if self.dense == "ae":
            return spec.select(("weight", "param")), spec.select(("buffer",))
        return split_specs(spec)

    @property
    def plain_dtype(self) -> str:
        return "<f2" if self.dense == "ae" else "<f4"

    def num_chunks(self, spec: ModelSpec) -> int:
        n = sum(t.numel for t in self.coded_specs(spec)[0])
        return -(-n // self.chunk)

    def layer_shapes(self, part: str) -> list[tuple[int, int]]:
        """(out, in) of each linear layer of the encoder or decoder."""
        dims = [self.chunk] + ([self.hidden] if self.hidden else []) + [self.latent]
        if part == "dec":
            dims = dims[::-1]
        return [(dims[i + 1], dims[i]) for i in range(len(dims) - 1)]

    def decoder_numel(self) -> int:
        return sum(o * i + o for o, i in self.layer_shapes("dec"))

    # -- the network (plain functions of named tensors, so the stores hold it as tensors) --------------
    @staticmethod
    def _mlp(params: Mapping[str, torch.Tensor], prefix: str, layers: int, x: torch.Tensor) -> torch.Tensor:
        for i in range(layers):
            x = F.linear(x, params[f"{prefix}{i}.weight"], params[f"{prefix}{i}.bias"])
            if i < layers - 1:
                x = torch.tanh(x)
        return x

    def encode_chunks(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self._mlp(params, KEY + "enc/", len(self.layer_shapes("enc")), x)

    def decode_chunks(self, params: Mapping[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        return self._mlp(params, KEY + "dec/", len(self.layer_shapes("dec")), z)

    def variance_names(self, spec: ModelSpec) -> list[str]:
        """BatchNorm running variances sent as float16 (dense = "ae"), in the log domain (see to_log)."""
        if self.dense != "ae":
            return []
        return [t.name for t in self.coded_specs(spec)[1] if t.name.endswith("running_var")]

    def to_log(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> Mapping[str, torch.Tensor]:
        """A running variance ``v`` (the reference's) and its change ``d`` travel as
        ``log((v + d) / v)`` in float16, so that the decoded variance ``v·exp(·)`` is positive
        whatever the rounding (``d`` itself rounded can make a small variance negative)."""
        names = self.variance_names(ctx.spec)
        if not names:
            return update
        ref = self._reference(ctx)
        out = dict(update)
        for n in names:
            v = ref[n].clamp_min(1e-30)
            out[n] = torch.log((v + update[n]).clamp_min(1e-30) / v)
        return out

    def from_log(self, update: Update, ctx: CodecContext) -> Update:
        names = self.variance_names(ctx.spec)
        if names:
            ref = self._reference(ctx)
            for n in names:
                update[n] = ref[n].clamp_min(1e-30) * torch.expm1(update[n])
        return update

    @staticmethod
    def _reference(ctx: CodecContext) -> Update:
        if ctx.reference is None:
            raise ConfigError("the ae codec codes BatchNorm running variances relative to the model the client "
                              "trained from (CodecContext.reference); pass it, or use dense=fp32")
        return ctx.reference

    def normalise(self, update: Mapping[str, torch.Tensor], spec: ModelSpec) -> tuple[torch.Tensor, np.ndarray]:
        """(chunks × chunk float32 matrix, RMS per coded tensor)."""
        coded = self.coded_specs(spec)[0]
        flat = spec.flatten(update, coded)
        rms = np.zeros(len(coded), np.float32)
        out = np.zeros(self.num_chunks(spec) * self.chunk, np.float32)
        pos = 0
        for i, t in enumerate(coded):
            seg = flat[pos:pos + t.numel]
            r = np.sqrt(np.mean(np.square(seg, dtype=np.float64))) if t.numel else 0.0
            rms[i] = r
            if rms[i] > 0 and np.isfinite(rms[i]):
                np.divide(seg, rms[i], out=out[pos:pos + t.numel])
            pos += t.numel
        return torch.from_numpy(out.reshape(-1, self.chunk)), rms

    def denormalise(self, chunks: torch.Tensor, rms: np.ndarray, spec: ModelSpec) -> Update:
        coded = self.coded_specs(spec)[0]
        flat = chunks.reshape(-1).numpy()
        values = np.empty(sum(t.numel for t in coded), np.float32)
        pos = 0
        for i, t in enumerate(coded):
            np.multiply(flat[pos:pos + t.numel], rms[i], out=values[pos:pos + t.numel])
            pos += t.numel
        return spec.unflatten(values, coded)

    def quantize(self, z: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(scale per latent dimension, symbols) of latents ``z`` (chunks × latent)."""
        top = (1 << self.bits) - 1
        scales = z.abs().amax(0).numpy().astype(np.float32)
        safe = np.where(scales > 0, scales, np.float32(1))
        t = (z.numpy() / safe + np.float32(1)) * np.float32(top / 2)
        q = np.clip(np.rint(t), 0, top).astype(np.int64)
        return scales, q.reshape(-1)

    def dequantize(self, scales: np.ndarray, q: np.ndarray) -> torch.Tensor:
        top = np.float32((1 << self.bits) - 1)
        grid = q.reshape(-1, self.latent).astype(np.float32) * np.float32(2) / top - np.float32(1)
        return torch.from_numpy((grid * scales).astype(np.float32))

    # -- rounds ------------------------------------------------------------------------------------
    def _decoder(self, ctx: CodecContext, client_side: bool) -> dict[str, torch.Tensor]:
        state = ctx.state
        if state is None or KEY + "fingerprint" not in state:
            if client_side:
                raise ConfigError("the ae codec has no fitted autoencoder in the client's store; the client "
                                  "function runs the pre-pass first (use fedcodec's client_fit)")
            raise PayloadError("no-decoder", "the server holds no decoder for this client. A client ships its "
                                             "decoder (an 'ae-decoder' setup message) in the round of its pre-pass; "
                                             "if that message was lost or rejected, the client must refit "
                                             "(set refresh_every) before its latents can be decoded")
        return state

    def gains(self, chunks: torch.Tensor, recon: torch.Tensor, rms: np.ndarray, spec: ModelSpec) -> np.ndarray:
        """Per coded tensor, the factor that turns the AE's reconstruction of the normalised tensor
        into the best (least-squares) estimate of the tensor: ``rms · <x, x̂> / <x̂, x̂>``. Sending it
        instead of the RMS costs nothing and makes the codec non-expanding (the error of a tensor is
        never larger than the tensor), which error feedback needs: an expanding AE made the residual
        grow without bound."""
        coded = self.coded_specs(spec)[0]
        x, xh = chunks.reshape(-1).numpy(), recon.reshape(-1).numpy()
        out = np.zeros(len(coded), np.float32)
        pos = 0
        for i, t in enumerate(coded):
            a, b = x[pos:pos + t.numel].astype(np.float64), xh[pos:pos + t.numel].astype(np.float64)
            bb = float(b @ b)
            out[i] = rms[i] * (float(a @ b) / bb) if bb > 0 else 0.0
            pos += t.numel
        return out

    def encode_body(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        params = self._decoder(ctx, client_side=True)
        chunks, rms = self.normalise(update, ctx.spec)
        with torch.no_grad():
            z = self.encode_chunks(params, chunks)
        w = self.writer()
        if self.bits:
            scales, q = self.quantize(z)
            z_hat = self.dequantize(scales, q)
        else:
            half = z.numpy().astype("<f2")
            z_hat = torch.from_numpy(half.astype(np.float32))
        with torch.no_grad():
            recon = self.decode_chunks(params, z_hat)
        gains = self.gains(chunks, recon, rms, ctx.spec)
        w.raw(params[KEY + "fingerprint"].numpy().tobytes()).raw(gains.astype("<f4"))
        if self.bits:
            w.raw(scales.astype("<f4")).symbols(q, 1 << self.bits)
        else:
            w.raw(half)
        dense = self.coded_specs(ctx.spec)[1]
        plain = ctx.spec.flatten(self.to_log(update, ctx), dense).astype(self.plain_dtype)
        w.raw(plain)
        # the relative error of what the server will reconstruct, over the AE-coded tensors (the
        # running statistics would swamp it): drives refresh_error and is reported
        seen = self.denormalise(recon, gains, ctx.spec)  # the AE-coded tensors, as the server will see them
        num = sum(float((seen[n].double() - update[n].double()).pow(2).sum()) for n in seen)
        den = sum(float(update[n].double().pow(2).sum()) for n in seen)
        error = math.sqrt(num / den) if den > 0 else 0.0
        if ctx.state is not None:
            ctx.state[KEY + "error"] = torch.tensor(error)
        if ctx.metrics is not None:
            ctx.metrics["ae_error"] = error
        return w.getvalue()

    def decode_body(self, reader: BodyReader, ctx: CodecContext) -> Update:
        params = self._decoder(ctx, client_side=False)
        coded, dense = self.coded_specs(ctx.spec)
        fp = bytes(reader.take(8, "decoder fingerprint"))
        if fp != params[KEY + "fingerprint"].numpy().tobytes():
            raise PayloadError("decoder-mismatch", f"latents made for decoder {fp.hex()}, the server holds "
                                                   f"{params[KEY + 'fingerprint'].numpy().tobytes().hex()} "
                                                   "for this client")
        gains = reader.array("<f4", len(coded), "tensor gains")
        if not np.isfinite(gains).all():
            raise PayloadError("field", "a tensor gain is NaN or Inf")
        count = self.num_chunks(ctx.spec) * self.latent
        n_dense = sum(t.numel for t in dense)
        if self.bits:
            scales = read_scales(reader, self.latent, "latent scales")
            if not self.entropy:
                expected = fixed_size(count, 1 << self.bits) + np.dtype(self.plain_dtype).itemsize * n_dense
                if reader.remaining != expected:
                    raise PayloadError("size", f"body carries {reader.remaining} bytes after the scales; the "
                                               f"model needs {expected}")
            z_hat = self.dequantize(scales, reader.symbols(count, 1 << self.bits, "latents"))
        else:
            half = reader.array("<f2", count, "latents").astype(np.float32)
            if not np.isfinite(half).all():
                raise PayloadError("nonfinite", "latents hold NaN or Inf")
            z_hat = torch.from_numpy(half.reshape(-1, self.latent))
        with torch.no_grad():
            out = self.denormalise(self.decode_chunks(params, z_hat), gains, ctx.spec)
        plain = reader.array(self.plain_dtype, n_dense, "dense values").astype(np.float32)
        out.update(self.from_log(ctx.spec.unflatten(plain, dense), ctx))
        return out


#: the largest decoder weight a server accepts (an honest decoder maps unit-RMS chunks: weights of order 1)
MAX_DECODER_WEIGHT = 1e4


def fingerprint(message: bytes) -> bytes:
    return hashlib.blake2b(message, digest_size=8).digest()
