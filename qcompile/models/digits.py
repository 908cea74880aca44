"""The bundled default model: a small CNN trained here on scikit-learn's real digits.

``DigitsNet`` exercises what a compiler must handle: conv-bn-relu, a residual
block (skip add), an inception-style concat of a 1x1 and a 3x3 branch,
max-pooling, global average pooling, a linear head.  Weights live in
``digits_cnn.npz`` (a plain state dict, loaded with ``allow_pickle=False``).

Retrain (deterministic, ~30 s on 2 cores): ``python -m qcompile.models.digits --train``.
Held-out accuracy of the bundled weights is printed by that command and checked in
``tests/test_digits_model.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcompile.data.digits import accuracy, calibration_batch, load_digits_split

WEIGHTS = Path(__file__).with_name("digits_cnn.npz")


def _cbr(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsNet(nn.Module):
    """(1, 8, 8) digit -> 10 logits."""

    input_names = ["image"]

    def __init__(self):
        super().__init__()
        self.stem = _cbr(1, 16, 3)
        self.res_conv1 = _cbr(16, 16, 3)
        self.res_conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(16)
        self.branch1 = _cbr(16, 16, 1)
        self.branch3 = _cbr(16, 16, 3)
        self.pool = nn.MaxPool2d(2)
        self.conv_out = _cbr(32, 48, 3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(48, 10)
        self.example_inputs = (torch.zeros(1, 1, 8, 8),)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image)
        x = torch.relu(x + self.res_bn2(self.res_conv2(self.res_conv1(x))))
        x = torch.cat([self.branch1(x), self.branch3(x)], dim=1)
        x = self.conv_out(self.pool(x))
        return self.fc(self.dropout(torch.flatten(self.gap(x), 1)))

    @staticmethod
    def calibration_data() -> np.ndarray:
        """Real training-split digits (64, 1, 8, 8) for calibration and verification."""
        return calibration_batch(64)


def load_state(model: nn.Module, path: Path = WEIGHTS) -> None:
    with np.load(path, allow_pickle=False) as data:
        state = {k: torch.from_numpy(data[k].copy()) for k in data.files}
    model.load_state_dict(state, strict=True)


def digits_cnn() -> DigitsNet:
    """The bundled trained model, in eval mode."""
    model = DigitsNet()
    load_state(model)
    return model.eval()


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (zero fill), per batch."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    x = torch.roll(x, (dy, dx), dims=(2, 3))
    if dy > 0:
        x[:, :, :dy] = 0
    elif dy < 0:
        x[:, :, dy:] = 0
    if dx > 0:
        x[:, :, :, :dx] = 0
    elif dx < 0:
        x[:, :, :, dx:] = 0
    return x


def predict_fn(model: nn.Module):
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return predict


def train_digits(epochs: int = 40, seed: int = 0) -> tuple[DigitsNet, dict]:
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(seed)
    split = load_digits_split()
    x, y = (torch.from_numpy(a.copy()) for a in split.train)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(_shift(x[idx].clone(), gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    metrics = {"val_acc": accuracy(predict_fn(model), *split.val),
               "test_acc": accuracy(predict_fn(model), *split.test),
               "train_seconds": time.perf_counter() - t0, "epochs": epochs}
    return model, metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="retrain and overwrite the bundled weights")
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args(argv)
    if args.train:
        model, metrics = train_digits(args.epochs)
        np.savez(WEIGHTS, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
        print(f"saved {WEIGHTS} ({WEIGHTS.stat().st_size} bytes): {metrics}")
    else:
        split = load_digits_split()
        model = digits_cnn()
        print(f"bundled weights: val acc {accuracy(predict_fn(model), *split.val):.4f}, "
              f"test acc {accuracy(predict_fn(model), *split.test):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
