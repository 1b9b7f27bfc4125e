"""Write a Triton Inference Server model repository for a bundle's ONNX graph (onnxruntime backend).

    repo/<name>/config.pbtxt          inputs and outputs read from the graph itself
    repo/<name>/1/model.onnx          the graph (plus its external data file, if any)
    repo/<name>/1/tokenizer.model     the bundle's tokenizer and config.json, for clients
    repo/<name>/1/config.json

Triton (or KServe with the Triton runtime) runs one forward pass per request; the generation loop
(KV cache in, present out, sampling) stays with the client, as in ``deploy/runtime.py``. The batch
dimension is part of every shape (``max_batch_size: 0``): Triton's dynamic batcher cannot merge
requests whose caches have different lengths.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from gpt.bundle import CONFIG_FILE, GENAI_CONFIG_FILE, ONNX_FILE, TOKENIZER_FILE

# ONNX element type -> Triton data type
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}
BUNDLE_FILES = (TOKENIZER_FILE, CONFIG_FILE, GENAI_CONFIG_FILE)


def graph_io(model_path: Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of an ONNX graph: name, Triton data type and dims (-1 where dynamic)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            if t.elem_type not in _TRITON_TYPES:
                raise ValueError(
                    f"{model_path}: {v.name} has ONNX element type {t.elem_type}, unknown to Triton"
                )
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append({"name": v.name, "data_type": _TRITON_TYPES[t.elem_type], "dims": dims})
        return out

    return describe(graph.input), describe(graph.output)


def config_pbtxt(name: str, inputs: list[dict], outputs: list[dict], kind: str = "KIND_CPU") -> str:
    def block(entries: list[dict]) -> str:
        items = [
            "  {\n"
            f'    name: "{e["name"]}"\n'
            f"    data_type: {e['data_type']}\n"
            f"    dims: [ {', '.join(str(d) for d in e['dims'])} ]\n"
            "  }"
            for e in entries
        ]
        return "[\n" + ",\n".join(items) + "\n]"

    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        "max_batch_size: 0\n"
        f"input {block(inputs)}\n"
        f"output {block(outputs)}\n"
        f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"
    )


def write_triton_repo(
    bundle: str | Path, repo: str | Path, name: str | None = None, version: int = 1
) -> Path:
    """Add ``bundle``'s graph to the Triton model repository ``repo`` as model ``name``; returns its directory."""
    bundle, repo = Path(bundle), Path(repo)
    graph = bundle / ONNX_FILE
    if not graph.is_file():
        raise FileNotFoundError(
            f"{graph} not found: {bundle} is not an exported bundle (run `gptflow export`)"
        )
    name = name or bundle.resolve().name
    inputs, outputs = graph_io(graph)
    model_dir = repo / name
    version_dir = model_dir / str(version)
    if version_dir.exists():
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    for path in bundle.iterdir():  # the graph and its external data files, if any
        if path.name.startswith(ONNX_FILE) or path.name in BUNDLE_FILES:
            shutil.copyfile(path, version_dir / path.name)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, inputs, outputs), encoding="utf-8")
    return model_dir
