"""Argument groups of ``python -m compress``: model, target and method options (from the registry), data, training."""

from __future__ import annotations

import argparse
from typing import Any

from compress.methods import load_methods
from compress.methods.base import Option, nonneg_int, positive_int
from compress.targets import TARGET_KINDS, Target, parse_target
from lowrank_core.errors import UserInputError

__all__ = [
    "add_data_args",
    "add_method_args",
    "add_model_args",
    "add_train_args",
    "all_options",
    "config_from_args",
    "target_from_args",
    "train_config",
]


def _target_type(kind: str) -> Any:
    def parse(text: str) -> float:
        try:
            return parse_target(kind, text).value
        except UserInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = kind
    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights``, ``--num-classes``, ``--input-size``, ``--batch``, ``--seed``."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="torchvision model name, or path/to/file.py:function")
    g.add_argument(
        "--weights",
        default="auto",
        help="auto (pretrained if available, else random + warning) | imagenet | random | path to weights",
    )
    g.add_argument("--num-classes", type=positive_int, default=None, help="classes of a randomly initialised model")
    g.add_argument("--input-size", type=positive_int, default=None, help="square input size (default 224)")
    g.add_argument("--batch", type=positive_int, default=1, help="batch size recorded for export and timing")
    g.add_argument("--seed", type=int, default=0, help="seed of random initialisation and test inputs")


def all_options() -> list[Option]:
    """Every registered method's options, each flag once (methods share an option by sharing the object)."""
    seen: dict[str, Option] = {}
    for method in load_methods().values():
        for option in method.options:
            other = seen.setdefault(option.flag, option)
            if other is not option and other != option:
                raise UserInputError(
                    f"method {method.name!r} declares {option.flag} differently from another method; "
                    "share one Option object (compress.methods.base) or rename the flag"
                )
    return list(seen.values())


def add_method_args(p: argparse.ArgumentParser) -> None:
    """``--method``, one target, and every registered method's own options (grouped by method)."""
    methods = load_methods()
    g = p.add_argument_group("method and target")
    g.add_argument("--method", default="tucker2", help=" | ".join(sorted(methods)) + " (README lists every method)")
    for kind, (name, meaning) in TARGET_KINDS.items():
        g.add_argument(f"--{kind.replace('_', '-')}", type=_target_type(kind), default=None, help=f"{name}: {meaning}")
    g.add_argument(
        "--latency-threads",
        type=positive_int,
        default=1,
        help="SPEEDUP/LATENCY_MS: ONNX Runtime CPU threads the latency is predicted and measured with (default 1)",
    )
    g.add_argument(
        "--latency-precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="SPEEDUP/LATENCY_MS: time blocks and models in fp32 (default) or quantized to int8 as `export quantize` "
        "does (make export PRECISION=int8); the speedup is then over the dense model in the same precision",
    )
    g.add_argument("--no-ratio", action="store_true", help="no target: use the method's own knob (EVBMF's ω, …)")
    added: set[str] = set()
    for method in sorted(methods.values(), key=lambda m: (len(m.options) == 0, m.name)):
        fresh = [o for o in method.options if o.flag not in added]
        if not fresh:
            continue
        group = p.add_argument_group(f"{method.name}" + (f" ({method.summary})" if method.summary else ""))
        for option in fresh:
            option.add_to(group)
            added.add(option.flag)


def config_from_args(args: argparse.Namespace) -> Any:
    """The chosen method's config from parsed arguments; an option of another method is an error naming it."""
    from compress.methods import get_method
    from compress.methods.base import ROUND_TO

    method = get_method(args.method)
    target = target_from_args(args)
    if target is not None and args.no_ratio:
        raise UserInputError(f"give {target.text()} or --no-ratio, not both")
    declared = {o.flag for o in method.options}
    options: dict[str, Any] = {}
    for option in all_options():
        value = getattr(args, option.dest, None)
        if value is None:
            continue
        if option.flag not in declared:
            raise UserInputError(f"{option.flag} does not apply to --method {method.name}; drop it")
        options.update(option.config_fields(value))
    if ROUND_TO in method.options and "round_to" not in options:
        options["round_to"] = "auto"
    if target is not None and target.is_latency and target.kind not in method.target_fields:
        target = None  # compress.latency.solve bisects the method's own RATIO/FLOPS knob from its default
    return method.make_config(target, use_default_target=not args.no_ratio, **options)


def target_from_args(args: argparse.Namespace) -> Target | None:
    """The one target among ``--ratio``, ``--flops``, ``--speedup``, ``--latency-ms`` (two given is an error)."""
    return Target.from_options(**{kind: getattr(args, kind, None) for kind in TARGET_KINDS})


