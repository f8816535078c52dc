"""Typed experiment configuration: one description of every key, presets, TOML files and overrides.

Every :class:`Config` field is described once, by its type annotation and :func:`setting` (default,
help text, allowed values or range, command-line flag); :func:`describe` turns a dataclass into that
description (:data:`CONFIG_KEYS` for Config). Everything else is derived from it: the
``fedcodec run``/``compare`` flags and their ``--help``, the key table at the end of ``--help``, the
checks of ``--config`` TOML files, ``--set key=value`` and Flower's run config (hyphenated keys, see
:mod:`fedcodec.flower.common`), all through one function, :func:`coerce`. A field added with a plain
default (``server_lr: float = 1.0``) is accepted by every source without more code.

Precedence (later wins): dataclass defaults < preset < TOML file < command-line flags and ``--set``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from .errors import ConfigError

#: a ``--config`` file larger than this is refused before it is parsed
MAX_CONFIG_BYTES = 1 << 20
#: Python's TOML parser takes time quadratic in a dotted key's parts (``a.a.a...``: 20,000 parts take
#: about 1.5 s, 50,000 about 100 s); a file's dotted keys may have at most this many parts squared
MAX_DOTTED_COST = 500_000_000
# a chain of dotted key parts; anchored and possessive, so the scan is linear (no backtracking)
_DOTTED = re.compile(r"""(?<![A-Za-z0-9_-])(?:(?:[A-Za-z0-9_-]++|"[^"\n]*+"|'[^'\n]*+')[ \t]*+\.[ \t]*+)++""")
#: integer values are 64-bit: |value| < 2**63
MAX_INT = 2**63 - 1
#: characters of a string value (paths, names, plugin lists)
MAX_STR = 4096
#: strings that leave an optional key unset (``lr = "none"``, Flower's ``lr = ""``)
UNSET_WORDS = ("", "none", "null")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          dict: 'codec options (a table, or "NAME=VALUE NAME=VALUE" text)'}


