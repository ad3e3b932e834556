"""The NLI model contract shared by training and serving."""

from nli.labels import LABELS

__version__ = "0.1.0"

__all__ = ["LABELS", "__version__"]
