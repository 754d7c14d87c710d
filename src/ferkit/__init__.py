"""ferkit: facial emotion recognition toolkit (train, compare, explain and use FER2013 models)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Recognizer", "__version__"]

if TYPE_CHECKING:
    from ferkit.inference import Recognizer


def __getattr__(name: str) -> Any:
    # Lazy, so `import ferkit` (and the CLI's startup) does not import torch and OpenCV.
    if name == "Recognizer":
        from ferkit.inference import Recognizer

        return Recognizer
    raise AttributeError(f"module 'ferkit' has no attribute {name!r}")
