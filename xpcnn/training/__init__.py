"""Training a network: the Trainer, what it records, and checkpoints.

    trainer.py     `Trainer`: device-resident data, seeded batches, full-set scoring, resume
    history.py     `History`: losses, accuracies and timings, saved as JSON and CSV
    checkpoint.py  one ``.npz`` file (no pickle, written atomically): save, load, restore,
                   and building the model a checkpoint holds
"""

from .checkpoint import (
    Checkpoint,
    build_from_checkpoint,
    load_checkpoint,
    make_optimizer_from_checkpoint,
    network_like,
    restore,
    save_checkpoint,
)
from .history import History
from .trainer import Trainer, TrainingInterrupted

__all__ = ["Checkpoint", "build_from_checkpoint", "load_checkpoint", "make_optimizer_from_checkpoint", "network_like",
           "restore", "save_checkpoint", "History", "Trainer", "TrainingInterrupted"]
