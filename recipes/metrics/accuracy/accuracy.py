"""Accuracy: the fraction of predictions equal to their references (lomix's offline copy).

evaluate cannot fetch its hub metrics without the network, so lomix ships this module and loads it
by absolute path: ``evaluate.load("/abs/path/to/metrics/accuracy")``. One import per line: the
evaluate loader parses this file's imports.
"""

import datasets
import evaluate

_DESCRIPTION = "Accuracy = (number of predictions equal to their reference) / (number of predictions)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels (e.g. the index of the chosen answer).
    references (list of int): correct labels.
    sample_weight (list of float, optional): weight of each example; default equal weights.
Returns:
    accuracy (float): in [0, 1]; 0.0 for an empty input.
Example:
    >>> evaluate.load(path).compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        if sample_weight is None:
            sample_weight = [1.0] * len(predictions)
        total = float(sum(sample_weight))
        if total == 0:
            return {"accuracy": 0.0}
        hits = sum(w for p, r, w in zip(predictions, references, sample_weight, strict=True) if p == r)
        return {"accuracy": float(hits) / total}
