"""The bundled default model: a small CNN trained here on scikit-learn's real digits.

``DigitsNet`` (21,882 parameters) exercises what a compiler must handle: conv-bn-relu,
a residual block (skip add), an inception-style channel concat of a 1x1 and a 3x3 branch,
max-pooling, global average pooling, flatten, dropout (inactive in eval) and a linear head.
Weights live in ``digits_cnn.npz`` next to this file: the state dict as plain arrays,
loaded with ``np.load(..., allow_pickle=False)``, never pickle.

Bundled weights (``train_digits(epochs=40, seed=0)``, split seed 0):
validation accuracy 100.00 % (359/359), test accuracy 98.89 % (356/360).

Retrain (bit-for-bit deterministic, single thread, about 6 s of training):
``python -m qcompile.models.digits --train``; without ``--train`` the command prints the
held-out accuracy of the bundled weights.  ``tests/test_digits_model.py`` checks it.
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
"""The bundled trained weights of ``DigitsNet`` (a plain ``.npz`` state dict)."""


def _cbr(cin: int, cout: int, k: int) -> nn.Sequential:
    """Conv (k x k, same padding, no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsNet(nn.Module):
    """Small CNN: digit image (B, 1, 8, 8) in [0, 1] -> 10 class logits (B, 10).

    stem conv-bn-relu 1->16 (8x8) -> residual block (conv-bn-relu, conv-bn, + skip, relu)
    -> inception block: concat(1x1 conv-bn-relu 16->16, 3x3 conv-bn-relu 16->16) = 32 ch
    -> max-pool 2x2 (4x4) -> conv-bn-relu 32->48 -> global avg pool -> flatten -> dropout
    -> linear 48->10.

    Compiler hooks: ``example_inputs`` (a zero image), ``input_names`` (``["image"]``) and
    ``calibration_data()`` (real training digits), ``dataset`` (labelled data for accuracy checks).
    """

    input_names = ["image"]
    dataset = "digits"

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
        """64 real training-split digits (64, 1, 8, 8) float32 in [0, 1], for calibration."""
        return calibration_batch(64)


def load_state(model: nn.Module, path: Path = WEIGHTS) -> None:
    """Load a ``.npz`` state dict (written by ``save_state``) into ``model``, strictly, without pickle."""
    with np.load(path, allow_pickle=False) as data:
        state = {k: torch.from_numpy(data[k].copy()) for k in data.files}
    model.load_state_dict(state, strict=True)


def digits_cnn() -> DigitsNet:
    """The bundled trained ``DigitsNet`` (weights from ``WEIGHTS``), in eval mode."""
    model = DigitsNet()
    load_state(model)
    return model.eval()


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``x`` translated by a random (dy, dx) in {-1, 0, 1}^2 (zero fill), one shift per batch."""
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
    """A numpy function images (B, 1, 8, 8) -> logits (B, 10) running ``model`` as it is (no mode change)."""
    def predict(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not x.flags.writeable:
            x = x.copy()
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return predict


def train_digits(epochs: int = 40, seed: int = 0) -> tuple[DigitsNet, dict]:
    """Train a fresh ``DigitsNet`` on the training split (seed 0); return it in eval mode and metrics.

    Adam (lr 3e-3, weight decay 1e-4) with cosine decay, batches of 64, random 1-pixel shifts.
    ``seed`` fixes the initialisation, batch order and shifts; the run is bit-for-bit
    reproducible: one intra-op thread (a fixed reduction order on any machine) and
    ``torch.use_deterministic_algorithms``.  Both settings are restored afterwards.
    Metrics: ``val_acc``, ``test_acc`` (fractions), ``train_seconds``, ``epochs``, ``seed``.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        torch.use_deterministic_algorithms(True)
    except RuntimeError:  # pragma: no cover - not every build supports it
        pass
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        split = load_digits_split()
        x, y = (torch.from_numpy(a) for a in split.train)
        model = DigitsNet()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        t0 = time.perf_counter()
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                loss = nn.functional.cross_entropy(model(_shift(x[idx], gen)), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        seconds = time.perf_counter() - t0
        model.eval()
        metrics = {"val_acc": accuracy(predict_fn(model), *split.val),
                   "test_acc": accuracy(predict_fn(model), *split.test),
                   "train_seconds": seconds, "epochs": epochs, "seed": seed}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model, metrics


def save_state(model: nn.Module, path: Path = WEIGHTS) -> None:
    """Write ``model.state_dict()`` to ``path`` as a plain (pickle-free) ``.npz``."""
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})


def main(argv: list[str] | None = None) -> int:
    """``--train``: retrain and overwrite ``WEIGHTS``; otherwise report the bundled weights' accuracy."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="retrain and overwrite the bundled weights")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.train:
        model, m = train_digits(args.epochs, args.seed)
        save_state(model)
        print(f"trained {m['epochs']} epochs (seed {m['seed']}) in {m['train_seconds']:.1f} s: "
              f"val acc {m['val_acc']:.4f}, test acc {m['test_acc']:.4f}")
        print(f"saved {WEIGHTS} ({WEIGHTS.stat().st_size} bytes)")
    else:
        split = load_digits_split()
        model = digits_cnn()
        print(f"bundled weights: val acc {accuracy(predict_fn(model), *split.val):.4f}, "
              f"test acc {accuracy(predict_fn(model), *split.test):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
