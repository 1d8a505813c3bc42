"""ann2snn: convert trained PyTorch networks into spiking networks and measure them.

The Python API (``api.py``) runs the CLI's steps on in-memory objects: ``calibrate``,
``convert``, ``evaluate``, ``save`` and ``load``. They are imported on first use, so that
``import ann2snn`` (and the console script's start-up) stays light."""

__version__ = "0.1.0"

API = ("SpikingNetwork", "calibrate", "convert", "evaluate", "load", "save")
__all__ = [*API, "__version__"]


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ann2snn' has no attribute {name!r}")
