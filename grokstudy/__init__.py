"""grokstudy: distributed phase-diagram studies of grokking."""

__version__ = "0.1.0"
