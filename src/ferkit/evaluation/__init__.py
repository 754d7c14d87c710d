"""Evaluation: metrics (numpy), confusion-matrix and error-gallery plots, and `evaluate` on a split."""

from ferkit.evaluation.evaluate import (
    SELECTION_SPLIT,
    EvaluationResult,
    TTASelection,
    check_label_set,
    evaluate,
    format_confusion,
    format_summary,
    load_probs,
    save_probs,
    select_tta,
    write_artifacts,
)
from ferkit.evaluation.metrics import (
    classification_report,
    confusion_matrix,
    format_report,
    report_from_confusion,
)
from ferkit.evaluation.plots import plot_confusion_matrix, plot_error_gallery

__all__ = ["SELECTION_SPLIT", "EvaluationResult", "TTASelection", "check_label_set", "classification_report",
           "confusion_matrix", "evaluate", "format_confusion", "format_report", "format_summary", "load_probs",
           "plot_confusion_matrix", "plot_error_gallery", "report_from_confusion", "save_probs", "select_tta",
           "write_artifacts"]
