"""fedcodec on Flower (``pip install fedcodec[flower]``, flwr 1.41, Message API).

The round loop is fedcodec's own (:func:`fedcodec.fl.loop.run_round`); Flower only carries the bytes.

- :mod:`fedcodec.flower.server_app` — the ServerApp: builds the run as ``fedcodec run`` does
  (:func:`fedcodec.fl.simulation.setup`), finds the SuperNodes (:func:`fedcodec.flower.transport.discover`)
  and runs the loop with the Flower transport; writes metrics, ledger, model, checkpoints and resumes.
- :mod:`fedcodec.flower.transport` — :class:`~fedcodec.flower.transport.FlowerTransport`: sends each
  sampled client its broadcast as raw ``bytes`` in a Message and reads the replies defensively.
- :mod:`fedcodec.flower.client_app` — the ClientApp: calls :func:`fedcodec.fl.client.client_fit`
  and replies with the encoded payload as raw ``bytes`` in a ``ConfigRecord`` (no float model goes up).
- :mod:`fedcodec.flower.common` — run config → :class:`fedcodec.config.Config`, message keys.
- :mod:`fedcodec.flower.launch` — start a SuperLink and SuperNodes on loopback and run the app
  (``fedcodec flower ...`` and the tests).

The app project that ``flwr run`` takes is ``flower_app/`` at the repository root.
"""
