"""ann2snn: convert trained PyTorch networks into spiking networks and measure them.

The Python API (``app/api.py``) runs the CLI's steps on in-memory objects: ``calibrate``,
``convert``, ``evaluate``, ``save`` and ``load``. They are imported on first use, so that
``import ann2snn`` (and the console script's start-up) stays light."""

from ann2snn.version import __version__

API = ("SpikingNetwork", "calibrate", "convert", "evaluate", "load", "save")
__all__ = [*API, "__version__"]


def __getattr__(name: str):
    if name in API:
        from ann2snn.app import api

        return getattr(api, name)
    raise AttributeError(f"module 'ann2snn' has no attribute {name!r}")
