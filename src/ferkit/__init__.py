"""ferkit: facial emotion recognition toolkit (train, compare, explain and use FER2013 models)."""

__version__ = "0.1.0"
