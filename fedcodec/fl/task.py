"""Tasks: what a federated run trains for and how its global model is judged.

The engine knows nothing of labels, accuracies or rates. A task gives local training its loss
(under every algorithm, plain SGD/Adam or a codec's reparametrized training) and gives the engine
its per-round evaluation. :class:`Classification` is the default; learned compression brings its
own (:class:`fedcodec.neural.models.NTCTask`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..codecs import Update
    from .client import ClientRuntime


class Task(Protocol):
    """What local training minimises and how a round's global model is evaluated.

    A task may also carry ``lr_scales`` ({parameter-name prefix: learning-rate multiplier}) for
    parameters that should train faster or slower than the rest (see :func:`~fedcodec.fl.client.param_groups`),
    and ``loss_uses_generator = False`` when its loss never draws from ``gen``: only such a task's
    clients can train several at once (:mod:`fedcodec.fl.batched`, which passes no generator).
    """

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The loss of ``model`` on a batch: inputs ``x``, targets ``y``. ``gen`` is the round's
        training generator, for tasks that draw noise (learned compression's additive uniform noise).
        Under a codec's parametrization ``model`` is called with substituted weights, so the loss
        must reach them through ``model``'s own submodules (as any ``model(...)`` call does)."""
        ...

    def evaluate(self, runtime: ClientRuntime, params: Update,
                 stores: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """The record entries of one evaluation of the global tensors ``params`` (what the uplink
        codec says to evaluate), on ``runtime.model``. ``stores`` are the clients' stores, for tasks whose
        clients evaluate with their own client-local tensors (``runtime.local_tensors(store)``)."""
        ...


class Classification:
    """Cross-entropy of the model's logits; evaluated by accuracy and mean cross-entropy on the test
    set ``(test_x, test_y)``. A task without a test set trains but cannot evaluate.

    ``batch_size`` is the evaluation batch; None (the default) chooses it for the device the test set
    lives on (:func:`eval_batch_size`). Evaluation runs under :func:`torch.inference_mode` and keeps
    its running sums on the device, so a whole evaluation costs one host synchronisation. In eval mode
    an image's logits depend on the batch only through the kernels the backend picks for its shape
    (float rounding, about 1e-7 relative), so the accuracy is the same at every batch size unless two
    logits of an image tie to within rounding; ``test_loss`` sums the per-image losses in float64."""

    def __init__(self, test_x: torch.Tensor | None = None, test_y: torch.Tensor | None = None,
                 batch_size: int | None = None):
        if (test_x is None) != (test_y is None) or (test_x is not None and len(test_x) != len(test_y)):
            raise ConfigError("a classification test set needs inputs and labels of the same length")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"the evaluation batch size must be >= 1, got {batch_size}")
        self.test_x, self.test_y, self.batch_size = test_x, test_y, batch_size

    #: the loss draws nothing: clients can train several at once (:mod:`fedcodec.fl.batched`)
    loss_uses_generator = False

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def evaluate(self, runtime: ClientRuntime, params: Update,
                 stores: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Test ``accuracy`` and mean cross-entropy ``test_loss`` of ``params``."""
        if self.test_x is None or self.test_y is None:
            raise ConfigError("this classification task has no test set to evaluate on; "
                              "give it one: Classification(test_x, test_y)")
        runtime.load(params)
        runtime.model.eval()
        x, y = self.test_x, self.test_y
        size = self.batch_size or eval_batch_size(x.device)
        with torch.inference_mode():
            correct = torch.zeros((), dtype=torch.int64, device=x.device)
            loss = torch.zeros((), dtype=torch.float64, device=x.device)
            for start in range(0, len(x), size):
                out = runtime.model(x[start:start + size])
                yb = y[start:start + size]
                loss += F.cross_entropy(out, yb, reduction="none").sum(dtype=torch.float64)
                correct += (out.argmax(1) == yb).sum()
            correct, loss = int(correct), float(loss)  # the one synchronisation
        return {"accuracy": correct / len(x), "test_loss": loss / len(x)}


#: evaluation batch per device type. On the 2-core CPU of docs/RESULTS.md §2, batches of 64-256 evaluate
#: fastest on a quiet machine (1000 is about 1.7x slower per image: the activations outgrow the caches),
#: but many small batches collapse when another process takes a core (each operator's threads wait on
#: each other): 256 is within noise of the best when quiet and of 1000 under contention. An accelerator
#: wants large batches to fill it
EVAL_BATCH = {"cpu": 256, "cuda": 1024, "mps": 512}


def eval_batch_size(device: torch.device | str) -> int:
    """The evaluation batch size for ``device`` (see :data:`EVAL_BATCH`)."""
    return EVAL_BATCH.get(torch.device(device).type, EVAL_BATCH["cpu"])


class TaskLoss(nn.Module):
    """``task.loss`` of ``model`` as a module of its own, so that
    :func:`torch.func.functional_call` on it (with names ``"model." + name``) substitutes weights
    for every call the loss makes into ``model``: a codec's reparametrized training then minimises
    the task's loss, whatever the task."""

    def __init__(self, task: Task, model: nn.Module):
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.task.loss(self.model, x, y, gen)