def setting(default: Any, help: str = "", *, choices: tuple[str, ...] = (), at_least: float | None = None,
            above: float | None = None, below: float | None = None, flag: str | None = None) -> Any:
    """A described dataclass field: ``default``, ``help`` text (``--help`` and the docs), the allowed
    ``choices`` or range (``at_least`` <= value, ``above`` < value, value < ``below``) and, for the
    few keys that have one, the command-line ``flag`` (``"--per-round"``)."""
    meta = {"key": {"help": help, "choices": tuple(choices), "at_least": at_least, "above": above,
                    "below": below, "flag": flag}}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def _show(value: Any) -> str:
    """``value`` for an error message: short, and never a walk through a nested structure."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, int) and value.bit_length() > 256:  # repr() of a huge int is slow or refused
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (str, int, float)):
        text = repr(value)
        return text if len(text) <= 80 else text[:60] + "...' (" + f"{len(value)} characters)"
    return f"a {type(value).__name__}"


def _did_you_mean(word: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1) if len(word) <= 100 else []
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class Key:
    """One config key: its field ``name``, type (``kind``: bool, int, float, str or dict of codec
    options), whether None (unset) is allowed, its default, help text, allowed values and flag."""

    name: str
    kind: type
    optional: bool = False
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] = ()
    at_least: float | None = None
    above: float | None = None
    below: float | None = None
    flag: str | None = None

    def expected(self) -> str:
        """What the key takes, e.g. ``an integer >= 1`` or ``one of iid, dirichlet, k-classes``."""
        if self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            bounds = [f"{op} {_num(v)}" for op, v in ((">=", self.at_least), (">", self.above), ("<", self.below))
                      if v is not None]
            text = " ".join([_KINDS[self.kind], " and ".join(bounds)]).strip()
        return text + (" or none" if self.optional else "")

    def parse(self, value: Any, *, text: bool = True, name: str | None = None) -> Any:
        """``value`` as this key's type. Strings are parsed when ``text`` (command line, ``--set``,
        Flower); otherwise (TOML) only str keys and codec options (``"NAME=VALUE ..."``) take one.
        An optional key takes None or one of :data:`UNSET_WORDS` as unset. Raises
        :class:`ConfigError` naming ``name`` (the key as the user spelled it)."""
        name = name or self.name
        if self.optional and (value is None or isinstance(value, str) and value.strip().lower() in UNSET_WORDS):
            return None
        if isinstance(value, str) and self.kind is not str:
            if not (text or self.kind is dict):
                raise self._error(value, name, " (a string; in TOML write numbers and booleans without quotes)")
            value = self._from_text(value, name)
        return self.check(value, name)

    def _from_text(self, text: str, name: str) -> Any:
        word = text.strip()
        if self.kind is bool and word.lower() in _TRUE + _FALSE:
            return word.lower() in _TRUE
        if self.kind is dict:
            return parse_options(word, name)
        try:
            if self.kind is int:
                return int(word)
            if self.kind is float:
                return float(word)
        except ValueError:
            pass
        raise self._error(text, name)

    def check(self, value: Any, name: str | None = None) -> Any:
        """A native value (TOML, Flower, Python) checked against the key's type, choices and range;
        returned as the key's type (an int for a float key becomes a float)."""
        name = name or self.name
        kind, given = self.kind, value
        if value is None and self.optional:
            return None
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            value = int(value) if ok else value
            if ok and abs(value) > MAX_INT:
                raise self._error(given, name, " (outside the 64-bit integer range)")
        elif kind is float:
            ok = _finite(value)
            value = float(value) if ok else value
        elif kind is dict:
            ok = isinstance(value, dict)
            if ok:
                value = {k: option_value(v, f"{name}.{k}") for k, v in value.items()}
        else:
            ok = isinstance(value, kind)
            if ok and kind is str and (len(value) > MAX_STR or "\0" in value):
                raise self._error(given, name, f" (at most {MAX_STR} characters, no NUL)")
        if not ok:
            raise self._error(given, name)
        if self.choices and value not in self.choices:
            raise self._error(given, name, _did_you_mean(value, self.choices) if isinstance(value, str) else "")
        if kind in (int, float) and not ((self.at_least is None or value >= self.at_least)
                                         and (self.above is None or value > self.above)
                                         and (self.below is None or value < self.below)):
            raise self._error(given, name)
        return value

    def _error(self, value: Any, name: str, hint: str = "") -> ConfigError:
        return ConfigError(f"{name} expects {self.expected()}, got {_show(value)}{hint}")

    def show_default(self) -> str:
        if self.kind is dict:
            return format_options(self.default) or '""'
        return _show(self.default) if self.default is not None else "none"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _kind(hint: Any, name: str) -> tuple[type, bool, tuple[Any, ...]]:
    """A field's type annotation → (kind, optional, choices)."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"config field {name}: a union of several types is not supported ({hint})")
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), optional, choices
    hint = typing.get_origin(hint) or hint
    if hint not in _KINDS:
        raise TypeError(f"config field {name}: type {hint} is not one of bool, int, float, str, dict")
    return hint, optional, ()


@functools.cache
def describe(cls: type) -> dict[str, Key]:
    """The key description of dataclass ``cls``, field by field (type from the annotation, the rest
    from :func:`setting`; a plain field gets no help, choices or flag)."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        kind, optional, choices = _kind(hints[f.name], f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        meta = dict(f.metadata.get("key", {}))
        meta["choices"] = meta.get("choices") or choices
        keys[f.name] = Key(f.name, kind, optional, default, **meta)
    return keys


def lookup(name: str, keys: Mapping[str, Key], what: str = "config key") -> Key:
    """The key called ``name`` in ``keys``; an unknown name raises :class:`ConfigError` with the
    closest known name, or the list of them."""
    if name in keys:
        return keys[name]
    hint = _did_you_mean(name, keys) or f"; known keys: {', '.join(sorted(keys))}"
    raise ConfigError(f"unknown {what} {_show(name)}{hint}")


def coerce(name: str, value: Any, *, text: bool = True, keys: Mapping[str, Key] | None = None,
           what: str = "config key") -> tuple[str, Any]:
    """The one parser of config values, for every source: ``name`` (as spelled in ``keys``, by
    default :data:`CONFIG_KEYS`) and ``value`` → (field name, value of the field's type).

    ``text=True`` (command line, ``--set``, Flower's run config): strings are parsed to the key's
    type, native values are checked; ``text=False`` (TOML files): every value is checked as it is,
    so ``rounds = "3"`` is an error. Every failure is a :class:`ConfigError` naming the key, the
    value and what was expected.
    """
    key = lookup(name, CONFIG_KEYS if keys is None else keys, what)
    return key.name, key.parse(value, text=text, name=name)


