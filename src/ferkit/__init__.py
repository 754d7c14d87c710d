"""ferkit: facial emotion recognition toolkit (train, compare, explain and use FER2013 models)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# OpenMP threads (torch's intra-op pool) that spin while waiting collapse throughput when other work shares the
# CPUs (a spinning worker on a busy core holds up every parallel op: ~20x slower with one busy core of two); waiting
# passively costs little when idle. OpenMP reads this once, when torch loads, so it is set here, before anything
# imports torch; a value the user set (or GOMP_SPINCOUNT) is kept. See ferkit.device and benchmarks/busy_threads.py.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

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
