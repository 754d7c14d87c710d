"""Inference on photos and videos: face detection, FER2013-style face crops, emotion recognition.

The main entry point is `Recognizer` (also importable as `ferkit.Recognizer`).
"""

from ferkit.inference.detect import Detection, FaceDetector, get_detector, list_detectors
from ferkit.inference.faces import crop_face
from ferkit.inference.image_io import ImageError, load_image
from ferkit.inference.recognizer import Recognizer

__all__ = ["Detection", "FaceDetector", "ImageError", "Recognizer", "crop_face", "get_detector", "list_detectors",
           "load_image"]
