"""Plain-PyTorch training: the epoch loop, checkpoints, progress, and streaming within a memory budget."""
