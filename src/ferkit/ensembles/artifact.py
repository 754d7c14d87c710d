"""A saved ensemble: one .safetensors file that loads and runs like a single model.

The runnable ensemble (`EnsembleModel`) and its file format live in the models layer, `ferkit.models.ensemble`,
because `ferkit.models.weights.load_model` loads ensemble files like any model and a lower layer must not import
this package; the names stay importable from here, beside the fitting that produces the files.
"""

from ferkit.models.ensemble import (
    ENSEMBLE_FORMAT,
    SHARED_KEYS,
    EnsembleModel,
    Member,
    is_ensemble_file,
    load_ensemble,
    save_ensemble,
)

__all__ = ["ENSEMBLE_FORMAT", "SHARED_KEYS", "EnsembleModel", "Member", "is_ensemble_file", "load_ensemble",
           "save_ensemble"]
