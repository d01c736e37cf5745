"""Auxiliary objectives: an extra loss that a training stage adds beside its own.

Generic training knows nothing about what an objective predicts; a recipe that has more
supervision than text (the billiards recipe knows where every ball is in every frame) supplies
one as a class named in the config (``auxiliary.objective = "package.module:Class"``). The
class is an ``nn.Module`` (its head trains with the stage and is saved in its checkpoints) with:

Alignment (:func:`hilight.training.align.align`), built as
``Class(train_records, val_records, tower, video_cfg)`` from the caption records:

- ``targets(records) -> dict[str, Tensor]``: a batch's targets;
- ``loss(outputs: VisualOutputs, targets) -> Tensor``.

VLM stages (:func:`hilight.training.vlm.train`), built as
``Class(files, video_dir, model_config)`` from ``auxiliary.data``:

- ``targets(videos) -> dict[str, Tensor] | None``: a batch's targets (None: some video has none);
- ``missing(videos) -> list[Path]``: the training videos it has no targets for (an error);
- ``loss(video_embeds [V, T*Q, D], targets) -> Tensor``;
- ``save(directory)`` / ``load(directory) -> bool``: hand the head on to the next stage.
"""

from __future__ import annotations

import importlib

from hilight.errors import ConfigError


def objective_class(spec: str) -> type:
    """The class named ``module:Class``."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"auxiliary.objective {spec!r}: expected 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"auxiliary.objective {spec!r}: cannot import {module_name} ({exc})") from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"auxiliary.objective {spec!r}: {module_name} has no class {name}")
    return cls