def _finite(value: Any) -> bool:
    """A real number (not a bool) that a float can hold, finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False


def option_value(value: Any, name: str) -> Any:
    """A codec option's value as given (its codec checks it), provided it is a scalar: a string of at
    most :data:`MAX_STR` characters, a 64-bit integer, a finite number or a boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) <= MAX_INT:
            return value
        raise ConfigError(f"{name} expects a 64-bit integer, got {_show(value)}")
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        raise ConfigError(f"{name} expects a finite number, got {_show(value)}")
    if isinstance(value, str):
        if len(value) <= MAX_STR and "\0" not in value:
            return value
        raise ConfigError(f"{name} expects a string of at most {MAX_STR} characters without NUL, got {_show(value)}")
    raise ConfigError(f"{name} expects a string, number or boolean, got {_show(value)}")


def parse_scalar(text: str) -> Any:
    """Parse a codec option value: TOML scalar syntax, or a bare word as a string."""
    if len(text) > MAX_STR:
        return text  # option_value refuses it, naming the option
    try:
        parsed = tomllib.loads(f"v = {text}")
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):  # ValueError: over-long integers
        return text
    return parsed["v"] if parsed.keys() == {"v"} else text


def parse_options(text: str, name: str) -> dict[str, Any]:
    """``"noise=gaussian pm=false"`` → ``{"noise": "gaussian", "pm": False}`` (codec options)."""
    options = {}
    for item in text.split():
        opt, sep, value = item.partition("=")
        if not (sep and opt):
            raise ConfigError(f"{name} expects space-separated NAME=VALUE codec options (e.g. "
                              f"\"noise=gaussian pm=false\"), got {_show(item)}")
        options[opt] = option_value(parse_scalar(value), f"{name}.{opt}")
    return options


def format_options(options: Mapping[str, Any]) -> str:
    """The inverse of :func:`parse_options` (for values without spaces)."""
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())


@dataclass(frozen=True)
class Method:
    """A named recipe: which uplink codec, its options, and the client learning rate it wants."""

    codec: str
    options: dict[str, Any]
    lr: float
    summary: str


METHODS: dict[str, Method] = {
    "fedavg": Method("fp32", {}, 0.03, "FedAvg, float32 updates"),
    "fp16": Method("fp16", {}, 0.03, "FedAvg with float16 updates"),
    "signsgd": Method("signsgd", {}, 0.03, "sign of the update, scaled by its mean magnitude per tensor"),
    "signsgd-vote": Method("signsgd", {"vote": True}, 0.03, "signSGD with majority vote at the server"),
    "ef-signsgd": Method("signsgd", {"ef": True}, 0.03, "scaled sign with client error feedback (EF-SignSGD)"),
    "qsgd-1": Method("qsgd", {"levels": 1}, 0.03, "stochastic binarization between +-max (QSGD/FedPAQ, s=1)"),
    "qsgd-4": Method("qsgd", {"levels": 4}, 0.03, "stochastic uniform quantization, 5 levels (s=4)"),
    "topk-ef": Method("topk", {"fraction": 0.01, "ef": True}, 0.03, "top-1% sparsification with error feedback"),
    # FedPM, the paper's recipe: Adam on the mask scores (0.4: probes of 0.1 / 0.2 / 0.4 at the bench's
    # 2 local epochs reached 66.8 / 72.8 / 74.3 after 5 rounds, RESULTS §5), the Beta posterior's mode
    "fedpm": Method("fedpm", {"optimizer": "adam", "score_lr": 0.4, "estimate": "mode"}, 0.1,
                    "FedPM: Bernoulli masks over frozen random weights, Adam on the scores, Beta posterior mode"),
    "fedpm-ec": Method("fedpm", {"optimizer": "adam", "score_lr": 0.4, "estimate": "mode", "entropy": True}, 0.1,
                       "FedPM + range coding of the mask bits against the global probabilities"),
    "fedpm-sgd": Method("fedpm", {"score_lr_scale": 10000.0}, 0.1,
                        "FedPM as fedcodec first ran it: SGD on the scores (lr x1e4), Beta posterior mean"),
    "fedbat": Method("fedbat", {}, 0.1, "FedBAT: learned-step stochastic binarization of the update"),
    "fedmrn-binary": Method("fedmrn", {"mask": "binary", "alpha": 0.01}, 0.1,
                            "FedMRN, binary masks over uniform noise (alpha 0.01)"),
    "fedmrn-signed": Method("fedmrn", {"mask": "signed", "alpha": 0.005}, 0.1,
                            "FedMRN, signed masks over uniform noise (alpha 0.005)"),
    "fedmrn-binary-ec": Method("fedmrn", {"mask": "binary", "alpha": 0.01, "entropy": True}, 0.1,
                               "FedMRN binary + range coding of the mask bits"),
    "fedmrn-signed-ec": Method("fedmrn", {"mask": "signed", "alpha": 0.005, "entropy": True}, 0.1,
                               "FedMRN signed + range coding of the mask bits"),
}
# the parametric families: resolve_method builds any knob value of these on demand (qsgd-8,
# topk-ef-0.003, factor-64-ec, ae-32-ef), with the lr and options of the registered entries below


