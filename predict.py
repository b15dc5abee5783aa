#!/usr/bin/env python
"""Segment your own images with a trained run: masks, overlays, predictions.json (see --help)."""
from samcl.scripts import predict

if __name__ == "__main__":
    predict()
