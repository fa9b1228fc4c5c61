"""The paper's architectures as ReLU ``nn.Sequential`` models (convert them with
:func:`hwloop.convert`).

* ``fc2``: 784-340-10 (one hidden layer of 340 units).
* ``fc16``: 15 hidden layers of 340 units and the readout (16 weight layers).
* ``lenet5``: conv 6@5x5 (pad 2) - pool - conv 16@5x5 - pool - conv 120@5x5 - FC 84 - readout
  (3 conv, 2 max-pool, FC 84, 10).
* ``vgg16``: the 13-conv VGG16 of the Methods with batch norm after each ReLU (the order of the
  widely used pretrained CIFAR VGG16), then FC 512-512-readout; ``width`` scales the channels
  (0.125 for tests) and pools that would shrink a map below 1 pixel are skipped.
"""

from __future__ import annotations

import math

from torch import nn

ARCHITECTURES = ("fc2", "fc16", "lenet5", "vgg16")
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def build_relu(arch: str, input_shape: tuple[int, ...] = (1, 28, 28), n_classes: int = 10,
               width: float = 1.0, batch_norm: bool = True) -> nn.Sequential:
    """A freshly initialised ReLU model (PyTorch default init; Glorot for dense nets).

    Args:
        arch: one of :data:`ARCHITECTURES`.
        input_shape: per-sample input shape ``(C, H, W)``; dense nets flatten it.
        n_classes: readout size.
        width: channel multiplier for ``vgg16``.
        batch_norm: ``vgg16`` only: batch norm after every ReLU.

    Raises:
        ValueError: unknown architecture (names the allowed ones).
    """
    n_in = int(math.prod(input_shape))
    if arch == "fc2":
        model = nn.Sequential(nn.Flatten(), nn.Linear(n_in, 340), nn.ReLU(), nn.Linear(340, n_classes))
    elif arch == "fc16":
        mods: list[nn.Module] = [nn.Flatten(), nn.Linear(n_in, 340), nn.ReLU()]
        for _ in range(14):
            mods += [nn.Linear(340, 340), nn.ReLU()]
        mods.append(nn.Linear(340, n_classes))
        model = nn.Sequential(*mods)
    elif arch == "lenet5":
        c, h, w = input_shape
        model = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 120, 5), nn.ReLU(), nn.Flatten(),
            nn.Linear(120 * ((h // 2 - 4) // 2 - 4) * ((w // 2 - 4) // 2 - 4), 84), nn.ReLU(),
            nn.Linear(84, n_classes))
    elif arch == "vgg16":
        c, h, w = input_shape
        mods = []
        for v in _VGG16:
            if v == "M":
                if h >= 2 and w >= 2:
                    mods.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
                continue
            out = max(1, int(round(v * width)))
            mods += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            if batch_norm:
                mods.append(nn.BatchNorm2d(out))
            c = out
        fc = max(1, int(round(512 * width)))
        mods += [nn.Flatten(), nn.Linear(c * h * w, fc), nn.ReLU(), nn.Dropout(0.5),
                 nn.Linear(fc, fc), nn.ReLU(), nn.Dropout(0.5), nn.Linear(fc, n_classes)]
        model = nn.Sequential(*mods)
    else:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if arch in ("fc2", "fc16"):
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    return model
