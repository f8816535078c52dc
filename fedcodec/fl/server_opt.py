r"""Server optimizers: how the round's aggregate moves the global model.

Each round the server has the global model :math:`x_t` (float32) and the aggregate :math:`\Delta_t`
of the clients' updates (float64; by default their example-weighted mean, the codec's
``aggregate`` otherwise). Reddi et al. (2021) read :math:`-\Delta_t` as a *pseudo-gradient* and hand
it to a server optimizer; FedAvg is the special case :math:`x_{t+1} = x_t + \Delta_t`.

All arithmetic is float64 and the model is cast to float32 once per round, at the end. State
starts empty and after the first step holds float64 tensors; ``m`` and ``v`` start at
:math:`m_{-1} = 0` and :math:`v_{-1} = v_0` (``initial_v``).

``sgd`` — FedAvg with a server learning rate :math:`\eta` (no state):

.. math:: x_{t+1} = x_t + \eta\,\Delta_t

With :math:`\eta = 1` (the default) this is ``(x.double() + Δ).float()`` bit for bit, what the
engine has always done.

``momentum`` — FedAvgM (Hsu et al., 2019), heavy-ball momentum on the pseudo-gradient:

.. math::
    m_t = \beta\,m_{t-1} + \Delta_t, \qquad x_{t+1} = x_t + \eta\,m_t

A constant :math:`\Delta` moves the model by :math:`\eta / (1 - \beta)` times :math:`\Delta` per
round in the long run: ten times FedAvg's step with :math:`\eta = 1, \beta = 0.9`.

``adam`` and ``yogi`` — FedAdam and FedYogi, Algorithm 2 of Reddi et al. (2021):

.. math::
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\,\Delta_t \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\,\Delta_t^2
        && \text{(adam)} \\
    v_t &= v_{t-1} - (1 - \beta_2)\,\Delta_t^2\,\operatorname{sign}(v_{t-1} - \Delta_t^2)
        && \text{(yogi)} \\
    x_{t+1} &= x_t + \eta\,\frac{m_t}{\sqrt{v_t} + \tau}

elementwise, with no bias correction, as in the paper. :math:`\tau` sets how adaptive the step is
(a large :math:`\tau` makes it plain momentum SGD with rate :math:`\eta (1 - \beta_1)/\tau`).
Algorithm 2 asks for :math:`v_{-1} \ge \tau^2`; ``initial_v`` defaults to :math:`\tau^2`, the
smallest value it allows.

**BatchNorm running statistics** (role ``"buffer"``) are estimates of the data's statistics, not
parameters a loss is minimised over, so no optimizer applies to them: under every kind they take
the plain average, :math:`x_{t+1} = x_t + \Delta_t` (rate 1, no state), exactly as FedAvg. The
optimizer applies to the roles ``"weight"`` (conv/linear kernels) and ``"param"`` (other
trainables).

**Relation to Flower 1.41** (``flwr.serverapp.strategy``), whose strategies apply to every array
of the model, buffers included, in the arrays' own dtype:

- ``FedAvg`` is ``sgd`` with :math:`\eta = 1`; ``FedAvgM(server_learning_rate=η,
  server_momentum=β)`` is ``momentum`` with the same :math:`\eta, \beta` — Flower writes it as
  PyTorch SGD on the pseudo-gradient :math:`-\Delta` (first momentum = first pseudo-gradient), the
  same numbers. Flower's defaults are :math:`\eta = 1, \beta = 0` (momentum off); ours take
  :math:`\beta = 0.9`, since ``momentum`` with :math:`\beta = 0` would just be ``sgd``.
- ``FedYogi(eta, beta_1, beta_2, tau)`` is ``yogi`` with ``initial_v=0``: Flower starts
  :math:`v` at 0 rather than at :math:`\tau^2`, otherwise the update is the same.
- ``FedAdam`` starts :math:`v` at 0 and bias-corrects the step size: at server round
  :math:`t = 1, 2, \ldots` it uses :math:`\eta_t = \eta \sqrt{1 - \beta_2^{t+1}} / (1 - \beta_1^{t+1})`
  (the exponent runs one ahead of Kingma & Ba's). So Flower's ``FedAdam`` round :math:`t` is our
  ``adam`` with ``initial_v=0`` and ``lr`` :math:`= \eta_t`. We follow the paper instead: the
  correction assumes :math:`v_{-1} = 0`, Algorithm 2 has none, and with Flower's default
  :math:`\beta`\ s it scales the step by 0.47 to 0.8 for the first hundred rounds (0.74 at
  round 1), which a user moving from Flower can fold into :math:`\eta`.
- Defaults: :math:`\beta_1 = 0.9, \beta_2 = 0.99, \tau = 10^{-3}` as Flower's ``FedAdam`` and
  ``FedYogi`` (and the paper's experiments for :math:`\beta`); the server learning rate defaults
  per kind to Flower's: 1 for ``sgd`` and ``momentum``, 0.1 for ``adam``, 0.01 for ``yogi``. The
  paper tunes :math:`\eta` per task; so should you.

**Warm-up** (``warmup`` :math:`W` rounds, every kind): round :math:`t = 1, 2, \ldots` steps with
:math:`\eta_t = \eta \min(1, t / W)`, a linear ramp (Goyal et al., 2017). Without bias correction
the ``adam`` step for a steady :math:`\Delta` grows to 1.5–2.1 :math:`\eta` per coordinate between
rounds 4 and 60 (:math:`m_t / \sqrt{v_t}` peaks at 2.12 at round 13 with the default betas) before
settling at :math:`\eta`; the ramp keeps those rounds' steps small, which is what lets a model whose
first updates are large (a learned image codec at a high learning rate) train instead of diverge.
:math:`W = 0` (the default) is no warm-up, bit for bit the plain rule.

A round that applies no aggregate (too few clients decoded) must not call :meth:`ServerOptimizer.step`:
the model and the state both stay as they are, as in Flower.

Example, once per round::

    opt = ServerOptimizer(spec, ServerOptimizerConfig(kind="adam", lr=0.03))
    state = {}                                    # or a checkpoint's, after opt.check_state(state)
    for round_num in rounds:
        delta = ...                               # the codec's aggregate, float64, one per tensor
        global_params, state = opt.step(global_params, delta, state)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..codecs.base import ModelSpec, TensorSpec
from ..errors import ConfigError

Update = dict[str, torch.Tensor]

KINDS = ("sgd", "momentum", "adam", "yogi")
#: the server learning rate each kind gets when ``lr`` is None (Flower 1.41's defaults)
DEFAULT_LR = {"sgd": 1.0, "momentum": 1.0, "adam": 0.1, "yogi": 0.01}
#: the state each kind keeps, one float64 tensor per optimized model tensor and prefix
STATE_PREFIXES = {"sgd": (), "momentum": ("m",), "adam": ("m", "v"), "yogi": ("m", "v")}
#: the tensor roles an optimizer applies to; the others (BatchNorm running statistics) are averaged
OPTIMIZED_ROLES = ("weight", "param")


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """Options of a :class:`ServerOptimizer`; validated on construction.

    Args:
        kind: ``"sgd"`` (FedAvg), ``"momentum"`` (FedAvgM), ``"adam"`` (FedAdam) or ``"yogi"``
            (FedYogi).
        lr: the server learning rate :math:`\\eta` > 0; None takes the kind's default
            (:data:`DEFAULT_LR`: 1.0, 1.0, 0.1, 0.01).
        momentum: :math:`\\beta` of ``momentum``, in [0, 1). Default 0.9.
        beta1: :math:`\\beta_1` of ``adam``/``yogi``, in [0, 1). Default 0.9.
        beta2: :math:`\\beta_2` of ``adam``/``yogi``, in [0, 1). Default 0.99.
        tau: the adaptivity :math:`\\tau` > 0 of ``adam``/``yogi``. Default 1e-3.
        initial_v: :math:`v_{-1}` >= 0 of ``adam``/``yogi``; None takes :math:`\\tau^2` (Reddi et
            al.), 0.0 gives Flower's.
        warmup: rounds of the linear learning-rate ramp, an integer >= 0 (0: none). Default 0.

    Error messages name the :class:`~fedcodec.config.Config` keys (``server_lr``, ...).
    """

    kind: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    initial_v: float | None = None
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown server_optimizer {self.kind!r}; choose one of {', '.join(KINDS)}")
        checks = (
            ("lr", "server_lr", self.lr, lambda x: x > 0, True,
             f"a positive number (or unset for the {self.kind} default, {DEFAULT_LR[self.kind]})"),
            ("momentum", "server_momentum", self.momentum, lambda x: 0 <= x < 1, False, "in [0, 1), e.g. 0.9"),
            ("beta1", "server_beta1", self.beta1, lambda x: 0 <= x < 1, False, "in [0, 1), e.g. 0.9"),
            ("beta2", "server_beta2", self.beta2, lambda x: 0 <= x < 1, False, "in [0, 1), e.g. 0.99"),
            ("tau", "server_tau", self.tau, lambda x: x > 0, False, "a positive number, e.g. 1e-3"),
            ("initial_v", "server_initial_v", self.initial_v, lambda x: x >= 0, True,
             "a number >= 0 (or unset for server_tau**2)"),
        )
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"server_warmup must be an integer >= 0 (rounds; 0: no warm-up), got {self.warmup!r}; "
                              "set server_warmup=... accordingly")
        for attr, key, value, ok, optional, want in checks:
            if value is None and optional:
                continue
            number = _number(value)
            if number is None or not ok(number):
                raise ConfigError(f"{key} must be {want}, got {value!r}; set {key}=... accordingly")
            object.__setattr__(self, attr, number)

    @classmethod
    def from_config(cls, config: Any) -> "ServerOptimizerConfig":
        """The options of a :class:`~fedcodec.config.Config` (its ``server_*`` keys)."""
        return cls(kind=config.server_optimizer, lr=config.server_lr, momentum=config.server_momentum,
                   beta1=config.server_beta1, beta2=config.server_beta2, tau=config.server_tau,
                   initial_v=config.server_initial_v, warmup=config.server_warmup)

    @property
    def step_size(self) -> float:
        """:math:`\\eta`: ``lr``, or the kind's default when it is None."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.kind]

    def step_size_at(self, round_num: int | None) -> float:
        """:math:`\\eta_t` of round ``round_num`` (1, 2, ...) under the warm-up; :attr:`step_size`
        without one, or when ``round_num`` is None."""
        if not self.warmup or round_num is None:
            return self.step_size
        return self.step_size * min(1.0, max(int(round_num), 1) / self.warmup)

    @property
    def v0(self) -> float:
        """:math:`v_{-1}`: ``initial_v``, or :math:`\\tau^2` when it is None."""
        return self.initial_v if self.initial_v is not None else self.tau * self.tau


