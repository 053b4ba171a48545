"""Small helpers over ``onnx.helper``: a graph builder whose weights go straight to external data.

Every initializer larger than :data:`INLINE_LIMIT` bytes is appended to one data file the moment
it is added (or chunk by chunk, see :meth:`GraphBuilder.streamed_initializer`), and the graph keeps
only a reference (location, offset, length). The model proto therefore stays small, and the whole
model never sits in memory: the exporter holds one layer's (or one expert's) tensors at a time.

The model is pinned to IR version 10 with opsets ai.onnx 17 and com.microsoft 1: ``make_model``
defaults to an IR version onnxruntime 1.31 refuses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixtral_quant.errors import IntegrityError

IR_VERSION = 10
OPSET = 17
MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
INLINE_LIMIT = 1024  # bytes: smaller initializers live inside model.onnx
PAGE_ALIGN = 4096  # tensors of at least ALIGN_THRESHOLD bytes start on a page, so they can be mmapped
ALIGN_THRESHOLD = 1 << 20

NP_TO_ONNX: dict[np.dtype[Any], int] = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}

Shape = Sequence[int | str | None]


def onnx_type(dtype: np.dtype[Any] | type) -> int:
    """The TensorProto element type of a numpy dtype."""
    return NP_TO_ONNX[np.dtype(dtype)]


class ExternalData:
    """An append-only data file; returns where each tensor's bytes landed.

    ``keep`` bytes of an interrupted export's file are reused: the export derives the same bytes
    again, and over that prefix they are compared with the file instead of written. A difference is
    an error, so a resumed export is byte for byte the uninterrupted one.
    """

    def __init__(self, path: Path, keep: int = 0) -> None:
        self.path = path
        self.keep = keep
        self.offset = 0
        if keep:
            self._file: BinaryIO = path.open("r+b")
            if self._file.seek(0, os.SEEK_END) < keep:
                self._file.close()
                raise IntegrityError(f"{path} is shorter than its run state says: start over with --overwrite")
            self._file.truncate(keep)
            self._file.seek(0)
        else:
            self._file = path.open("wb")

    def begin(self, nbytes: int) -> int:
        """Pad for alignment before a tensor of ``nbytes``; return its offset."""
        if nbytes >= ALIGN_THRESHOLD and self.offset % PAGE_ALIGN:
            self.write(b"\0" * (PAGE_ALIGN - self.offset % PAGE_ALIGN))
        return self.offset

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self.offset < self.keep:
            n = min(len(view), self.keep - self.offset)
            if self._file.read(n) != view[:n]:
                raise IntegrityError(
                    f"{self.path} differs from this export near byte {self.offset}: the interrupted run used "
                    "other weights or options; start over with --overwrite"
                )
            self.offset += n
            view = view[n:]
            if self.offset == self.keep:
                self._file.seek(self.keep)  # from reading back to appending
        if len(view):
            self._file.write(view)
            self.offset += len(view)

    def commit(self) -> int:
        """Flush to disk; the bytes so far survive a crash. Returns their count."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self.offset

    def close(self) -> None:
        self._file.close()


