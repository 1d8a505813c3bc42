#!/usr/bin/env python3
"""Fetch MNIST / Fashion-MNIST offline (the same as ``ann2snn fetch``; ``ann2snn/fetch.py``).

  python scripts/fetch_data.py mnist fashion-mnist [--data-dir DIR]
"""

from __future__ import annotations

import sys

from ann2snn.app.cli import run

if __name__ == "__main__":
    sys.exit(run(["fetch", *sys.argv[1:]]))