def _qsgd(levels: int) -> Method:
    return Method("qsgd", {"levels": levels}, 0.03, f"stochastic uniform quantization, {levels + 1} levels "
                                                    f"(s={levels})")


def _topk(fraction: float, ef: bool) -> Method:
    return Method("topk", {"fraction": fraction, **({"ef": True} if ef else {})}, 0.03,
                  f"top-{100 * fraction:g}% sparsification" + (" with error feedback" if ef else ""))


# seeded factors (issue 17): per kernel ΔW = B·A, A from the client-round seed, B trained; 4-bit B
# (levels 15) and 4-bit BatchNorm deltas (running variances in log space), range coded. lr 0.05: at
# 0.1 round 1's loss spikes (RESULTS §6: probes and the bench's seed 0 both favour 0.05)
def _factor(rank: int, ec: bool) -> Method:
    options = {"rank": rank, "levels": 15, "dense_levels": 15, **({"entropy": True} if ec else {})}
    return Method("factor", options, 0.05, f"seeded factors, rank {rank}: B·A with A from the seed, 4-bit B and "
                                          "BatchNorm deltas, " + ("range coded" if ec else "bit-packed"))


# the autoencoder codec (chunks of 1024, linear AE, 6-bit latents; biases and BatchNorm scales/shifts
# coded too, running statistics as float16), with and without error feedback. No range coding: for
# ~1.5k latents its 256-entry count table costs more than it saves
def _ae(latent: int, ef: bool) -> Method:
    if ef:
        return Method("ae", {"latent": latent, "bits": 6, "ef": True}, 0.03, f"ae-{latent} with error feedback")
    return Method("ae", {"latent": latent, "bits": 6}, 0.03,
                  f"per-client autoencoder, 1024-value chunks -> {latent} latents (Chandar et al.)")


