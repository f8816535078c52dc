"""fedcodec: communication-efficient federated learning with honest byte accounting."""

__version__ = "0.1.0"
