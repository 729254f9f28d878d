"""reid_core: unsupervised person re-identification with global- and patch-level discriminative
feature learning (a ResNet trunk, a memory-based global branch with a similarity loss, and a
PAUL-style patch branch). A pure library: it knows nothing of HTTP, task queues or databases."""

__version__ = "0.1.0"
