"""Training, fine-tuning, checkpoints and DDP on real Fashion-MNIST subsets (seconds each)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_core.errors import UserInputError

ROOT = Path(__file__).resolve().parents[2]
FMNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (make data installs the Debian package dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def fmnist():
    from compress.data import load_data

    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (make data installs dataset-fashion-mnist)")
    return load_data("fashion-mnist")


def _subsets(data, n_train: int, n_test: int):
    from compress.data import calibration_subset

    train_idx = calibration_subset(data.train, n_train, seed=1).indices
    return data.train.subset(train_idx), calibration_subset(data.test, n_test, seed=2)


def _small_resnet(seed: int = 0) -> nn.Module:
    from compress.zoo import create_model

    torch.manual_seed(seed)
    return create_model("cifar_resnet20", num_classes=10, in_channels=1, width=0.5)


class NoBatchNormNet(nn.Module):
    """BN-free CNN: DDP with per-rank batches must give exactly the single-process model."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.norm = nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.features(x)).mean((2, 3)))


# ------------------------------------------------------------------------------------------ config
def test_cosine_schedule_endpoints_and_warmup():
    from compress.train import TrainConfig

    c = TrainConfig(epochs=10, lr=0.1, warmup_epochs=1)
    assert c.lr_at(0, 100) == pytest.approx(0.1 / 100)
    assert c.lr_at(99, 100) == pytest.approx(0.1)
    assert c.lr_at(100, 100) == pytest.approx(0.1)  # cosine starts at the peak after warm-up
    assert c.lr_at(550, 100) == pytest.approx(0.05, rel=1e-9)  # half-way through the cosine part
    assert c.lr_at(999, 100) < 1e-4


def test_step_schedule_default_milestones():
    from compress.train import TrainConfig

    c = TrainConfig(epochs=8, lr=0.1, schedule="step")
    assert [c.lr_at(e * 10, 10) for e in (0, 3, 4, 5, 6, 7)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"schedule": "poly"}, "unknown schedule"),
        ({"lr": -1.0}, "learning rate"),
        ({"label_smoothing": 1.0}, "label smoothing"),
        ({"batch_size": 0}, "batch size"),
    ],
)
def test_bad_config_is_a_one_line_error(kwargs, message):
    from compress.train import TrainConfig

    with pytest.raises(UserInputError, match=message):
        TrainConfig(**kwargs)


def test_weight_decay_skips_batchnorm_only():
    from compress.train import parameter_groups

    model = _small_resnet()
    decay, no_decay = parameter_groups(model, 5e-4)
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == bn_params
    assert decay["weight_decay"] == 5e-4
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert id(model.fc.bias) in {id(p) for p in decay["params"]}  # FC bias is decayed (paper convention)


def test_wilson_interval_closed_form():
    from compress.train import wilson_interval

    lo, hi = wilson_interval(50, 100)
    half = 1.959963984540054 * math.sqrt(0.25 / 100 + 1.959963984540054**2 / 40000) / (1 + 1.959963984540054**2 / 100)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------ real data
@needs_fmnist
def test_forty_steps_learn_far_above_chance(fmnist):
    from compress.train import TrainConfig, Trainer, evaluate

    train, test = _subsets(fmnist, 2560, 1000)
    model = _small_resnet()
    before = evaluate(model, test)
    config = TrainConfig(epochs=1, batch_size=64, lr=0.1, max_steps=40)
    result = Trainer(model, config, train, test, device="cpu", progress=False).fit()
    after = result.final
    assert result.steps == 40
    assert after is not None
    assert after.n == 1000
    assert before.top1 < 0.3  # an untrained net is near chance (10 classes)
    assert after.top1 > 0.6, f"40 SGD steps on 2560 images reached only {after}"
    assert after.ci95[0] < after.top1 < after.ci95[1]


@needs_fmnist
def test_finetuning_a_compressed_model_does_not_lower_its_accuracy(fmnist):
    from compress.api import compress_, method_config
    from compress.train import TrainConfig, Trainer, evaluate

    train, test = _subsets(fmnist, 3840, 1000)
    model = _small_resnet()
    Trainer(model, TrainConfig(epochs=1, batch_size=64, lr=0.1), train, device="cpu", progress=False).fit()
    dense = evaluate(model, test)
    compressed = copy.deepcopy(model).eval()
    config = method_config("tucker2", ratio=3.0, round_to=1, min_rank=1)
    compress_(compressed, config, torch.randn(1, 1, 28, 28))
    raw = evaluate(compressed, test)
    ft = TrainConfig(epochs=1, batch_size=64, lr=0.01, max_steps=30)
    result = Trainer(compressed, ft, train, test, device="cpu", progress=False).fit()
    assert result.final is not None
    assert raw.top1 < dense.top1  # ratio 3 is lossy here, so fine-tuning has something to recover
    assert result.final.top1 >= raw.top1, f"fine-tuning lowered accuracy: raw {raw}, fine-tuned {result.final}"


