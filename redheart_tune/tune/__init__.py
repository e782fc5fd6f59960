"""The Ray Tune layer: the trainable, the sweep and train stages' Tuner runs, storage and resources."""
