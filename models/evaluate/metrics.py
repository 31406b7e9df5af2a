"""Test-set figures for each variant, measured on the path a request takes.

Test images are PNG-encoded (or kept as the original files of a folder dataset), decoded and
normalised by `app.preprocess.Preprocessor`, and run through `app.engine.Engine` with the
service's session settings and batch size. What the report says is what the service answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.bundle import Bundle, InputSpec
from app.engine import Engine
from app.preprocess import Preprocessor
from models.data.datasets import Dataset, encode_png

SERVICE_BATCH = 32  # the service's default max batch size
# fp32 top-class probability from which an image counts as unambiguous (INT8 agreement)
CONFIDENT = 0.5


def encoded_test_images(dataset: Dataset) -> list[bytes]:
    if dataset.test_encoded is not None:
        return dataset.test_encoded
    return [encode_png(image) for image in dataset.test_images]


def preprocess_all(encoded: list[bytes], spec: InputSpec) -> np.ndarray:
    """float32 [N, C, H, W], each image through the service's preprocessing."""
    preprocess = Preprocessor(spec)
    return np.concatenate([preprocess(data) for data in encoded])


def predict(bundle: Bundle, precision: str, inputs: np.ndarray) -> np.ndarray:
    """Logits of one variant, run by the service's engine in service-sized batches."""
    engine = Engine(bundle, device="cpu", variant=precision, threads=1)
    return np.concatenate(
        [engine.run(inputs[i : i + SERVICE_BATCH]) for i in range(0, len(inputs), SERVICE_BATCH)]
    )


@dataclass
class Scores:
    accuracy: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class

    def to_metrics(self) -> dict:
        return {
            "accuracy": round(self.accuracy, 6),
            "macro_f1": round(float(np.mean(self.f1)), 6),
            "per_class": {
                "precision": [round(v, 6) for v in self.precision],
                "recall": [round(v, 6) for v in self.recall],
                "f1": [round(v, 6) for v in self.f1],
            },
            "confusion_matrix": self.confusion,
        }


def score(labels: np.ndarray, predictions: np.ndarray, classes: int) -> Scores:
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    precision = np.divide(true_positive, predicted, out=np.zeros(classes), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros(classes), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(classes), where=both > 0)
    return Scores(
        accuracy=float(true_positive.sum() / max(1, len(labels))),
        precision=precision.tolist(),
        recall=recall.tolist(),
        f1=f1.tolist(),
        confusion=confusion.tolist(),
    )


def gate_failures(
    accuracy: dict[str, float], *, max_int8_drop: float, min_accuracy: float
) -> list[str]:
    """Why the build must fail, one line per reason; empty when it passes.

    `max_int8_drop` is in percentage points, `min_accuracy` a fraction.
    """
    failures = [
        f"{variant} test accuracy {value:.2%} is below --min-accuracy {min_accuracy:.2%}"
        for variant, value in accuracy.items()
        if value < min_accuracy
    ]
    drop = int8_drop(accuracy)
    if drop > max_int8_drop:
        failures.append(
            f"int8 test accuracy {accuracy['int8']:.2%} is {drop:.2f} points below fp32 "
            f"({accuracy['fp32']:.2%}); --max-int8-drop is {max_int8_drop} points"
        )
    return failures


def int8_drop(accuracy: dict[str, float]) -> float:
    """How many percentage points INT8 is below fp32 (0 without an INT8 variant).

    Rounded to 1e-9 so that a drop of exactly the allowed points is not failed by float error.
    """
    if "int8" not in accuracy:
        return 0.0
    return round((accuracy["fp32"] - accuracy["int8"]) * 100, 9)
