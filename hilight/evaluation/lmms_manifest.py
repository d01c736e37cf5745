"""lmms-eval's entry point for HiLight (``[project.entry-points."lmms_eval.models"]``): kept
import-light, since lmms-eval loads it whenever its model registry is built."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="hilight", simple_class_path="hilight.evaluation.lmms.HiLightLMMS")
