"""``moetron train``: byte-level data, the training loop, checkpoints and plots."""

from .checkpoint import CheckpointError
from .config import PRESET_TRAIN, TrainConfig
from .data import ByteDataset, DataError, load_corpus
from .loop import GPUMemoryError, ResumeError, train

__all__ = ["TrainConfig", "PRESET_TRAIN", "train", "ResumeError", "GPUMemoryError", "CheckpointError", "DataError",
           "ByteDataset", "load_corpus"]
