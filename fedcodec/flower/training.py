"""Methods that change local training (FedMRN, FedBAT) inside a user's own Flower training loop.

:func:`compressed_training` reparametrizes the user's ``torch.nn.Module`` for the duration of a
``with`` block: each kernel the codec compresses becomes ``W = W_received + delta(latent)``, where
the latent tensors are new trainable parameters of the model (FedMRN: the update inside the
round's seeded noise, whose 1-bit mask is what travels). The user's optimizer, built from
``model.parameters()`` inside the block, trains the latents and every other parameter as usual.
On leaving the block the model holds the trained weights again, and the update the codec encodes
is left in ``context.state`` for :func:`~fedcodec.flower.mod.codec_mod` to send.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from flwr.app import Context, Message
from torch import nn

from ..errors import ConfigError
from ..fl import rng as rngs
from .mod import PENDING, incoming, keep_state
from .protocol import changes_training, float_tensors, spec_of

LATENT = "fedcodec_latent_"


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    if not isinstance(module._parameters.get(attr), nn.Parameter):
        raise ConfigError(f"the model has no parameter {name!r} (the message's arrays name it): pass the model "
                          "whose state_dict() the app sends")
    return module, attr


@contextmanager
def compressed_training(model: nn.Module, msg: Message, context: Context,
                        steps: int | None = None) -> Iterator[nn.Module]:
    """Train ``model`` the way the server's codec needs, inside the ``with`` block.

    For a codec that trains the weights themselves (``qsgd``, ``topk``, ...) or a message without
    fedcodec's record, this does nothing, so an app written with it runs any codec. For ``fedmrn``
    and ``fedbat``, the compressed kernels are trained through their method's latents (module
    docstring).

    Parameters
    ----------
    model : torch.nn.Module
        The app's model, already loaded with the received arrays (``load_state_dict``); its
        ``state_dict()`` names must be the message's array names. Build the optimizer from
        ``model.parameters()`` *inside* the block. Do not load a state dict inside the block.
    msg : Message
        The ``train`` message the ClientApp received (after :func:`~fedcodec.flower.mod.codec_mod`).
    context : Context
        The ClientApp's context: the update to send is left in its ``state``.
    steps : int, optional
        The number of optimizer steps the block will take (``epochs * len(trainloader)``). FedMRN's
        progressive masking uses it (the share of elements trained through their sampled mask grows
        from 0 to 1 over the steps); without it every forward pass uses the sampled mask.

    Yields
    ------
    torch.nn.Module
        ``model`` itself, reparametrized.

    Examples
    --------
    ::

        @app.train()
        def train(msg: Message, context: Context):
            model = Net()
            model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
            with compressed_training(model, msg, context, steps=epochs * len(trainloader)):
                train_loss = train_fn(model, trainloader, epochs, lr, device)
            ...
    """
    setup = incoming(msg, context.node_id)
    if setup is None:
        yield model
        return
    uplink = setup.uplink()
    if not changes_training(uplink):
        yield model
        return
    arrays = msg.content.array_records.get(setup.arrays_key)
    if arrays is None:
        raise ConfigError(f"no ArrayRecord {setup.arrays_key!r} in the message: add codec_mod to the ClientApp's "
                          "mods, before any mod that changes the message")
    spec = spec_of(arrays)
    received = float_tensors(arrays, spec)
    ctx = setup.context(spec, received, None, rngs.CLIENT_TRAIN)
    param = uplink.algorithm.parametrization(ctx, received)
    owners = {n: _owner(model, n) for n in param.names}
    latent = param.init()
    registered = {}
    for i, (name, value) in enumerate(latent.items()):
        p = nn.Parameter(value.detach().clone())
        model.register_parameter(f"{LATENT}{i}", p)
        registered[name] = p
    saved, orders = {}, {}
    for name, (module, attr) in owners.items():
        orders.setdefault(id(module), (module, list(module._parameters)))
        saved[name] = module._parameters.pop(attr)
    count = [0]

    def reparametrize(module: nn.Module, args):
        if module.training:
            count[0] += 1
            progress = min(1.0, count[0] / steps) if steps else 1.0
            deltas = param.deltas(registered, progress)
        else:
            with torch.no_grad():
                deltas = param.finish(registered)
        for name, (owner, attr) in owners.items():
            base = received[name].to(deltas[name].device)
            setattr(owner, attr, base + deltas[name])
        return None

    hook = model.register_forward_pre_hook(reparametrize)
    try:
        yield model
    finally:
        hook.remove()
        with torch.no_grad():
            update = {k: v.detach().cpu().contiguous() for k, v in param.finish(registered).items()}
        for name, (owner, attr) in owners.items():
            owner.__dict__.pop(attr, None)
            value = received[name] + update[name]
            owner.register_parameter(attr, nn.Parameter(value.to(saved[name].device, saved[name].dtype),
                                                        requires_grad=saved[name].requires_grad))
        for i in range(len(registered)):
            del model._parameters[f"{LATENT}{i}"]
        for module, order in orders.values():  # state_dict() lists them as before
            params = module._parameters
            module._parameters = {k: params[k] for k in order} | {k: v for k, v in params.items() if k not in order}
        keep_state(context, PENDING, update)
