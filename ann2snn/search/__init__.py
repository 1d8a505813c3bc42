"""Choosing settings by simulating: spike-budget search, operating-point choice, transfer-function training."""
