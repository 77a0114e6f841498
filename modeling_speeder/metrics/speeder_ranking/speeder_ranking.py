"""Speeder's ranking metrics as a local `evaluate` module: `evaluate.load(modeling_speeder.training.EVALUATE_MODULE)`.

predictions: per example, the candidates' scores; references: the target's position among them.
Returns HR@1/5/10, NDCG@5/10, MRR, ValidRatio and VHR@1 (ties count against the target).
"""

import datasets
import evaluate

from modeling_speeder.training import ranking_metrics

_DESCRIPTION = "Next-item ranking metrics over a candidate set: HR@k, NDCG@k, MRR, ValidRatio, VHR@1."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of lists of floats, the candidates' scores for each example.
    references: list of ints, the position of the target among the candidates.
    valid: optional list of bools, whether each answer was a valid catalog item (generative baselines).
Returns: dict with hr@1, hr@5, hr@10, ndcg@5, ndcg@10, mrr, valid_ratio, vhr@1.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SpeederRanking(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, valid=None):
        return ranking_metrics(predictions, references, valid=valid)
