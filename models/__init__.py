"""Small reference SNNs with their training scripts and checkpoints."""
