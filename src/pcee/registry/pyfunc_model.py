"""The MLflow pyfunc model, logged as code (models-from-code): MLflow stores this file, and at
load time it is executed to build the model, which reads the ``bundle`` artifact (weights,
architecture config, reliability maps, policy and δ, FLOPs per exit) with ``ModelBundle.load``.

``predict`` takes images as a numpy array (N, C, H, W) or (N, C*H*W), or a DataFrame with
C*H*W numeric columns, and returns a DataFrame with prediction, exit, confidence,
expected_accuracy and flops per row, exactly what the library's early-exit runner computes, plus the
answer rule's columns as the HTTP service has them (answer mode ``abstain``, ρ from the bundle meta's
``answer_rule``; none -> ρ = 0): answered, abstained, answer_threshold
(:func:`pcee.inference.runner.answer_columns`, shared with the service).
"""

from __future__ import annotations

import mlflow.models
import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from pcee.bundle import ModelBundle
from pcee.selective import AnswerRule

OUTPUT_COLUMNS = ("prediction", "exit", "confidence", "expected_accuracy", "flops")
ANSWER_COLUMNS = ("answered", "abstained", "answer_threshold")


class PceeModel(PythonModel):
    # predict takes arrays of any (N, C, H, W) shape, which MLflow's type-hint schemas cannot express.
    # This is MLflow's (private) opt-out, the one its ChatModel uses; without it every load warns.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        self.bundle = ModelBundle.load(context.artifacts["bundle"])
        self.input_shape = tuple(int(v) for v in self.bundle.meta["input_shape"])
        self.runner = self.bundle.runner()
        self.answer_rule = AnswerRule.from_dict(self.bundle.meta.get("answer_rule"))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        x = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 2:
            x = x.reshape((x.shape[0], *self.input_shape))
        if x.shape[1:] != self.input_shape:
            raise ValueError(
                f"expected images of shape (N, {', '.join(map(str, self.input_shape))}) or flattened, got {x.shape}"
            )
        result = self.runner.run(x)
        answer = result.answer_columns(self.answer_rule.serving_threshold, "abstain")
        return pd.DataFrame(
            {
                **{name: np.asarray(getattr(result, name)) for name in OUTPUT_COLUMNS},
                **{name: answer[name] for name in ANSWER_COLUMNS},
            }
        )


mlflow.models.set_model(PceeModel())