# AE v2 (issue 17): the factor codec with a learned decoder: half of every A's rows are the leading
# right singular vectors of the kernel's change since the initial model (the history of decoded
# updates), which client and server both derive, so it is shared and costs no byte; B trained directly
def _ae2(rank: int) -> Method:
    seeded = _factor(rank, True)
    return Method("factor", {**seeded.options, "learned": rank // 2}, seeded.lr,
                  f"AE v2: rank-{rank} factors whose decoder A is half learned from the run's history "
                  "(shared, free on the wire), B trained; 4-bit, range coded")


for _r in (8, 16, 32):
    METHODS[f"factor-{_r}-ec"] = _factor(_r, True)
for _r in (16, 32):
    METHODS[f"ae2-{_r}-ec"] = _ae2(_r)
METHODS["factor-32"] = _factor(32, False)
for _k in (4, 16, 64):
    METHODS[f"ae-{_k}"] = _ae(_k, False)
    METHODS[f"ae-{_k}-ef"] = _ae(_k, True)

#: a method name is at most this many characters: lowercase letters, digits, '.' and '-', starting
#: with a letter or digit (it names the method's folder under the run)
MAX_METHOD_NAME = 64
_METHOD_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")


def _count(what: str, lo: int, hi: int):
    """A parser of a family's integer knob: canonical decimal digits in ``lo..hi``."""
    def parse(text: str) -> int:
        if re.fullmatch(r"[1-9][0-9]{0,8}", text) and lo <= int(text) <= hi:
            return int(text)
        raise ValueError(f"{what} must be an integer in {lo}..{hi} written without leading zeros")
    return parse


def _fraction(text: str) -> float:
    """A top-k fraction: a decimal ``0.DIGITS`` in (0, 1) without trailing zeros (``0.003``)."""
    if re.fullmatch(r"0\.[0-9]*[1-9]", text):
        return float(text)
    raise ValueError("fraction must be a decimal in (0, 1) written as 0.DIGITS without trailing zeros (e.g. 0.003)")


def _families() -> list[tuple[re.Pattern, Any, Any]]:
    """(name pattern with the knob as group 1, knob parser, Method builder), tried in order."""
    from .codecs.autoencoder import AEOptions
    from .codecs.factor import MAX_RANK
    from .codecs.qsgd import MAX_LEVELS

    latents = _count("latent", 1, AEOptions.chunk - 1)  # the ae codec compresses only below its chunk
    ranks = _count("rank", 1, MAX_RANK)
    return [
        (re.compile(r"qsgd-(.*)"), _count("levels", 1, MAX_LEVELS), _qsgd),
        (re.compile(r"topk-ef-(.*)"), _fraction, lambda f: _topk(f, True)),
        (re.compile(r"topk-(.*)"), _fraction, lambda f: _topk(f, False)),
        (re.compile(r"factor-(.*)-ec"), ranks, lambda r: _factor(r, True)),
        (re.compile(r"factor-(.*)"), ranks, lambda r: _factor(r, False)),
        (re.compile(r"ae2-(.*)-ec"), _count("rank", 2, MAX_RANK), _ae2),
        (re.compile(r"ae-(.*)-ef"), latents, lambda k: _ae(k, True)),
        (re.compile(r"ae-(.*)"), latents, lambda k: _ae(k, False)),
    ]


#: the parametric method names of :func:`resolve_method`, for help texts and errors
METHOD_PATTERNS = ("qsgd-<levels> (1..255); topk-<fraction>, topk-ef-<fraction> (0 < fraction < 1, e.g. 0.003); "
                   "factor-<rank>, factor-<rank>-ec (1..65535); ae2-<rank>-ec (2..65535); ae-<latent>, ae-<latent>-ef "
                   "(1..1023)")


def resolve_method(name: str) -> Method:
    """The :class:`Method` called ``name``: an exact :data:`METHODS` entry (plugins' included), else
    one of the parametric families (:data:`METHOD_PATTERNS`) with the family's lr and options at the
    knob value the name gives: ``qsgd-8`` (levels 8), ``topk-0.05`` and ``topk-ef-0.003`` (fraction,
    with error feedback), ``factor-64`` and ``factor-64-ec`` (rank, range coded), ``ae-32`` and
    ``ae-32-ef`` (latent, error feedback). A name is user input and names a folder: it is at most
    :data:`MAX_METHOD_NAME` characters of ``[a-z0-9.-]``, and a knob is written canonically (``qsgd-8``,
    not ``qsgd-08``), so one method has one folder. Anything else is a :class:`ConfigError` that
    lists the methods and the patterns."""
    if not isinstance(name, str):
        raise ConfigError(f"method expects a method name, got {_show(name)}")
    if len(name) > MAX_METHOD_NAME:
        raise ConfigError(f"method name {_show(name)} is longer than {MAX_METHOD_NAME} characters")
    if not _METHOD_NAME.fullmatch(name):
        raise ConfigError(f"method name {_show(name)} may hold only lowercase letters, digits, '.' and '-', "
                          "starting with a letter or digit")
    if name in METHODS:
        return METHODS[name]
    for pattern, knob, build in _families():
        match = pattern.fullmatch(name)
        if match:
            try:
                return build(knob(match.group(1)))
            except ValueError as err:
                raise ConfigError(f"method {name!r}: {err}, got {match.group(1)!r}") from None
    raise ConfigError(f"unknown method {name!r}{_did_you_mean(name, METHODS)}. Methods: {', '.join(METHODS)}; "
                      f"or a pattern: {METHOD_PATTERNS}")


def import_plugins(names: str) -> None:
    """Import the modules named in ``names`` (space- or comma-separated), which register codecs
    (:func:`fedcodec.codecs.register`) and methods (:data:`METHODS`) as they load. A module is
    imported once per process, like any import."""
    import importlib

    if not isinstance(names, str):
        raise ConfigError(f"plugins expects module names as text, got {names!r}")
    for name in names.replace(",", " ").split():
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"plugin module {name!r} cannot be imported ({err}); put its folder on PYTHONPATH "
                              "(on Flower: on every SuperLink and SuperNode machine)") from None


