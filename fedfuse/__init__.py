"""fedfuse core: pure PyTorch + POT + scipy. Imports nothing from Flower."""

from fedfuse.data import Dataset, load_dataset
from fedfuse.errors import ConfigError, DataUnavailableError
from fedfuse.models import build_model
from fedfuse.train import evaluate, train

__all__ = ["ConfigError", "DataUnavailableError", "Dataset", "build_model", "evaluate", "load_dataset", "train"]
__version__ = "0.1.0"
