"""Exact match: the fraction of generated strings equal to their references (lomix's offline copy).

Both strings are compared after stripping surrounding whitespace, optionally case-folded. Loaded by
absolute path like lomix's accuracy module. One import per line (the evaluate loader parses them).
"""

import datasets
import evaluate

_DESCRIPTION = "Exact match = (number of predictions equal to their reference) / (number of predictions)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers.
    ignore_case (bool, optional): compare case-folded strings; default False.
Returns:
    exact_match (float): in [0, 1]; 0.0 for an empty input.
Example:
    >>> evaluate.load(path).compute(predictions=[" three", "4"], references=["three", "four"])
    {'exact_match': 0.5}
"""


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=False):
        if not predictions:
            return {"exact_match": 0.0}

        def norm(text):
            text = text.strip()
            return text.casefold() if ignore_case else text

        hits = sum(1 for p, r in zip(predictions, references, strict=True) if norm(p) == norm(r))
        return {"exact_match": hits / len(predictions)}