@dataclass
class Config:
    """One experiment. Each field's :func:`setting` is its documentation: ``fedcodec run --help``
    lists them all, ``--set KEY=VALUE`` and ``--config FILE`` take any of them."""

    # run
    seed: int = setting(0, "seed of every random choice (data partition, sampling, model init, codecs)",
                        flag="--seed")
    rounds: int = setting(30, "federated rounds", at_least=1, flag="--rounds")
    num_clients: int = setting(100, "number of clients", at_least=1, flag="--clients")
    clients_per_round: int = setting(10, "clients sampled per round (at most num_clients)", at_least=1,
                                     flag="--per-round")
    min_clients: int = setting(1, "fewer decodable updates in a round: the global model is kept", at_least=1)
    dropout: float = setting(0.0, "simulated: fraction of the sampled clients that fail each round (never send)",
                             at_least=0, below=1)
    stragglers: float = setting(0.0, "simulated: fraction that send after the round's deadline (bytes spent, "
                                "update ignored); dropout + stragglers < 1", at_least=0, below=1)
    # data
    dataset: str = setting("fashion-mnist", "dataset", choices=("fashion-mnist", "cifar10", "synthetic"),
                           flag="--dataset")
    data_dir: str | None = setting(None, "directory holding the dataset files (none: the standard locations)",
                                   flag="--data-dir")
    allow_subset: bool = setting(False, "accept dataset files smaller than the official release (fixtures)")
    partition: str = setting("iid", "how the training data is split among clients",
                             choices=("iid", "dirichlet", "k-classes"), flag="--partition")
    beta: float = setting(0.3, "Dirichlet concentration (partition=dirichlet)", above=0, flag="--beta")
    classes_per_client: int = setting(3, "classes each client holds (partition=k-classes)")
    min_client_size: int = setting(10, "fewest training examples a client may hold")
    # model
    model: str = setting("cnn4", "model", choices=("cnn4", "cnn8"), flag="--model")
    init_std: float = setting(0.01, "standard deviation of the initial weights")
    # local training
    local_epochs: int = setting(2, "local epochs per round", at_least=1, flag="--local-epochs")
    batch_size: int = setting(64, "local minibatch size (>= 2: BatchNorm needs two samples)", at_least=2,
                              flag="--batch-size")
    lr: float | None = setting(None, "client learning rate (none: the method's own)", above=0, flag="--lr")
    momentum: float = setting(0.0, "local SGD momentum")
    weight_decay: float = setting(0.0, "local weight decay")
    optimizer: str = setting("sgd", "local optimizer", choices=("sgd", "adam"))
    keep_optimizer_state: bool = setting(False, "a client keeps its optimizer state between rounds (else afresh)")
    # method
    method: str = setting("fedavg", "a method of `fedcodec codecs` (or a pattern such as qsgd-8, "
                          "topk-ef-0.003, factor-64-ec, ae-32): uplink codec, its options, client lr")
    codec_options: dict[str, Any] = setting({}, "uplink codec options over the method's (--set codec.NAME=VALUE)")
    downlink: str = setting("fp32", "codec of the server -> client broadcast")
    downlink_options: dict[str, Any] = setting({}, "downlink codec options (--set downlink.NAME=VALUE)")
    downlink_delta: bool = setting(False, "send global - (the client's copy) instead of the model")
    max_update_norm: float | None = setting(None, "reject decoded updates with a larger L2 norm (none: no bound)",
                                            above=0)
    # robust aggregation (fedcodec.fl.robust): what keeps one hostile client from poisoning the model
    aggregator: str = setting("mean", "server aggregation rule: mean (the method's own), median (coordinate-wise), "
                              "trimmed-mean or krum", choices=("mean", "median", "trimmed-mean", "krum"))
    clip_factor: float = setting(2.0, "clip each client's update, per tensor group, to this many times the round's "
                                 "median norm (0: off; else >= 1)", at_least=0)
    trim_fraction: float = setting(0.1, "aggregator=trimmed-mean: fraction of the largest and of the smallest "
                                   "values dropped per coordinate, in [0, 0.5)", at_least=0, below=0.5)
    krum_byzantine: int = setting(1, "aggregator=krum: number of hostile clients assumed", at_least=0)
    replay_window: int = setting(8, "reject a payload identical to one of a client's last N accepted ones "
                                 "(0: off)", at_least=0)
    # server optimizer (fedcodec.fl.server_opt, which checks these keys): how the round's aggregate moves
    # the global model
    server_optimizer: str = setting("sgd", "server optimizer: sgd (FedAvg), momentum (FedAvgM), adam (FedAdam) or "
                                    "yogi (FedYogi)")
    server_lr: float | None = setting(None, "server learning rate > 0 (none: the optimizer's own; sgd, momentum "
                                      "1.0; adam 0.1; yogi 0.01)")
    server_momentum: float = setting(0.9, "beta of momentum, in [0, 1)")
    server_beta1: float = setting(0.9, "beta1 of adam and yogi, in [0, 1)")
    server_beta2: float = setting(0.99, "beta2 of adam and yogi, in [0, 1)")
    server_tau: float = setting(1e-3, "adaptivity tau > 0 of adam and yogi")
    server_initial_v: float | None = setting(None, "adam, yogi: v >= 0 before the first round (none: server_tau**2)")
    server_warmup: int = setting(0, "rounds over which the server learning rate ramps linearly up to server_lr "
                                 "(0: none)", at_least=0)
    plugins: str = setting("", "Python modules imported before the run is built, space- or comma-separated: "
                           "they register codecs and methods (example: examples/ternary_codec.py)")
    # evaluation and output
    eval_every: int = setting(1, "rounds between evaluations of the global model", at_least=1)
    out_dir: str = setting("runs", "output root directory", flag="--out")
    checkpoint_every: int = setting(1, "rounds between checkpoints", at_least=1)
    threads: int | None = setting(None, "torch CPU threads (none: torch's choice)", flag="--threads")
    device: str = setting("cpu", "where models train and evaluate: cpu, cuda (or cuda:N), mps, or auto (a GPU when "
                          "there is one); bit-exact reproducibility is a CPU promise (fedcodec.fl.device)",
                          flag="--device")
    batch_clients: int = setting(1, "in-process runs: train up to this many same-sized clients of a round at once "
                                 "(vmap over stacked models; for a GPU, slower on the CPU). The same batches and "
                                 "draws, but float rounding differs from one at a time (1, bit-exact); what it "
                                 "cannot batch trains one at a time (fedcodec.fl.batched)", at_least=1,
                                 flag="--batch-clients")

    def method_spec(self) -> Method:
        """The method named by ``method`` (:func:`resolve_method`: a registered one or a pattern)."""
        return resolve_method(self.method)

    @property
    def client_lr(self) -> float:
        return self.lr if self.lr is not None else self.method_spec().lr

    @property
    def uplink_options(self) -> dict[str, Any]:
        return {**self.method_spec().options, **self.codec_options}

    def validate(self) -> "Config":
        """Fail fast, before any data is loaded, with a message that says how to fix it: every field
        against its key (type, choices, range), then the rules that tie fields together."""
        import_plugins(self.plugins)
        self.method_spec()
        for key in CONFIG_KEYS.values():
            key.check(getattr(self, key.name))
        checks = [
            (self.clients_per_round <= self.num_clients,
             f"clients_per_round must be in 1..num_clients ({self.num_clients}), got {self.clients_per_round}"),
            (self.min_clients <= self.clients_per_round, "min_clients must be in 1..clients_per_round"),
            (self.dropout + self.stragglers < 1,
             "dropout and stragglers are fractions of the sampled clients: each in [0, 1), their sum < 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        from .fl.device import resolve_device

        resolve_device(self.device)  # a device this machine lacks fails here, before any data is loaded
        from .codecs import build_codec, build_uplink
        from .fl.robust import Defense
        from .fl.server_opt import ServerOptimizerConfig

        server = ServerOptimizerConfig.from_config(self)  # server_* keys fail here
        Defense.from_config(self)  # clip_factor in (0, 1) fails here
        uplink = build_uplink(self.method_spec().codec, **self.uplink_options)  # unknown codec options fail here
        if not uplink.algorithm.additive_step and (server.kind != "sgd" or server.step_size != 1.0):
            raise ConfigError(f"method {self.method!r} sets the global model from the clients' messages (its "
                              "server step is not 'add the aggregated update'), so a server optimizer has nothing "
                              "to act on; leave server_optimizer=sgd and server_lr unset")
        if self.downlink_options.get("ef") in (True, "true"):
            raise ConfigError("the downlink takes no ef option: with downlink_delta=true the error is sent "
                              "next round anyway")
        down = build_codec(self.downlink, **self.downlink_options)
        if not down.carries_models and not self.downlink_delta:
            raise ConfigError(f"downlink {self.downlink!r} compresses updates, not models: set downlink_delta=true "
                              "(send the change of the global model), or use fp32/fp16")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: every Config key, in field order
CONFIG_KEYS: dict[str, Key] = describe(Config)

PRESETS: dict[str, dict[str, Any]] = {
    # README command 1 (`fedcodec run`: FedAvg vs FedMRN with range-coded masks): under three minutes for
    # both methods on a 2-core CPU. Many short rounds: FedMRN's step per round is bounded by its noise,
    # and BatchNorm's running statistics warm up before the first evaluation (docs/RESULTS.md §2)
    "quick": {"rounds": 16, "local_epochs": 1, "num_clients": 100, "clients_per_round": 5, "eval_every": 8},
    # the foundation benchmark (issue: FedAvg vs FedMRN on Fashion-MNIST)
    "bench": {"rounds": 30, "local_epochs": 2, "num_clients": 100, "clients_per_round": 10},
    # the paper's setting; meant for a GPU
    "paper": {"rounds": 100, "local_epochs": 10, "num_clients": 100, "clients_per_round": 10},
}


def read_toml(file: str | Path) -> dict[str, Any]:
    """A ``--config`` file's table. Refused with a :class:`ConfigError`: a missing or unreadable
    file, one over :data:`MAX_CONFIG_BYTES` (before parsing), non-UTF-8 text, invalid TOML, integers
    too long for Python to read, arrays or inline tables nested too deeply for the parser, dotted keys
    too long to parse in bounded time (:data:`MAX_DOTTED_COST`). (Dotted keys parse without
    recursion; :func:`coerce` refuses any table where a scalar belongs, naming the key, without
    walking it.)"""
    from .files import read_bounded

    data = read_bounded(file, MAX_CONFIG_BYTES, "config file")
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {file} is larger than {MAX_CONFIG_BYTES} bytes; a config file holds "
                          "a few keys")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {file} is not UTF-8 text") from None
    cost = 0
    for chain in _DOTTED.finditer(text):  # before parsing: see MAX_DOTTED_COST
        parts = chain.group().count(".") + 1
        cost += parts * parts
        if cost > MAX_DOTTED_COST:
            shown = chain.group()[:40].rstrip(". \t")
            raise ConfigError(f"config file {file}: dotted key {shown}... has {parts:,} parts (too "
                              "many to parse; a config key has at most 2)")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {file} is not valid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(f"config file {file} nests arrays or tables too deeply") from None
    except ValueError as err:  # int() of an over-long digit string
        raise ConfigError(f"config file {file} holds a number too long to read ({str(err)[:80]})") from None
    return table


def build_config(preset: str | None = None, file: str | Path | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Config:
    """A validated Config from the defaults, a preset, a TOML file (values checked as they are) and
    ``overrides`` (strings parsed, None = not given; codec options are merged, not replaced)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if file is not None:
        for name, value in read_toml(file).items():
            try:
                values[name] = coerce(name, value, text=False)[1]
            except ConfigError as err:
                raise ConfigError(f"config file {file}: {err}") from None
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        name, value = coerce(name, value)
        values[name] = {**values.get(name, {}), **value} if CONFIG_KEYS[name].kind is dict else value
    return Config(**values).validate()


def split_assignment(item: str) -> tuple[str, str]:
    """``" key = value "`` → ``("key", "value")``."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    return key.strip(), value.strip()


def parse_assignments(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` strings → (config overrides, codec options); ``codec.X=v`` sets uplink codec
    option X, ``downlink.X=v`` sets downlink codec option X (in the overrides' ``downlink_options``)."""
    overrides: dict[str, Any] = {}
    codec: dict[str, Any] = {}
    for item in items:
        key, value = split_assignment(item)
        if key.startswith("codec."):
            codec[key[len("codec."):]] = option_value(parse_scalar(value), key)
        elif key.startswith("downlink."):
            option = option_value(parse_scalar(value), key)
            overrides.setdefault("downlink_options", {})[key[len("downlink."):]] = option
        else:
            name, parsed = coerce(key, value)
            overrides[name] = parsed
    return overrides, codec
