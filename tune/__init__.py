"""The training side of the Red Heart pipeline: config, data, loop, checkpoints and the Ray Tune layer."""

__version__ = "0.1.0"
