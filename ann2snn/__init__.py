"""ann2snn: convert trained PyTorch networks into spiking networks and measure them."""

__version__ = "0.1.0"
