"""The run directory: the contract between the compress, export and runtime stages.

``OUT/<model>/<method>/`` holds, from this stage:

* ``plan.json`` — the plan (:class:`compress.plan.Plan`), enough to rebuild the architecture;
* ``dense.safetensors`` / ``model.safetensors`` — dense and compressed weights (never a pickled module);
* ``compress.json`` — what the later stages and the report read: model spec, weights source and
  warning, input shape, params/MACs before and after, output agreement, wall times.

:func:`load_run` rebuilds both models from these files alone.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from compress.api import apply_plan_
from compress.models import has_aux_classifier, load_model
from compress.plan import Plan
from lowrank_core.checks import check_finite_module
from lowrank_core.errors import UserInputError
from lowrank_core.integrity import DIGESTS, file_digests
from lowrank_core.io import atomic_path, ensure_writable_dir, read_json
from lowrank_core.rundir import COMPRESS_JSON, DENSE_WEIGHTS, MODEL_WEIGHTS, PLAN_JSON, CompressRecord

__all__ = ["RunArtifacts", "load_run", "save_run"]

# File names of the run directory, defined once in lowrank_core.rundir.
PLAN_FILE = PLAN_JSON
INFO_FILE = COMPRESS_JSON


@dataclass
class RunArtifacts:
    """Both models of a run, rebuilt from its directory."""

    run_dir: Path
    info: dict[str, Any]
    plan: Plan
    dense: nn.Module
    compressed: nn.Module

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Input shape the run was planned with (batch first)."""
        return tuple(int(v) for v in self.info["input_shape"])


def save_run(
    run_dir: str | os.PathLike[str],
    *,
    info: dict[str, Any] | CompressRecord,
    plan: Plan,
    dense: nn.Module,
    compressed: nn.Module,
) -> Path:
    """Write plan, weights and ``compress.json`` (a :class:`~lowrank_core.rundir.CompressRecord`) into ``run_dir``.

    Every file is written atomically; a dict ``info`` is validated as a ``CompressRecord`` first.
    """
    from safetensors.torch import save_model

    folder = ensure_writable_dir(run_dir)
    with atomic_path(folder / DENSE_WEIGHTS) as tmp:
        save_model(dense, str(tmp))
    with atomic_path(folder / MODEL_WEIGHTS) as tmp:
        # save_model de-duplicates tensors shared between modules (joint factors are stored once).
        save_model(compressed, str(tmp))
    plan.save(folder / PLAN_FILE)
    record = info if isinstance(info, CompressRecord) else CompressRecord.from_dict(info)
    record.extra[DIGESTS] = file_digests(folder, (PLAN_FILE, DENSE_WEIGHTS, MODEL_WEIGHTS))  # what later stages check
    record.write(folder / INFO_FILE)
    return folder


def _saved_aux_classifier(path: Path) -> bool:
    """Whether the weights file holds a segmentation model's ``aux_classifier`` (read from its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return has_aux_classifier(dict.fromkeys(f.keys()))
    except Exception:  # a corrupt file is reported by the weight loading below
        return False


def load_run(run_dir: str | os.PathLike[str]) -> RunArtifacts:
    """Rebuild the dense and compressed models of a run directory (eval mode, float32, CPU).

    Raises:
        UserInputError: the directory or one of its files is missing or corrupt.
    """
    from safetensors.torch import load_model as load_weights

    folder = Path(run_dir)
    if not folder.is_dir():
        raise UserInputError(f"run directory {str(folder)!r} does not exist; run `python -m compress run` first")
    info = read_json(folder / INFO_FILE, what="compress stage record")
    plan = Plan.load(folder / PLAN_FILE)
    for name in (DENSE_WEIGHTS, MODEL_WEIGHTS):
        if not (folder / name).is_file():
            raise UserInputError(f"{folder / name} is missing; re-run `python -m compress run`")
    try:
        spec = info["model_spec"]
        size = int(info["input_shape"][-1])
        num_classes = info.get("num_classes")
    except (KeyError, TypeError, IndexError, ValueError):
        raise UserInputError(f"{folder / INFO_FILE} lacks model_spec/input_shape; re-run the compress stage") from None
    channels = int(info["input_shape"][1]) if len(info["input_shape"]) == 4 else None
    aux = _saved_aux_classifier(folder / DENSE_WEIGHTS) or None  # a segmentation model loaded with its aux head
    base = load_model(
        spec, "random", num_classes=num_classes, input_size=size, in_channels=channels, aux_loss=aux
    ).model
    dense = base
    compressed = apply_plan_(copy.deepcopy(base), plan, init="empty")
    for model, name in ((dense, DENSE_WEIGHTS), (compressed, MODEL_WEIGHTS)):
        try:
            missing, unexpected = load_weights(model, str(folder / name), strict=False)
        except Exception as exc:  # safetensors raises several types on corrupt files
            raise UserInputError(
                f"{folder / name} is corrupt ({type(exc).__name__}); re-run the compress stage"
            ) from None
        if missing or unexpected:
            raise UserInputError(
                f"{folder / name} does not match the plan ({len(missing)} missing, {len(unexpected)} unexpected tensors); "
                "re-run the compress stage"
            )
        check_finite_module(model, str(folder / name))
        model.eval()
    return RunArtifacts(run_dir=folder, info=info, plan=plan, dense=dense, compressed=compressed)
