"""The data-aware steps of a run: train the dense model, measure accuracy, fine-tune the compressed one.

These functions glue :mod:`compress.data`, :mod:`compress.models` and :mod:`compress.train` together for
the command line (``python -m compress train|finetune|eval`` and ``run --data``) and for benchmarks:

* :func:`prepare` loads a model and a dataset that fit each other (classes, channels, image size);
* :func:`train_model` trains into a folder that caches the result: ``checkpoint.pt`` (resumable),
  ``train_log.json``, ``model.safetensors`` and ``train.json``; re-running with the same settings
  resumes or returns at once, other settings in the same folder are an error, not a silent mix;
* :func:`finetune_run` fine-tunes a run directory's compressed model and records dense / raw /
  fine-tuned accuracy in its ``compress.json``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from compress.data import Dataset, load_data
from compress.models import LoadedModel, load_model
from compress.train import Accuracy, Regularizer, TrainConfig, Trainer, TrainResult, evaluate
from lowrank_core.errors import UserInputError
from lowrank_core.io import atomic_path, atomic_write_json, ensure_writable_dir, read_json
from lowrank_core.progress import heartbeat
from lowrank_core.rundir import CHECKPOINT, MODEL_WEIGHTS, RAW_WEIGHTS, TRAIN_JSON, CompressRecord

__all__ = ["Prepared", "evaluate_model", "finetune_run", "prepare", "train_model"]

WEIGHTS_FILE = MODEL_WEIGHTS
FINETUNE_DIR = "finetune"


@dataclass
class Prepared:
    """A model and a dataset that fit each other."""

    loaded: LoadedModel
    data: Dataset


def _is_zoo(spec: str) -> bool:
    from compress.zoo import is_zoo_spec

    return is_zoo_spec(spec)


def prepare(
    model: str,
    weights: str,
    data: str,
    *,
    data_format: str | None = None,
    image_size: int | None = None,
    seed: int = 0,
    train_samples: int | None = None,
) -> Prepared:
    """Load ``data`` and a ``model`` shaped for it.

    Zoo models (``cifar_resnet*``) take the data's channels, classes and image size. Other models keep
    their own input channels (1-channel data is replicated to 3) and get the data's class count.
    ``train_samples`` keeps a fixed seeded subset of the training split (smoke runs, tests).

    Raises:
        UserInputError: unknown model or data, classes that do not match given weights.
    """
    if _is_zoo(model):
        dataset = load_data(data, format=data_format, image_size=image_size)
        loaded = load_model(
            model,
            weights,
            num_classes=dataset.info.num_classes,
            input_size=dataset.info.image_size,
            in_channels=dataset.info.channels,
            seed=seed,
        )
    else:
        probe = load_data(data, format=data_format, image_size=image_size)
        loaded = load_model(
            model,
            weights,
            num_classes=probe.info.num_classes,
            input_size=image_size or probe.info.image_size,
            seed=seed,
        )
        channels = loaded.input_shape[0]
        dataset = (
            probe
            if channels == probe.info.channels
            else load_data(data, format=data_format, image_size=image_size, channels=channels)
        )
    if loaded.num_classes is not None and loaded.num_classes != dataset.info.num_classes:
        raise UserInputError(
            f"{model} has {loaded.num_classes} outputs but {dataset.info.name} has {dataset.info.num_classes} classes; "
            "pass weights trained on this dataset or WEIGHTS=random"
        )
    if train_samples is not None and train_samples < len(dataset.train):
        from compress.data import calibration_subset

        picked = calibration_subset(dataset.train, train_samples, seed=seed).indices
        dataset = Dataset(info=dataset.info, train=dataset.train.subset(picked), test=dataset.test)
    return Prepared(loaded=loaded, data=dataset)


def evaluate_model(model: nn.Module, data: Dataset, config: TrainConfig, device: str = "auto") -> Accuracy:
    """Accuracy of ``model`` on the test split (the config's fast subset mode applies)."""
    from compress.train import resolve_device

    dev = resolve_device(device)
    model.to(dev)
    try:
        with heartbeat(f"evaluating on {data.info.name} ({len(data.test)} test images)"):
            return evaluate(
                model, data.test, batch_size=config.eval_batch_size, max_samples=config.eval_samples, device=dev
            )
    finally:
        model.to("cpu")


def _settings(config: TrainConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What must match for a checkpoint folder to be reused (everything but the epoch count).

    ``meta["run_dir"]`` (fine-tuning) is left out: the checkpoint lives inside that run directory, which may
    be named relative to another working directory, or absolute, on resume.
    """
    config_dict = {k: v for k, v in config.to_dict().items() if k not in ("epochs",)}
    return {"config": config_dict, "meta": {k: v for k, v in meta.items() if k != "run_dir"}}


def train_model(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    meta: dict[str, Any],
    teacher: nn.Module | None = None,
    regularizers: tuple[Regularizer, ...] = (),
    device: str = "auto",
    resume: bool = True,
    progress: bool | None = None,
    label: str = "train",
) -> TrainResult:
    """Train ``model`` in place into ``out_dir`` (checkpoint, log, ``model.safetensors``, ``train.json``).

    With ``resume`` a checkpoint already in ``out_dir`` continues (or, when it has all epochs, returns at
    once): its settings must equal these, except that ``epochs`` may grow.

    Raises:
        UserInputError: ``out_dir`` holds a run with other settings or a corrupt checkpoint.
    """
    folder = ensure_writable_dir(out_dir)
    meta_json = json.loads(json.dumps(meta, default=str))
    summary_path = folder / TRAIN_JSON
    trainer = Trainer(
        model,
        config,
        data.train,
        data.test,
        out_dir=folder,
        teacher=teacher,
        regularizers=regularizers,
        device=device,
        meta=meta_json,
        progress=progress,
        label=label,
    )
    if (folder / CHECKPOINT).exists():
        if not resume:
            raise UserInputError(
                f"{folder} already holds a training run; resume it, pass --restart, or choose another --out"
            )
        from compress.train import load_checkpoint

        ckpt = load_checkpoint(folder / CHECKPOINT)
        old = TrainConfig.from_dict(json.loads(ckpt["config_json"]))
        if _settings(old, json.loads(ckpt["meta_json"])) != _settings(config, meta_json):
            raise UserInputError(
                f"{folder} holds a training run with other settings (see {folder / 'train_log.json'}); "
                "pass --restart to discard it, or choose another --out"
            )
        trainer.resume()
    result = trainer.fit()
    if trainer.dist.is_main:
        from safetensors.torch import save_model

        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_model(_unwrap(model).cpu(), str(tmp))
        atomic_write_json(
            summary_path,
            {
                "meta": meta_json,
                "data": data.info.to_dict(),
                "config": config.to_dict(),
                "result": result.to_dict(),
                "weights": str(folder / WEIGHTS_FILE),
            },
        )
    trainer.dist.barrier()
    return result


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def finetune_run(
    run_dir: str | os.PathLike[str],
    data: Dataset,
    config: TrainConfig,
    *,
    device: str = "auto",
    kd: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Fine-tune the compressed model of ``run_dir`` and record accuracy in its ``compress.json``.

    The raw compressed weights are kept once as ``model.raw.safetensors``; ``model.safetensors`` becomes
    the fine-tuned model, so the export and runtime stages use it. ``compress.json`` gains
    ``accuracy = {"dense", "raw", "finetuned", ...}`` (each with top-1, n, 95 % interval).

    Returns:
        The ``accuracy`` record.
    """
    from safetensors.torch import load_model as load_weights
    from safetensors.torch import save_model

    from compress.artifacts import INFO_FILE, load_run

    folder = Path(run_dir)
    run = load_run(folder)
    raw_path = folder / RAW_WEIGHTS
    if raw_path.is_file():  # a second fine-tune starts again from the raw weights, not from the last result
        load_weights(run.compressed, str(raw_path))
    info = run.info
    accuracy = dict(info.get("accuracy") or {})
    same_eval = (accuracy.get("data") or {}).get("name") == data.info.name and accuracy.get(
        "eval_samples"
    ) == config.eval_samples
    if not same_eval:  # measured on other data or another subset: measure both again
        accuracy = {"data": data.info.to_dict(), "eval_samples": config.eval_samples}
    if not accuracy.get("dense"):
        accuracy["dense"] = evaluate_model(run.dense, data, config, device).to_dict()
    if not accuracy.get("raw"):
        accuracy["raw"] = evaluate_model(run.compressed, data, config, device).to_dict()
    meta = {
        "model_spec": info.get("model_spec"),
        "plan": run.plan.to_dict(),  # the checkpoint alone rebuilds the architecture (apply_plan_ on the base model)
        "run_dir": str(folder),
        "data": data.info.name,
        "train_samples": len(data.train),
    }
    teacher = copy.deepcopy(run.dense) if kd else None
    stages = int(run.plan.config.get("stages", 1) or 1)
    t0 = time.perf_counter()
    stage_records: list[dict[str, Any]] = []
    if stages > 1:
        model, result, stage_records = _finetune_in_stages(
            run.dense, run.plan, stages, data, config, folder, meta, teacher, device, progress
        )
    else:
        model = run.compressed
        result = train_model(
            model,
            data,
            config,
            folder / FINETUNE_DIR,
            meta=meta,
            teacher=teacher,
            device=device,
            resume=True,
            progress=progress,
            label="finetune",
        )
    wall = time.perf_counter() - t0
    compressed = _unwrap(model).cpu().eval()
    accuracy["finetuned"] = (
        result.final.to_dict()
        if result.final is not None
        else evaluate_model(compressed, data, config, device).to_dict()
    )
    accuracy["eval_samples"] = config.eval_samples
    accuracy["finetune"] = {
        "epochs": config.epochs,
        "steps": result.steps,
        "wall_s": wall,
        "kd": kd,
        "config": config.to_dict(),
    }
    if stage_records:
        accuracy["finetune"]["stages"] = stage_records
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        if not raw_path.is_file():
            with atomic_path(raw_path) as tmp:
                shutil.copyfile(folder / MODEL_WEIGHTS, tmp)
        with atomic_path(folder / MODEL_WEIGHTS) as tmp:
            save_model(compressed, str(tmp))
        info["accuracy"] = accuracy
        from lowrank_core.integrity import DIGESTS, file_digests

        if DIGESTS in info:  # the fine-tuned weights are what later stages must find
            info[DIGESTS] = file_digests(folder, info[DIGESTS])
        CompressRecord.from_dict(info).write(folder / INFO_FILE)
    return accuracy


def _finetune_in_stages(
    dense: nn.Module,
    plan: Any,
    stages: int,
    data: Dataset,
    config: TrainConfig,
    folder: Path,
    meta: dict[str, Any],
    teacher: nn.Module | None,
    device: str,
    progress: bool | None,
) -> tuple[nn.Module, Any, list[dict[str, Any]]]:
    """MUSCO-style multi-stage compression: factorize one group of layers, fine-tune, continue.

    The plan's factorized layers are split into ``stages`` contiguous groups (module order). Stage k
    decomposes group k from the *current* (already fine-tuned) weights with the planned ranks, then
    fine-tunes for an equal share of the one-shot run's optimizer steps, so the total budget equals
    one-shot fine-tuning with ``config``. Each stage trains in its own resumable folder.
    """
    import math

    from compress.api import apply_plan_
    from compress.plan import KEEP, Plan

    entries = plan.factorized_layers
    size = math.ceil(len(entries) / stages)
    groups = [entries[i : i + size] for i in range(0, len(entries), size)]
    steps_per_epoch = len(data.train) // config.batch_size or 1
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    share = max(1, total_steps // len(groups))
    model = copy.deepcopy(dense)
    records: list[dict[str, Any]] = []
    result = None
    for k, group in enumerate(groups, start=1):
        chosen = {e.path for e in group}
        sub = Plan.from_dict(plan.to_dict())
        for entry in sub.layers:
            if entry.path not in chosen:
                entry.action, entry.ranks = KEEP, None
        apply_plan_(model, sub)
        stage_config = TrainConfig.from_dict({**config.to_dict(), "max_steps": share})
        raw = evaluate_model(model, data, config, device)
        result = train_model(
            model,
            data,
            stage_config,
            folder / f"{FINETUNE_DIR}-stage{k}",
            meta={**meta, "stage": k, "stage_layers": sorted(chosen)},
            teacher=teacher,
            device=device,
            resume=True,
            progress=progress,
            label=f"finetune stage {k}",
        )
        model = _unwrap(model)
        after = (
            result.final.to_dict()
            if result.final is not None
            else evaluate_model(model, data, config, device).to_dict()
        )
        records.append(
            {"stage": k, "layers": len(group), "steps": result.steps, "raw": raw.to_dict(), "finetuned": after}
        )
    return model, result, records


def read_train_summary(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``train.json`` of a training folder."""
    return read_json(Path(folder) / TRAIN_JSON, what="training summary")
