"""The public API of vitscope.methods is exactly its __all__, and importing it stays light."""

import subprocess
import sys

import vitscope.methods as methods

EXPECTED = {
    "ArtifactReport", "DistanceAccumulator", "attention_flow", "chefer_relevance", "cls_map", "dino_mask",
    "grad_rollout", "legrad", "mask_jaccard", "mean_attention_distance", "perturbation_auc", "pointing_game",
    "rollout", "rollout_matrix", "smooth", "token_norms", "upsample", "attn_gradcam", "probe_attention", "registry", "compute", "get_method", "maps", "method_names",
    "Features", "patch_features", "pca_rgb", "cosine_map",
}


def test_all_is_the_public_api():
    assert set(methods.__all__) == EXPECTED
    for name in methods.__all__:
        obj = getattr(methods, name)
        assert obj.__doc__ and len(obj.__doc__) > 40, name  # formula / paper / arguments documented


def test_heavy_dependencies_are_lazy():
    code = "import sys, vitscope.methods; print(sorted(m for m in ('scipy', 'matplotlib', 'transformers', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
