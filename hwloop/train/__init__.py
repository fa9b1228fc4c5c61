"""Training: software training of the ReLU twin / TTFS net, checkpoints.

Submodules are imported lazily so that ``hwloop.train.checkpoint`` stays light.
"""

from hwloop.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["RECIPES", "Recipe", "evaluate", "load_checkpoint", "save_checkpoint", "train"]


def __getattr__(name):
    if name in ("RECIPES", "Recipe", "evaluate", "train"):
        from hwloop.train import software  # lazy: import-time cost (checkpoint stays light)

        return getattr(software, name)
    raise AttributeError(f"module 'hwloop.train' has no attribute {name!r}")
