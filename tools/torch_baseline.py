"""An equivalent PyTorch training loop, for `tools.bench` side-by-side timings (optional).

The same CIFAR ResNet as sbt_keras.models.resnet_cifar (3x3 stem, 3 stages of basic blocks,
parameter-free option-A shortcuts, BN or none, He init) trained with summed-loss plain SGD.
Only imported when torch is installed (`make bench` installs requirements-bench.txt).
"""
import time

import torch
from torch import nn
from torch.nn import functional as F


class _Block(nn.Module):
    def __init__(self, cin, cout, stride, bn):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:  # option A: zero channels, half on each side
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(y + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth, num_classes=10, bn=True):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=not bn)
        self.stem_bn = nn.BatchNorm2d(16) if bn else nn.Identity()
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(_Block(cin, cout, 2 if stage and i == 0 else 1, bn))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        return self.fc(self.blocks(x).mean(dim=(2, 3)))


def timed_block(depth, bn, batch_size, steps, image_size=32, lr=1e-3):
    """A function that trains `steps` SGD steps and returns the seconds per step."""
    torch.manual_seed(0)
    model = CifarResNet(depth, bn=bn)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))

    def block():
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, reduction="sum")
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    return block
