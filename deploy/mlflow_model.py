"""MLflow pyfunc model over an ONNX bundle (MLflow "models from code"; torch-free).

``mlflow.pyfunc.load_model("models:/gptflow-lm@champion").predict(["The market"])`` returns the
generated texts; a classifier bundle returns one ``{"label", "probs"}`` dict per input text.
Generation settings come through ``params`` (max_new_tokens, temperature, top_k, top_p, seed).
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

# Inference-time params (the logged signature declares them with these defaults; seed -1 = unseeded).
GENERATION_PARAMS = {
    "max_new_tokens": 64,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "seed": -1,
}


def _texts(model_input: Any) -> list[str]:
    """Accept a string, a list of strings, or a DataFrame (column ``prompt``/``text`` or the first)."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        cols = list(model_input.columns)
        col = next((c for c in ("prompt", "text") if c in cols), cols[0])
        return [str(v) for v in model_input[col].tolist()]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    return [str(v) for v in model_input]


class GptflowBundleModel(PythonModel):
    def load_context(self, context) -> None:
        from deploy.runtime import load_bundle

        self.model = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        texts = _texts(model_input)
        if hasattr(self.model, "classify"):
            return self.model.classify(texts)
        kw = {**GENERATION_PARAMS, **{k: v for k, v in (params or {}).items() if k in GENERATION_PARAMS}}
        if kw["seed"] is None or kw["seed"] < 0:
            kw["seed"] = None
        # Long generations slide the context window rather than fail: a served model should answer.
        return [g.text for g in self.model.generate(texts, context_policy="sliding", **kw)]


mlflow.models.set_model(GptflowBundleModel())