class ServerOptimizer:
    """Applies the round's aggregate to the global model under one of :data:`KINDS`.

    The optimizer itself holds no state between rounds: the caller keeps the state dict (to
    checkpoint it) and passes it to every :meth:`step`. Its keys are ``"<prefix>/<tensor name>"``
    with prefix ``m`` (first moment / momentum) or ``v`` (second moment), one float64 tensor of the
    model tensor's shape for each tensor of role ``"weight"`` or ``"param"`` (e.g.
    ``"m/fc.weight"``, ``"v/fc.weight"``); ``sgd`` keeps none. Before the first step the state is
    empty.
    """

    def __init__(self, spec: ModelSpec, options: ServerOptimizerConfig | None = None) -> None:
        self.spec = spec
        self.options = options if options is not None else ServerOptimizerConfig()
        self.optimized: tuple[TensorSpec, ...] = tuple(spec.select(OPTIMIZED_ROLES))

    def __repr__(self) -> str:
        return f"ServerOptimizer({self.options})"

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The state's keys and shapes after the first step (before it, the state is empty)."""
        return {f"{prefix}/{t.name}": t.shape
                for prefix in STATE_PREFIXES[self.options.kind] for t in self.optimized}

    def check_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`~fedcodec.errors.ConfigError` unless ``state`` (a loaded checkpoint's) is
        empty or holds exactly this optimizer's tensors for this model: the same keys, shapes and
        float64 dtype."""
        if not state:
            return
        want = self.state_shapes()
        missing = sorted(set(want) - set(state))
        extra = sorted(set(state) - set(want))
        wrong = sorted(k for k in set(want) & set(state)
                       if tuple(state[k].shape) != tuple(want[k]) or state[k].dtype != torch.float64)
        if missing or extra or wrong:
            parts = [f"{label} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                     for label, keys in (("missing", missing), ("unexpected", extra),
                                         ("wrong shape or dtype (want float64)", wrong)) if keys]
            raise ConfigError(f"server optimizer state does not fit server_optimizer="
                              f"{self.options.kind!r} on this model: {'; '.join(parts)}. "
                              "Resume with the settings and model it was saved with, or start over.")

    def step(self, global_params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
             state: Mapping[str, torch.Tensor], round_num: int | None = None) -> tuple[Update, dict[str, torch.Tensor]]:
        """One server step: the new global model (float32, one tensor per name of the spec) and
        the new state.

        ``global_params`` is the model the round started from, ``delta`` the round's aggregate
        :math:`\\Delta_t` (float64, one tensor per name of the spec), ``state`` the previous step's
        state (empty before the first), ``round_num`` the round (1, 2, ...) the warm-up ramps over
        (None: the full rate). Nothing passed in is modified, so a caller that discards
        the result (say, a non-finite model) keeps the previous model and state as they were.
        """
        self.check_state(state)
        opt = self.options
        lr = opt.step_size_at(round_num)
        new_params: Update = {}
        new_state: dict[str, torch.Tensor] = {}
        for t in self.spec.tensors:
            x = global_params[t.name].to(torch.float64)
            d = delta[t.name].to(torch.float64)
            if t.role not in OPTIMIZED_ROLES:
                x = x + d
            elif opt.kind == "sgd":
                x = x + lr * d
            elif opt.kind == "momentum":
                m = state[f"m/{t.name}"] if state else torch.zeros_like(d)
                m = opt.momentum * m + d
                new_state[f"m/{t.name}"] = m
                x = x + lr * m
            else:
                m = state[f"m/{t.name}"] if state else torch.zeros_like(d)
                v = state[f"v/{t.name}"] if state else torch.full_like(d, opt.v0)
                d2 = d * d
                m = opt.beta1 * m + (1 - opt.beta1) * d
                if opt.kind == "adam":
                    v = opt.beta2 * v + (1 - opt.beta2) * d2
                else:
                    v = v - (1 - opt.beta2) * d2 * torch.sign(v - d2)
                new_state[f"m/{t.name}"] = m
                new_state[f"v/{t.name}"] = v
                x = x + lr * m / (torch.sqrt(v) + opt.tau)
            new_params[t.name] = x.to(torch.float32)
        return new_params, new_state
