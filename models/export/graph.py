"""What an ONNX classifier's graph says about itself, and making a fixed batch dynamic.

`describe` reads the input and output tensors and guesses what the graph does not state (the
layout from where the 1 or 3 channels sit, logits vs probabilities from a final Softmax).
`dynamic_batch` rewrites a graph exported with a fixed batch size so that it accepts any: the
input and output batch dimensions become symbolic and Reshapes that hard-code the batch size
infer it instead. The caller must check the rewritten graph against the original
(`batch_rewrite_error`): a graph may hide the batch size where no rewrite can find it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

Dim = int | str | None  # a fixed size, a symbolic name, or unknown
BATCH = "batch"
# A rewritten graph must answer within this of the original (float32 rounding only).
REWRITE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: list[Dim]


@dataclass(frozen=True)
class GraphIO:
    inputs: list[Tensor]  # graph inputs that are not weights
    outputs: list[Tensor]
    softmax_outputs: frozenset[str]  # outputs produced by a Softmax node

    def output(self, name: str | None) -> Tensor:
        if name is None:
            return self.outputs[0]
        return next(o for o in self.outputs if o.name == name)


def dims_of(value: onnx.ValueInfoProto) -> list[Dim]:
    dims: list[Dim] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or None)
    return dims


def describe(model: onnx.ModelProto) -> GraphIO:
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    producers = {out: node.op_type for node in graph.node for out in node.output}
    return GraphIO(
        inputs=[Tensor(v.name, dims_of(v)) for v in graph.input if v.name not in weights],
        outputs=[Tensor(v.name, dims_of(v)) for v in graph.output],
        softmax_outputs=frozenset(
            v.name for v in graph.output if producers.get(v.name) == "Softmax"
        ),
    )


def guess_layout(dims: list[Dim]) -> str | None:
    """NCHW or NHWC from where a 1- or 3-channel axis sits; None when both or neither fit."""
    first, last = dims[1] in (1, 3), dims[3] in (1, 3)
    if first and not last:
        return "NCHW"
    if last and not first:
        return "NHWC"
    return None


def fixed_batch(dims: list[Dim]) -> int | None:
    return dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None


def dynamic_batch(model: onnx.ModelProto, batch: int) -> tuple[onnx.ModelProto, list[str]]:
    """A copy whose inputs and outputs take any batch size, and what was changed."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    changes = []
    weights = {init.name for init in graph.initializer}
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name in weights or not dims or not dims[0].HasField("dim_value"):
            continue
        if dims[0].dim_value == batch:
            dims[0].dim_param = BATCH  # replaces the fixed value (a oneof)
            changes.append(f"{value.name}: batch dimension {batch} -> {BATCH}")
    # Intermediate shapes recorded at export would now contradict the inputs; ORT re-infers them.
    del graph.value_info[:]
    constants = shape_constants(graph)
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        array = constants[node.input[1]]
        shape = numpy_helper.to_array(array).copy()
        if shape.ndim != 1 or len(shape) == 0 or shape[0] != batch:
            continue
        allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
        # -1 infers the batch when no other axis does; otherwise 0 copies the input's first axis
        if -1 not in shape[1:]:
            shape[0] = -1
        elif not allow_zero:
            shape[0] = 0
        else:
            continue
        array.CopyFrom(numpy_helper.from_array(shape, array.name))
        changes.append(f"Reshape {node.name or node.output[0]}: shape[0] {batch} -> {shape[0]}")
    return model, changes


def shape_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Constant int64 tensors a Reshape may read its shape from, used by one node only.

    A constant shared with other nodes is left alone: rewriting it would change them too.
    """
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    tensors = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    attribute.t.name = node.output[0]
                    tensors[node.output[0]] = attribute.t
    return {
        name: tensor
        for name, tensor in tensors.items()
        if tensor.data_type == onnx.TensorProto.INT64 and uses.get(name, 0) == 1
    }


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # failures are reported by the caller, in one line
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch_rewrite_error(
    original: Path, rewritten: Path, input_name: str, output_name: str, sample: tuple, batch: int
) -> str | None:
    """None when the rewritten graph, at batch 1 and 2, answers as the original does per image."""
    images = np.random.default_rng(0).normal(0, 1, (max(2, batch), *sample)).astype(np.float32)
    try:
        reference_session = session(original)
        if batch == 1:
            runs = [reference_session.run([output_name], {input_name: x[None]}) for x in images]
            reference = np.concatenate([r[0] for r in runs])
        else:
            (reference,) = reference_session.run([output_name], {input_name: images[:batch]})
        new = session(rewritten)
        for size in (1, 2):
            (answer,) = new.run([output_name], {input_name: images[:size]})
            difference = float(np.abs(answer - reference[:size]).max())
            if answer.shape[0] != size or not difference <= REWRITE_TOLERANCE:
                return f"at batch {size} it answers {answer.shape}, off by {difference:.2g}"
    except Exception as exc:  # ONNX Runtime raises its own types for graphs it cannot run
        return f"ONNX Runtime cannot run it: {str(exc).splitlines()[0][:200]}"
    return None
