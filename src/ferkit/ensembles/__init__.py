"""Decision-level ensembles: combine members' class probabilities (fitted on PublicTest, reported on PrivateTest).

combine      fitting: fit_ensemble, greedy forward selection, log-linear weights (numpy, PublicTest only)
predictions  ensembles of saved results/predictions/*.npz files (no model runs), the methods table
members      members from weights files or a run's snapshots (runs the models on both test splits)
artifact     one .safetensors file holding a whole ensemble, loadable like a single model
plots        members-vs-ensembles bar chart
records      results/ensembles.csv rows (`ferkit ensemble --record NAME`) and their Markdown table

What a fitted ensemble computes is a model, so it lives in the models layer, which must not import this package:
EnsembleWeights, apply_ensemble and the combination rules in `ferkit.models.ensemble_weights`, EnsembleModel and
save_ensemble / load_ensemble in `ferkit.models.ensemble` (which `ferkit.models.weights.load_model` uses).
`combine` and `artifact` re-export them, so they are importable from here as before.
"""

from ferkit.ensembles.artifact import EnsembleModel, is_ensemble_file, load_ensemble, save_ensemble
from ferkit.ensembles.combine import (
    METHODS,
    EnsembleWeights,
    accuracy_weighted,
    apply_ensemble,
    canonical_method,
    class_weighted,
    fit_ensemble,
    greedy_selection,
    log_linear,
    log_linear_selection,
    majority_vote,
    mean,
    member_accuracies,
    per_class_precision,
)
from ferkit.ensembles.members import member_classes, predict_members, snapshot_members
from ferkit.ensembles.plots import plot_members_vs_ensemble
from ferkit.ensembles.predictions import (
    EnsembleReport,
    MemberSet,
    evaluate_methods,
    format_table,
    load_prediction_files,
    member_networks,
    save_member_predictions,
    save_prediction_file,
)

__all__ = ["EnsembleModel", "EnsembleReport", "EnsembleWeights", "METHODS", "MemberSet", "accuracy_weighted",
           "apply_ensemble", "canonical_method", "class_weighted", "evaluate_methods", "fit_ensemble",
           "format_table", "greedy_selection", "is_ensemble_file", "load_ensemble", "load_prediction_files",
           "log_linear", "log_linear_selection", "majority_vote", "mean", "member_accuracies", "member_classes",
           "member_networks", "per_class_precision",
           "plot_members_vs_ensemble", "predict_members", "save_ensemble", "save_member_predictions",
           "save_prediction_file", "snapshot_members"]
