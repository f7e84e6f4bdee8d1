"""The method contract: a frozen config dataclass plus one :class:`Method` object, behind one registry.

Follows torchao's pairing of a config with a registered handler. A method

* declares what data it needs (:class:`Needs`: nothing, unlabelled images, labelled batches),
* plans — ``plan(model, config, example_input, data=...) -> Plan`` — without touching the model,
* applies a plan in place — ``apply_(model, plan, init=..., data=...)`` —,
* contributes its command-line options (:class:`Option`, each mapped to a config field) and its default
  target (CC's is ``FLOPS=0.5``, the others ``RATIO=4``).

``data`` is always an iterable of ``(images, labels)`` batches (a ``torch.utils.data.DataLoader`` works);
the data-aware methods draw their calibration images from it with :func:`take_samples`.

A new method is one module under :mod:`compress.methods` that calls :func:`register` at import; a
third-party package adds one through the ``lowrank_deploy.methods`` entry-point group (see
:func:`compress.methods.load_methods`).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.plan import Plan
from compress.planning import FilterFn, apply_factorizations_
from compress.targets import TARGET_KINDS, Target
from lowrank_core.errors import UserInputError

__all__ = [
    "ENTRY_POINT_GROUP",
    "REGISTRY",
    "Batches",
    "CalibrationLoader",
    "Method",
    "Needs",
    "Option",
    "finite_float",
    "nonneg_int",
    "positive_int",
    "rebatch",
    "register",
    "take_samples",
]

ENTRY_POINT_GROUP = "lowrank_deploy.methods"
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class Needs(str, enum.Enum):
    """What a method needs besides the model."""

    NOTHING = "nothing"
    IMAGES = "images"  # unlabelled calibration images (labels in the batches are ignored)
    LABELLED = "labelled"  # (images, labels) batches: gradients or training


@dataclass(frozen=True)
class Option:
    """A command-line option a method takes, mapped onto its config.

    Attributes:
        flag: The option as typed, ``--rho``.
        field: The config field it sets (ignored when ``convert`` is given).
        help: One line for ``--help``.
        type: argparse ``type`` (a callable str → value).
        choices: Allowed values, if a closed set.
        convert: ``value → {field: value, …}`` when one option sets several fields (``--cc-mode``).
    """

    flag: str
    field: str
    help: str = ""
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    convert: Callable[[Any], dict[str, Any]] | None = None
    multiple: bool = False

    @property
    def dest(self) -> str:
        """The argparse destination: the flag without dashes (unique across methods)."""
        return "opt_" + self.flag.lstrip("-").replace("-", "_")

    def add_to(self, group: argparse._ArgumentGroup) -> None:
        """Add this option to an argparse group (default ``None`` = not given)."""
        kwargs: dict[str, Any] = {"dest": self.dest, "default": None, "help": self.help}
        if self.type is bool:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        elif self.multiple:
            kwargs.update(action="append", type=self.type, metavar=self.field.upper())
        else:
            kwargs.update(type=self.type, metavar=self.field.upper())
            if self.choices:
                kwargs["choices"] = self.choices
        group.add_argument(self.flag, **kwargs)

    def config_fields(self, value: Any) -> dict[str, Any]:
        """The config fields this option's ``value`` sets."""
        if self.multiple and isinstance(value, list):
            value = tuple(value)
        return self.convert(value) if self.convert is not None else {self.field: value}


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """Argument type: an integer ≥ 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    """Argument type: an integer ≥ 0."""
    return _int_at_least(text, 0, "an integer ≥ 0")


def finite_float(text: str) -> float:
    """Argument type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def round_to_type(text: str) -> int | str:
    """Argument type of ``--round-to``: ``auto`` or a positive integer."""
    return "auto" if text == "auto" else positive_int(text)


