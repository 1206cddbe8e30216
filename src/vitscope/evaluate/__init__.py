"""Which map to trust: the published faithfulness and localisation protocols as one command.

`evaluate` (``vitscope evaluate``) scores every registered method (and a random baseline) on a dataset by
Chefer et al.'s perturbation and segmentation tests, the pointing game, RISE deletion/insertion and Adebayo
et al.'s cascading-randomisation sanity check (`vitscope.evaluate.metrics`), with readers for
ImageNet-Segmentation, image + mask folders and COCO annotations (`vitscope.evaluate.datasets`).
"""

from vitscope.evaluate.core import EvaluationTable, aggregate, evaluate, evaluate_chunk, sanity_check

__all__ = ["EvaluationTable", "aggregate", "evaluate", "evaluate_chunk", "sanity_check"]
