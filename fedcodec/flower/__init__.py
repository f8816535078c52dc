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

fedcodec's codecs in *any* Flower app (the app keeps its own model, data, training and strategy):

- :func:`codec_mod` — the ClientApp mod: ``ClientApp(mods=[codec_mod])``.
- :class:`CompressedStrategy` — wraps the ServerApp's strategy: ``CompressedStrategy(FedAvg(), codec="qsgd")``;
  its :class:`BandwidthLedger` records every message's bytes.
- :func:`compressed_training` — around the app's own training loop, for codecs that change local
  training (FedMRN, FedBAT).
- :mod:`fedcodec.flower.protocol` — what travels between the two.
"""

from .mod import codec_mod
from .strategy import BandwidthLedger, CompressedStrategy
from .training import compressed_training

__all__ = ["BandwidthLedger", "CompressedStrategy", "codec_mod", "compressed_training"]
