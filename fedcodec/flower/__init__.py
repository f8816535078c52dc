"""fedcodec on Flower (``pip install fedcodec[flower]``, flwr 1.41, Message API).

- :mod:`fedcodec.flower.client_app` — the ClientApp: calls :func:`fedcodec.fl.client.client_fit` and
  replies with the encoded payload as raw ``bytes`` in a ``ConfigRecord`` (no float model goes up).
- :mod:`fedcodec.flower.server_app` — the ServerApp: samples clients with
  :func:`fedcodec.fl.rng.sample_clients`, broadcasts with :func:`fedcodec.fl.server.broadcast`,
  decodes/rejects/aggregates with :func:`fedcodec.fl.server.server_round`, evaluates with
  :func:`fedcodec.fl.simulation.evaluate` and records every payload's ``len()`` in a ledger.
- :mod:`fedcodec.flower.common` — run config → :class:`fedcodec.config.Config`, message keys.
- :mod:`fedcodec.flower.launch` — start a SuperLink and SuperNodes on loopback and run the app
  (``fedcodec flower ...`` and the tests).

The app project that ``flwr run`` takes is ``flower_app/`` at the repository root.
"""