# Options several methods share: one object each, so the command line adds each flag once.
ROUND_TO = Option(
    "--round-to",
    "round_to",
    "round ranks (cc: kept channels too) to a multiple of N; auto (default) = the SIMD block of this CPU's "
    "ONNX Runtime conv kernels: 16 with AVX-512, else 8; 1 = the papers' exact counts",
    type=round_to_type,
)
MIN_RANK = Option("--min-rank", "min_rank", "smallest rank (default 8)", type=positive_int)
EXCLUDE = Option("--exclude", "exclude", "fnmatch pattern of layers to keep dense (repeatable)", multiple=True)
CALIBRATION_SAMPLES = Option(
    "--calibration-samples",
    "calibration_samples",
    "calibration images drawn from --data (lrsd default 256; cc: gradient images, default 512)",
    type=positive_int,
)


class Method(ABC):
    """One compression method: its config type, needs, options, default target, planner and applier.

    Subclasses set the class attributes and implement :meth:`plan`; the default :meth:`apply_` is the
    per-layer factorization of :func:`compress.planning.apply_factorizations_`, and the default
    :meth:`compress_` plans and then applies. Data-aware methods override :meth:`compress_`.

    Attributes:
        name: The ``METHOD=`` name.
        config_type: The frozen config dataclass.
        needs: What data the method uses (it must still run without it unless ``requires_data``).
        requires_data: Refuse to run without data.
        options: Command-line options beyond the target.
        default_target: The target used when the user gives none.
        summary: One line for listings.
        fixed: Config fields fixed by the name (``ljsvd`` → ``method="ljsvd"``).
    """

    name: str = ""
    config_type: type = object
    needs: Needs = Needs.NOTHING
    requires_data: bool = False
    options: tuple[Option, ...] = ()
    default_target: Target | None = Target("ratio", 4.0)
    summary: str = ""
    target_fields: tuple[str, ...] = ("ratio", "flops")

    def __init__(self, name: str | None = None, **fixed: Any) -> None:
        if name is not None:
            self.name = name
        if not self.name:
            raise ValueError(f"{type(self).__name__} has no name")
        self.fixed = dict(fixed)
        self.fields = {f.name for f in dataclasses.fields(self.config_type)} - set(self.fixed)

    def __repr__(self) -> str:
        return f"<method {self.name!r} ({type(self).__name__}, needs {self.needs.value})>"

    # ----------------------------------------------------------------------------------------- configs
    def make_config(self, target: Target | None = None, *, use_default_target: bool = True, **options: Any) -> Any:
        """Build this method's config from a target and options (``None`` values = the config's default).

        Args:
            target: What to reach; ``None`` = :attr:`default_target` (or, with ``use_default_target=False``,
                no target at all: the method's own knob decides).
            use_default_target: See ``target``.
            **options: Config fields (a command line passes every option; ``None`` = not given).

        Raises:
            UserInputError: an option the method does not take, or a target kind it cannot plan for.
        """
        given = {k: v for k, v in options.items() if v is not None}
        if given.get("round_to") == "auto":  # the command line's default: align to this CPU
            from compress.planning import cpu_rank_multiple

            given["round_to"] = cpu_rank_multiple()
        foreign = sorted(k for k in given if k not in self.fields)
        if foreign:
            flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
            raise UserInputError(
                f"method {self.name!r} does not take {flags}; drop it (see `python -m compress run --help`)"
            )
        if target is None and use_default_target:
            target = self.default_target
        if target is not None and target.kind not in self.target_fields:
            known = ", ".join(TARGET_KINDS[k][0] for k in self.target_fields)
            raise UserInputError(f"method {self.name!r} cannot plan for {target.text()}; give one of {known}")
        for kind in self.target_fields:
            if kind in self.fields:
                given[kind] = target.value if target is not None and kind == target.kind else None
        return self.config_type(**self.fixed, **given)

    def config_from_plan(self, plan: Plan) -> Any:
        """The config a plan was made with (its ``config`` record)."""
        data = {k: v for k, v in plan.config.items() if k in self.fields or k in self.fixed}
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return self.config_type(**{**data, **self.fixed})

    # ------------------------------------------------------------------------------------ the pipeline
    @abstractmethod
    def plan(
        self,
        model: nn.Module,
        config: Any,
        example_input: torch.Tensor,
        *,
        data: Batches | None = None,
        model_name: str = "model",
        filter_fn: FilterFn | None = None,
    ) -> Plan:
        """Decide, without changing ``model``, what each layer becomes."""

    def apply_(
        self, model: nn.Module, plan: Plan, *, init: str = "decompose", data: Batches | None = None
    ) -> nn.Module:
        """Replace every planned layer of ``model`` in place; return ``model`` (see :func:`compress.api.apply_plan_`)."""
        return apply_factorizations_(model, plan, init=init)

    def compress_(
        self,
        model: nn.Module,
        config: Any,
        example_input: torch.Tensor,
        *,
        data: Batches | None = None,
        model_name: str = "model",
        filter_fn: FilterFn | None = None,
    ) -> Plan:
        """Plan on the dense ``model`` and apply in place; return the plan."""
        plan = self.plan(model, config, example_input, data=data, model_name=model_name, filter_fn=filter_fn)
        self.apply_(model, plan, data=data)
        return plan

    def rebuild_(self, model: nn.Module, plan: Plan, *, data: Batches | None = None) -> nn.Module:
        """Apply a saved plan to a fresh dense model, filling the factors from its weights (``compress apply``)."""
        return self.apply_(model, plan, init="decompose", data=data)

    def training_tag(self, config: Any) -> str:
        """Suffix of the dense training folder when the method trains the dense model its own way (``""``: plain)."""
        return ""

    def train_dense(
        self,
        model: nn.Module,
        dataset: Any,
        train_config: Any,
        folder: Any,
        *,
        config: Any,
        meta: dict[str, Any],
        device: str = "auto",
    ) -> dict[str, Any] | None:
        """The method's own dense training stage (``vbmf-tucker2``: expanded orthogonal training), in place.

        Returns:
            The training record, or ``None`` when the method trains the dense model the ordinary way.
        """
        return None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under ``method.name``; return it.

    Raises:
        ValueError: the name is taken (a plug-in may not silently replace a method).
    """
    if method.name in REGISTRY:
        raise ValueError(
            f"method {method.name!r} is already registered by {type(REGISTRY[method.name]).__module__}; "
            "pick another name"
        )
    REGISTRY[method.name] = method
    return method


# ------------------------------------------------------------------------------------------ data helpers
def take_samples(data: Batches, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images (and labels) of ``data``, concatenated.

    Raises:
        UserInputError: ``data`` holds no images.
    """
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    count = 0
    for batch in data:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        x = torch.as_tensor(x)
        take = min(n - count, int(x.shape[0]))
        images.append(x[:take])
        if y is not None:
            labels.append(torch.as_tensor(y)[:take])
        count += take
        if count >= n:
            break
    if count == 0:
        raise UserInputError("the calibration data yielded no images; give a non-empty DataLoader or DATA=")
    y_all = torch.cat(labels) if len(labels) == len(images) else torch.empty(0, dtype=torch.long)
    return torch.cat(images), y_all


def rebatch(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` cut into batches of ``batch_size`` (the last may be smaller)."""
    n = int(images.shape[0])
    has_labels = labels.numel() == n
    return [
        (images[i : i + batch_size], labels[i : i + batch_size] if has_labels else labels)
        for i in range(0, n, batch_size)
    ]


class CalibrationLoader:
    """Un-augmented ``(images, labels)`` batches of ``split`` in the seeded calibration order (re-iterable).

    The first ``n`` images are exactly :func:`compress.data.calibration_subset` ``(split, n, seed)``, so a
    method taking ``n`` images from this loader sees the same sample whatever ``n`` is.
    """

    def __init__(self, split: Any, *, seed: int = 0, batch_size: int = 64) -> None:
        self.split, self.seed, self.batch_size = split, seed, batch_size

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from compress.data import calibration_subset

        sub = calibration_subset(self.split, len(self.split), seed=self.seed)
        for i in range(0, len(sub), self.batch_size):
            yield sub.batch(range(i, min(i + self.batch_size, len(sub))))