def add_train_args(p: argparse.ArgumentParser, *, epochs: int, lr: float | None, prefix: str = "") -> None:
    """Training hyper-parameters; ``prefix`` namespaces them (``--finetune-lr``) inside ``run``."""
    g = p.add_argument_group(f"{prefix or 'training'} options".strip())
    dash = f"--{prefix}-" if prefix else "--"
    dest = f"{prefix}_" if prefix else ""
    g.add_argument(
        f"{dash}epochs", dest=f"{dest}epochs", type=nonneg_int, default=epochs, help=f"epochs (default {epochs})"
    )
    g.add_argument(
        f"{dash}batch-size", dest=f"{dest}batch_size", type=positive_int, default=128, help="global batch size"
    )
    g.add_argument(f"{dash}optimizer", dest=f"{dest}optimizer", default="sgd", choices=("sgd", "adamw"))
    g.add_argument(
        f"{dash}lr", dest=f"{dest}lr", type=float, default=lr, help="peak learning rate (SGD 0.1, AdamW 1e-3)"
    )
    g.add_argument(f"{dash}weight-decay", dest=f"{dest}weight_decay", type=float, default=5e-4, help="not on BN (5e-4)")
    g.add_argument(f"{dash}schedule", dest=f"{dest}schedule", default="cosine", choices=("cosine", "step", "constant"))
    g.add_argument(
        f"{dash}milestones",
        dest=f"{dest}milestones",
        type=float,
        nargs="*",
        default=(),
        help="epochs of the step schedule",
    )
    g.add_argument(f"{dash}warmup-epochs", dest=f"{dest}warmup_epochs", type=float, default=0.0)
    g.add_argument(f"{dash}label-smoothing", dest=f"{dest}label_smoothing", type=float, default=0.0)
    g.add_argument(
        f"{dash}kd-alpha",
        dest=f"{dest}kd_alpha",
        type=float,
        default=0.0,
        help="weight of distillation from the dense model (0 = off; needs a teacher: finetune and run only)",
    )
    g.add_argument(f"{dash}kd-temperature", dest=f"{dest}kd_temperature", type=float, default=4.0)
    g.add_argument(f"{dash}clip-grad", dest=f"{dest}clip_grad", type=float, default=None, help="max gradient norm")
    g.add_argument(
        f"{dash}max-steps", dest=f"{dest}max_steps", type=positive_int, default=None, help="stop after N steps"
    )
    g.add_argument(f"{dash}workers", dest=f"{dest}workers", type=nonneg_int, default=0, help="data-loading processes")
    g.add_argument(f"{dash}no-amp", dest=f"{dest}no_amp", action="store_true", help="no autocast on CUDA")
    g.add_argument(f"{dash}channels-last", dest=f"{dest}channels_last", action="store_true")


def train_config(args: argparse.Namespace, prefix: str = "") -> Any:
    """The :class:`compress.train.TrainConfig` of parsed training options (``prefix``-namespaced in ``run``)."""
    from compress.train import TrainConfig

    def get(name: str) -> Any:
        return getattr(args, f"{prefix}_{name}" if prefix else name)

    return TrainConfig(
        epochs=get("epochs"),
        batch_size=get("batch_size"),
        optimizer=get("optimizer"),
        lr=get("lr"),
        weight_decay=get("weight_decay"),
        schedule=get("schedule"),
        milestones=tuple(get("milestones") or ()),
        warmup_epochs=get("warmup_epochs"),
        label_smoothing=get("label_smoothing"),
        kd_alpha=get("kd_alpha"),
        kd_temperature=get("kd_temperature"),
        clip_grad=get("clip_grad"),
        max_steps=get("max_steps"),
        num_workers=get("workers"),
        amp=not get("no_amp"),
        channels_last=get("channels_last"),
        seed=args.seed,
        eval_samples=args.eval_samples,
    )


def add_data_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--data`` and its sampling options."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=required,
        default=None,
        help="fashion-mnist (built in, Debian package dataset-fashion-mnist) or a folder: CIFAR-10/100 python "
        "batches, IDX files, or an ImageFolder tree with train/ and val/",
    )
    g.add_argument("--data-format", default=None, help="idx | cifar10 | cifar100 | imagefolder (default: detected)")
    g.add_argument(
        "--eval-samples",
        type=positive_int,
        default=None,
        help="evaluate on a fixed seeded subset of N test images (fast mode; default: the whole test split)",
    )
    g.add_argument(
        "--train-samples",
        type=positive_int,
        default=None,
        help="train on a fixed seeded subset of N training images (smoke runs; default: all)",
    )
    g.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")
