"""The served model as the protocol describes it: metadata, config, accepted inputs, outputs.

Two inputs, of which a request sends one: the model's own FP32 tensor `[N, C, H, W]` (or
`[N, H, W, C]` for an NHWC model), already preprocessed as the manifest says, or `image`, a BYTES
tensor `[N]` of encoded images that the server decodes exactly as /classify does. Outputs,
`[N, classes]`: `logits` and `probabilities`, or only `probabilities` for a model whose own output
is probabilities already (it has no logits to give, and gets no second softmax). `probabilities`
are the served scores, as /classify answers them: calibrated by the bundle's temperature when it
has one; `logits` stay the model's own. With `parameters.coverage` the answer also holds
`prediction_set`, BYTES `[N]`: each image's set as the JSON object /classify answers.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import orjson

from app.errors import InvalidParameter
from app.postprocess import calibrated_scores, prediction_set, top_k
from app.service import ModelService, coverage_threshold
from app.v2.codec import BYTES, OutputTensor, RequestedOutput, Tensor, bad
from app.v2.errors import V2Error
from app.v2.stats import ModelStatistics

LOGITS, PROBABILITIES, PREDICTION_SET = "logits", "probabilities", "prediction_set"
OUTPUTS = (LOGITS, PROBABILITIES)
IMAGE = "image"
PLATFORM = "onnxruntime_onnx"

_served: WeakKeyDictionary[ModelService, ServedModel] = WeakKeyDictionary()


def served_model(service: ModelService) -> ServedModel:
    """One description (and one set of statistics) per loaded model."""
    model = _served.get(service)
    if model is None:
        model = _served[service] = ServedModel(service)
    return model


class ServedModel:
    def __init__(self, service: ModelService) -> None:
        manifest = service.bundle.manifest
        spec = manifest.input
        self.name, self.version, self.labels = service.name, manifest.version, manifest.labels
        self.tensor_input = spec.name
        self.image_input = IMAGE if spec.name != IMAGE else f"encoded_{IMAGE}"
        self.sample_shape = spec.sample_shape
        self.layout = spec.layout
        self.input_spec = spec
        self.model_probabilities = manifest.output.kind == PROBABILITIES
        self.output_names = (PROBABILITIES,) if self.model_probabilities else OUTPUTS
        self.output_kind = manifest.output.kind
        self.calibration = manifest.calibration
        self.temperature = service.temperature
        # the model's own probabilities are the served scores only at temperature 1
        self.raw_probabilities = self.model_probabilities and self.temperature == 1.0
        self.max_batch_size = service.settings.max_batch_size
        self.stats = ModelStatistics()
        self.metadata = self._metadata()
        self.config = self._config(service)

    # -- which model --------------------------------------------------------------------------

    def check(self, name: str, version: str | None) -> None:
        if name != self.name:
            raise V2Error(404, f"unknown model {name!r}: this is {self.name!r}")
        if version and version != self.version:
            raise V2Error(
                404,
                f"unknown version {version!r} of model {name!r}: "
                f"the served version is {self.version!r}",
            )

    # -- inputs --------------------------------------------------------------------------------

    def expected_inputs(self) -> str:
        dims = ", ".join(map(str, self.sample_shape))
        return (
            f"{self.tensor_input!r} (FP32 [N, {dims}], {self.layout}, preprocessed) or "
            f"{self.image_input!r} (BYTES [N], encoded images)"
        )

    def read_input(self, inputs: list[Tensor]) -> np.ndarray | list[bytes]:
        """The request's pixels as float32 [N, *sample_shape], or its encoded images."""
        if len(inputs) != 1:
            raise bad(f"send exactly one input, {self.expected_inputs()}; got {len(inputs)}")
        (tensor,) = inputs
        if tensor.name == self.tensor_input:
            return self._pixels(tensor)
        if tensor.name == self.image_input:
            return self._images(tensor)
        raise bad(f"unknown input {tensor.name!r}: send {self.expected_inputs()}")

    def _pixels(self, tensor: Tensor) -> np.ndarray:
        expected = [-1, *self.sample_shape]
        shape_ok = len(tensor.shape) == 4 and tensor.shape[1:] == self.sample_shape
        if tensor.datatype != "FP32" or not shape_ok or tensor.shape[0] < 1:
            raise bad(
                f"input {tensor.name!r} must be FP32 with shape {expected} (N >= 1), "
                f"got {tensor.datatype} {list(tensor.shape)}"
            )
        if not np.isfinite(tensor.data).all():
            raise bad(f"input {tensor.name!r} holds NaN or infinite values")
        return np.ascontiguousarray(tensor.data, np.float32)

    def _images(self, tensor: Tensor) -> list[bytes]:
        # [N] as the metadata says, or [N, 1] as Triton's config (dims [1]) leads tools to send
        shape_ok = len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)
        if tensor.datatype != BYTES or not shape_ok or tensor.shape[0] < 1:
            raise bad(
                f"input {tensor.name!r} must be BYTES with shape [-1] (N >= 1 encoded images), "
                f"got {tensor.datatype} {list(tensor.shape)}"
            )
        images: list[bytes] = tensor.data.tolist()
        return images

    # -- outputs -------------------------------------------------------------------------------

    def conformal(self, parameters: dict[str, Any]) -> tuple[float, float] | None:
        """`parameters.coverage` and its recorded score threshold; None when not asked for."""
        coverage = parameters.get("coverage")
        if coverage is None:
            return None
        number = isinstance(coverage, int | float) and not isinstance(coverage, bool)
        if not number or not 0 < coverage < 1:
            raise bad(
                "parameters.coverage must be a number between 0 and 1, exclusive (e.g. 0.95), "
                f"not {orjson.dumps(coverage).decode()[:32]}"
            )
        try:
            return coverage, coverage_threshold(self.calibration, coverage)
        except InvalidParameter as exc:
            raise V2Error.from_blink(exc, "parameters.coverage: ") from exc

    def requested(
        self,
        outputs: list[RequestedOutput] | None,
        binary: bool,
        conformal: tuple[float, float] | None = None,
    ) -> list[RequestedOutput]:
        """The outputs to answer (all of them when none are named, and `prediction_set` when a
        coverage was asked for), checked before inference."""
        names = (*self.output_names, PREDICTION_SET) if conformal else self.output_names
        if outputs is None:
            return [RequestedOutput(name, binary) for name in names]
        for output in outputs:
            if output.name == PREDICTION_SET and not conformal:
                raise bad("output 'prediction_set' needs parameters.coverage")
            if output.name not in names:
                raise bad(f"unknown output {output.name!r}: outputs are {list(names)}")
            if output.name == PREDICTION_SET and output.classification:
                raise bad("output 'prediction_set' has no classification: it is the set itself")
        if conformal and all(output.name != PREDICTION_SET for output in outputs):
            return [*outputs, RequestedOutput(PREDICTION_SET, binary)]
        return outputs

    def outputs(
        self,
        logits: np.ndarray,
        requested: list[RequestedOutput],
        conformal: tuple[float, float] | None = None,
    ) -> list[OutputTensor]:
        logits = logits.astype(np.float32, copy=False)
        probabilities = None
        answers = []
        for output in requested:
            if output.name == PREDICTION_SET:
                assert conformal is not None  # requested() names it only with a coverage
                data = self._prediction_sets(logits, conformal)
                answers.append(OutputTensor(output.name, BYTES, data, output.binary))
                continue
            if output.classification:
                data = self._classification(logits, output.name, output.classification)
                answers.append(OutputTensor(output.name, BYTES, data, output.binary))
                continue
            if output.name == LOGITS or self.raw_probabilities:
                data = logits  # the model's own output, as it is
            else:
                if probabilities is None:
                    probabilities = calibrated_scores(
                        logits, probabilities=self.model_probabilities, temperature=self.temperature
                    ).astype(np.float32)
                data = probabilities
            answers.append(OutputTensor(output.name, "FP32", data, output.binary))
        return answers

    def _prediction_sets(self, logits: np.ndarray, conformal: tuple[float, float]) -> np.ndarray:
        """Each image's prediction set as the JSON object /classify answers, one BYTES each."""
        answer = np.empty(len(logits), dtype=object)
        for i, row in enumerate(logits):
            found = prediction_set(
                row,
                *conformal,
                self.labels,
                probabilities=self.model_probabilities,
                temperature=self.temperature,
            )
            answer[i] = orjson.dumps(found)
        return answer

    def _classification(self, logits: np.ndarray, name: str, k: int) -> np.ndarray:
        """Triton's classification extension: the top k as "score:index:label", best first.

        The ranking and the probabilities come from app.postprocess, as /classify's do, so
        both routes print the same scores; for `logits` the score is the logit itself.
        """
        k = min(k, len(self.labels))
        rows = []
        for row in logits:
            best = top_k(
                row,
                k,
                self.labels,
                probabilities=self.model_probabilities,
                temperature=self.temperature,
            )
            if name == PROBABILITIES:
                rows.append([f"{p['score']!r}:{p['index']}:{p['label']}".encode() for p in best])
            else:
                rows.append([f"{row[p['index']]}:{p['index']}:{p['label']}".encode() for p in best])
        answer = np.empty((len(rows), k), dtype=object)
        answer[:] = rows
        return answer

    # -- descriptions --------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        classes = len(self.labels)
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": [
                {
                    "name": self.tensor_input,
                    "datatype": "FP32",
                    "shape": [-1, *self.sample_shape],
                    "parameters": {"layout": self.layout},
                },
                {
                    "name": self.image_input,
                    "datatype": BYTES,
                    "shape": [-1],
                    "parameters": self._preprocessing(),
                },
            ],
            "outputs": [
                {"name": name, "datatype": "FP32", "shape": [-1, classes]}
                for name in self.output_names
            ]
            + self._set_metadata(),
        }

    def coverage_levels(self) -> list[str]:
        """The coverage levels the bundle recorded thresholds for (none: no prediction sets)."""
        thresholds = self.calibration.thresholds if self.calibration else {}
        return sorted(thresholds, key=float)

    def _set_metadata(self) -> list[dict[str, Any]]:
        """`prediction_set`, answered only when a request asks for a recorded coverage."""
        levels = self.coverage_levels()
        if not levels:
            return []
        parameters = {"needs": "parameters.coverage", "coverage_levels": ",".join(levels)}
        return [
            {"name": PREDICTION_SET, "datatype": BYTES, "shape": [-1], "parameters": parameters}
        ]

    def _preprocessing(self) -> dict[str, Any]:
        """How `image` inputs become the tensor input: the manifest's input description."""
        spec = self.input_spec
        return {
            "layout": spec.layout,
            "color": spec.color,
            "resize": spec.resize,
            "crop_fraction": spec.crop_fraction,
            "interpolation": spec.interpolation,
            "mean": orjson.dumps(spec.mean).decode(),
            "std": orjson.dumps(spec.std).decode(),
        }

    def _config(self, service: ModelService) -> dict[str, Any]:
        """Triton's model configuration, in its JSON form, so Triton tooling can read it."""
        settings, engine = service.settings, service.engine
        on_gpu = engine.provider != "CPUExecutionProvider"
        return {
            "name": self.name,
            "platform": PLATFORM,
            "backend": "onnxruntime",
            "version_policy": {"specific": {"versions": [self.version]}},
            "max_batch_size": self.max_batch_size,
            "input": [
                {
                    "name": self.tensor_input,
                    "data_type": "TYPE_FP32",
                    "format": f"FORMAT_{self.layout}",
                    "dims": list(self.sample_shape),
                    "optional": True,
                },
                {
                    "name": self.image_input,
                    "data_type": "TYPE_STRING",
                    "format": "FORMAT_NONE",
                    "dims": [1],
                    "reshape": {"shape": []},
                    "optional": True,
                },
            ],
            "output": [
                {"name": name, "data_type": "TYPE_FP32", "dims": [len(self.labels)]}
                for name in self.output_names
            ],
            "dynamic_batching": {
                "max_queue_delay_microseconds": round(settings.max_queue_delay_ms * 1000),
                "default_queue_policy": {
                    "timeout_action": "REJECT",
                    "default_timeout_microseconds": round(settings.request_timeout_ms * 1000),
                    "allow_timeout_override": True,
                    "max_queue_size": settings.queue_capacity,
                },
            },
            "instance_group": [
                {
                    "name": f"{self.name}_0",
                    "kind": "KIND_GPU" if on_gpu else "KIND_CPU",
                    "count": settings.engine_slots,
                }
            ],
            "parameters": {
                "variant": {"string_value": engine.variant},
                "execution_provider": {"string_value": engine.provider},
                "labels": {"string_value": orjson.dumps(self.labels).decode()},
                "output_kind": {"string_value": self.output_kind},
                "temperature": {"string_value": repr(self.temperature)},
                "coverage_levels": {"string_value": ",".join(self.coverage_levels())},
                **{
                    key: {"string_value": str(value)}
                    for key, value in self._preprocessing().items()
                },
            },
        }