def external_tensor(
    name: str, elem_type: int, shape: Sequence[int], location: str, offset: int, length: int
) -> TensorProto:
    """A TensorProto whose data lives in ``location`` at ``offset`` (``length`` bytes)."""
    t = TensorProto()
    t.name = name
    t.data_type = elem_type
    t.dims.extend(shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


class GraphBuilder:
    """Nodes, inputs, outputs and initializers of one graph; weights written as they come."""

    def __init__(self, data: ExternalData, name: str = "main") -> None:
        self.data = data
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()  # every name handed out
        self._defined: set[str] = set()  # names some node produces (single assignment)
        self._counter = 0
        self._consts: dict[tuple[bytes, str, tuple[int, ...]], str] = {}
        self.scope = ""

    # Names --------------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A name not used yet, under the current scope (``/model/layers.3/attn/q_proj``)."""
        base = f"{self.scope}/{hint}" if self.scope else hint
        name = base
        while name in self._names:
            self._counter += 1
            name = f"{base}_{self._counter}"
        self._names.add(name)
        return name

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"graph name {name!r} is used twice")
        self._names.add(name)
        return name

    # Graph inputs and outputs ---------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(self._claim(name), elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Shape) -> str:
        """Expose ``value`` as graph output ``name`` (through an Identity if the names differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [self._claim(name)], name=f"{name}/Identity"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    # Nodes ----------------------------------------------------------------------------------------
    def node(
        self,
        op_type: str,
        inputs: Sequence[str],
        n_outputs: int = 1,
        domain: str = "",
        outputs: Sequence[str] | None = None,
        **attrs: Any,
    ) -> list[str]:
        """Add a node; return its output names. ``outputs`` may name them (fresh or graph-output names);
        ``""`` there leaves that output unused."""
        if outputs is None:
            outputs = [self.fresh(f"{op_type}/out{i}" if n_outputs > 1 else op_type) for i in range(n_outputs)]
        for o in outputs:
            if o in self._defined:
                raise ValueError(f"graph value {o!r} is produced twice")
            self._names.add(o)
            self._defined.add(o)
        self._defined.discard("")
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node_name = self.fresh(f"{op_type}/node")
        self.nodes.append(
            helper.make_node(op_type, list(inputs), list(outputs), name=node_name, domain=domain, **attrs)
        )
        return list(outputs)

    def op(self, op_type: str, *inputs: str, domain: str = "", **attrs: Any) -> str:
        """A single-output node."""
        return self.node(op_type, inputs, 1, domain, **attrs)[0]

    def ms(self, op_type: str, inputs: Sequence[str], n_outputs: int = 1, **attrs: Any) -> list[str]:
        """A com.microsoft contrib node."""
        return self.node(op_type, inputs, n_outputs, MS_DOMAIN, **attrs)

    # Initializers ---------------------------------------------------------------------------------
    def initializer(self, hint: str, array: np.ndarray) -> str:
        """A weight: inline when tiny, else appended to the external data file now."""
        array = np.ascontiguousarray(array)
        name = self.fresh(hint)
        if array.nbytes < INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        offset = self.data.begin(array.nbytes)
        self.data.write(array.data.cast("B"))
        self.initializers.append(
            external_tensor(name, onnx_type(array.dtype), array.shape, self.data.path.name, offset, array.nbytes)
        )
        return name

    def streamed_initializer(
        self, hint: str, dtype: np.dtype[Any] | type, shape: Sequence[int], chunks: Iterable[np.ndarray]
    ) -> str:
        """A weight written chunk by chunk along its first axis (one expert at a time)."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dt.itemsize
        name = self.fresh(hint)
        offset = self.data.begin(nbytes)
        for chunk in chunks:
            self.data.write(np.ascontiguousarray(chunk, dtype=dt).data.cast("B"))
        written = self.data.offset - offset
        if written != nbytes:
            raise ValueError(f"initializer {name}: chunks held {written} bytes, shape {list(shape)} needs {nbytes}")
        self.initializers.append(external_tensor(name, onnx_type(dt), shape, self.data.path.name, offset, nbytes))
        return name

    def const(self, values: Any, dtype: np.dtype[Any] | type, shape: Sequence[int] | None = None) -> str:
        """A small constant, shared when asked for twice."""
        arr = np.asarray(values, dtype=dtype)
        if shape is not None:
            arr = arr.reshape(shape)
        key = (arr.tobytes(), arr.dtype.str, arr.shape)
        if key not in self._consts:
            saved, self.scope = self.scope, "const"
            self._consts[key] = self.initializer("c", arr)
            self.scope = saved
        return self._consts[key]

    def i64(self, *values: int) -> str:
        """A 1-D int64 constant (axes, shapes, slice bounds)."""
        return self.const(list(values), np.int64)

    # Model ----------------------------------------------------------------------------------------
    def model(self, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, MS_OPSET)],
            ir_version=IR_VERSION,
            producer_name="mixtral-quant",
            doc_string=doc,
        )
        return model


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write the graph proto; its external tensors already sit in their data file."""
    path.write_bytes(model.SerializeToString())


def check_external_data(model_path: Path) -> None:
    """Refuse a model whose external-data references leave its folder or run past their file.

    Read before onnxruntime opens the model: a location is a path taken from the file, so
    ``../../secret`` or ``/etc/passwd`` would otherwise be read as weights.
    """
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError; anything unreadable is a damaged file
        raise IntegrityError(f"{model_path} is not a readable ONNX model ({type(e).__name__})") from None
    root = model_path.parent.resolve()
    sizes: dict[Path, int] = {}
    for t in _all_tensors(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or root not in target.parents:
            raise IntegrityError(f"{model_path.name}: tensor {t.name!r} points outside its folder ({location!r})")
        if target not in sizes:
            if not target.is_file():
                raise IntegrityError(f"{model_path.name}: tensor {t.name!r} needs {location}, which is missing")
            sizes[target] = target.stat().st_size
        try:
            offset, length = int(info.get("offset", "0")), int(info.get("length", "-1"))
        except ValueError:
            raise IntegrityError(f"{model_path.name}: tensor {t.name!r} has a bad offset or length") from None
        if offset < 0 or length < 0 or offset + length > sizes[target]:
            raise IntegrityError(
                f"{model_path.name}: tensor {t.name!r} reads bytes {offset}..{offset + length} of {location}, "
                f"which has {sizes[target]}"
            )


def _all_tensors(graph: onnx.GraphProto) -> Iterable[TensorProto]:
    """Initializers and tensor attributes of a graph and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)
