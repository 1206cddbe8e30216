"""Maps and measures computed from `Attentions` (or from a model and images, for gradient methods).

Maps come back as ``(batch, rows, cols)`` tensors on the patch grid (`upsample` brings them to the image);
each method is a pure function in its own module, whose docstring gives the formula and the paper.
"""

from vitscope.methods import registry
from vitscope.methods.api import compute, get_method, maps, method_names
from vitscope.methods.artifacts import ArtifactReport, token_norms
from vitscope.methods.attn_gradcam import attn_gradcam
from vitscope.methods.cls_attention import cls_map
from vitscope.methods.distance import DistanceAccumulator, mean_attention_distance
from vitscope.methods.features import Features, patch_features
from vitscope.methods.flow import attention_flow
from vitscope.methods.grad_rollout import grad_rollout
from vitscope.methods.legrad import legrad
from vitscope.methods.masks import dino_mask
from vitscope.methods.metrics import mask_jaccard, perturbation_auc, pointing_game
from vitscope.methods.pca import pca_rgb
from vitscope.methods.probe import probe_attention
from vitscope.methods.relevance import chefer_relevance
from vitscope.methods.rollout import rollout, rollout_matrix
from vitscope.methods.similarity import cosine_map
from vitscope.methods.smooth import smooth
from vitscope.methods.upsample import upsample

__all__ = [
    "ArtifactReport",
    "DistanceAccumulator",
    "Features",
    "attention_flow",
    "attn_gradcam",
    "chefer_relevance",
    "cls_map",
    "compute",
    "cosine_map",
    "dino_mask",
    "get_method",
    "grad_rollout",
    "legrad",
    "maps",
    "mask_jaccard",
    "mean_attention_distance",
    "method_names",
    "patch_features",
    "pca_rgb",
    "perturbation_auc",
    "pointing_game",
    "probe_attention",
    "registry",
    "rollout",
    "rollout_matrix",
    "smooth",
    "token_norms",
    "upsample",
]