@needs_fmnist
def test_distillation_term_is_logged_and_needs_a_teacher(fmnist):
    from compress.train import TrainConfig, Trainer

    train, _ = _subsets(fmnist, 256, 100)
    config = TrainConfig(epochs=1, batch_size=64, lr=0.01, kd_alpha=0.5, max_steps=2)
    with pytest.raises(UserInputError, match="teacher"):
        Trainer(_small_resnet(), config, train, device="cpu")
    teacher = _small_resnet(seed=1)
    result = Trainer(_small_resnet(), config, train, teacher=teacher, device="cpu", progress=False).fit()
    terms = result.history[0]["terms"]
    assert terms["kd"] > 0
    assert terms["task"] > 0


@needs_fmnist
def test_checkpoint_resumes_to_the_same_losses(fmnist, tmp_path):
    from compress.train import TrainConfig, Trainer

    train, test = _subsets(fmnist, 512, 200)
    config = TrainConfig(epochs=2, batch_size=64, lr=0.05)

    straight = Trainer(_small_resnet(), config, train, test, device="cpu", progress=False).fit()

    first = Trainer(_small_resnet(), config, train, test, out_dir=tmp_path, device="cpu", progress=False)
    first.config = TrainConfig(epochs=2, batch_size=64, lr=0.05, max_steps=len(first.loader))  # "killed" after epoch 1
    first.fit()
    assert json.loads((tmp_path / "train_log.json").read_text())["epochs"][0]["epoch"] == 1

    resumed_model = _small_resnet(seed=7)  # different init: everything must come from the checkpoint
    second = Trainer(resumed_model, config, train, test, out_dir=tmp_path, device="cpu", progress=False)
    assert second.resume()
    result = second.fit()
    assert result.resumed_from_epoch == 1
    assert len(result.history) == 2
    for a, b in zip(straight.history, result.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["test"]["top1"] == pytest.approx(a["test"]["top1"], abs=1e-9)


def test_corrupt_and_foreign_checkpoints_are_one_line_errors(tmp_path):
    from compress.train import load_checkpoint

    truncated = tmp_path / "checkpoint.pt"
    torch.save({"format": "lowrank-deploy-checkpoint/1", "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(UserInputError, match="corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserInputError, match="not a lowrank-deploy training checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(UserInputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserInputError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    from compress.train import load_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"format": "lowrank-deploy-checkpoint/1", "obj": NoBatchNormNet()}, path)  # a pickled module
    with pytest.raises(UserInputError, match="weights-only"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------ DDP
DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    from compress.data import load_data, calibration_subset
    from compress.train import TrainConfig, Trainer
    from tests.compress.test_compress_train import NoBatchNormNet
    torch.manual_seed(0)
    data = load_data("fashion-mnist")
    train = data.train.subset(calibration_subset(data.train, 512, seed=1).indices)
    model = NoBatchNormNet()
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_steps=6)
    trainer = Trainer(model, config, train, device="cpu", progress=False)
    result = trainer.fit()
    if trainer.dist.is_main:
        torch.save({{k: v.clone() for k, v in model.state_dict().items()}}, sys.argv[1])
        print("loss", result.history[0]["loss"], "world", trainer.dist.world_size)
    """
)


@needs_fmnist
def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.pt")], env=env, capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(script), str(tmp_path / "two.pt"),
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "world 2" in ddp.stdout
    assert "world 1" in single.stdout
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    torch.manual_seed(0)
    start = NoBatchNormNet().state_dict()  # the scripts' initial weights
    for key in one:
        assert not torch.equal(one[key], start[key]), f"{key} did not train"
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{key} differs between 1 and 2 ranks")


@needs_fmnist
def test_gradient_clipping_bounds_the_step_and_channels_last_trains(fmnist):
    from compress.train import TrainConfig, Trainer

    train, _ = _subsets(fmnist, 256, 100)
    model = _small_resnet()
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainConfig(
        epochs=1, batch_size=64, lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant", clip_grad=0.5,
        max_steps=1, channels_last=True,
    )  # fmt: skip
    Trainer(model, config, train, device="cpu", progress=False).fit()
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert float(step.norm()) == pytest.approx(0.5, rel=1e-3)  # plain SGD step = lr · clipped gradient
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@needs_fmnist
def test_adamw_with_step_schedule_and_label_smoothing_learns(fmnist):
    from compress.train import TrainConfig, Trainer

    train, test = _subsets(fmnist, 1024, 500)
    config = TrainConfig(
        epochs=2, batch_size=64, optimizer="adamw", lr=3e-3, weight_decay=0.05, schedule="step", label_smoothing=0.1
    )
    result = Trainer(_small_resnet(), config, train, test, device="cpu", progress=False).fit()
    assert result.history[0]["lr_end"] == pytest.approx(3e-3)
    assert result.history[1]["lr_end"] == pytest.approx(3e-5)  # default milestones: epochs 1 and 1.5
    assert result.history[1]["loss"] < result.history[0]["loss"]
    assert result.final.top1 > 0.5
