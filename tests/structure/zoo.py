"""A zoo of small architectures for the structured-pruning tests (random weights, random BN stats)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastprune.nn import swap_attention


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), _bn(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), _bn(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(out + idt)


class ResNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), _bn(16), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(Bottleneck(16, 8, 32), Bottleneck(32, 8, 32))
        self.layer2 = nn.Sequential(Bottleneck(32, 16, 64, stride=2), Bottleneck(64, 16, 64))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False),
            _bn(hid),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),
            _bn(hid),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hid, cout, 1, bias=False),
            _bn(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2ish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), _bn(16), nn.ReLU6(inplace=True)),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), _bn(64), nn.ReLU6(inplace=True)),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class MBConv(nn.Module):
    """EfficientNet's block: expansion -> BN -> SiLU -> depthwise -> BN -> SiLU -> squeeze-excite
    gate -> projection -> BN (+ the input when the shapes allow)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: int = 4) -> None:
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, hid, 1, bias=False), _bn(hid), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), _bn(hid), nn.SiLU())
        self.se_reduce, self.se_expand = nn.Conv2d(hid, se, 1), nn.Conv2d(se, hid, 1)
        self.project = nn.Sequential(nn.Conv2d(hid, cout, 1, bias=False), _bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.expand(x))
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        y = self.project(h * s)
        return x + y if self.use_res else y


class EfficientNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), _bn(16), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(16, 16, 1, 1), MBConv(16, 24, 2, 4), MBConv(24, 24, 1, 4))
        self.head = nn.Sequential(nn.Conv2d(24, 48, 1, bias=False), _bn(48), nn.SiLU())
        self.fc = nn.Linear(48, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _bn(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = _bn(2 * growth), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return torch.cat([x, y], 1)


class DenseNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block = nn.Sequential(DenseLayer(16, 8), DenseLayer(24, 8), DenseLayer(32, 8))
        self.trans = nn.Sequential(_bn(40), nn.ReLU(), nn.Conv2d(40, 20, 1, bias=False), nn.AvgPool2d(2))
        self.norm, self.fc = _bn(20), nn.Linear(20 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trans(self.block(self.conv0(x)))
        return self.fc(F.relu(self.norm(x)).flatten(1))


class UNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def dbl(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(a, b, 3, 1, 1), _bn(b), nn.ReLU(), nn.Conv2d(b, b, 3, 1, 1), _bn(b), nn.ReLU()
            )

        self.enc1, self.enc2, self.mid = dbl(3, 8), dbl(8, 16), dbl(16, 32)
        self.up2, self.dec2 = nn.ConvTranspose2d(32, 16, 2, 2), dbl(32, 16)
        self.up1, self.dec1 = nn.Upsample(scale_factor=2), dbl(16 + 8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(20, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Linear(64, 48),
            nn.Tanh(),
            nn.Dropout(0.1),
            nn.Linear(48, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(self, e: int = 32, heads: int = 4, ff: int = 64) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(e), nn.MultiheadAttention(e, heads, batch_first=True)
        self.ln2, self.ff = nn.LayerNorm(e), nn.Sequential(nn.Linear(e, ff), nn.GELU(), nn.Linear(ff, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.blocks = nn.Sequential(TransformerBlock(), TransformerBlock())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


class SqueezeExcite(nn.Module):
    """Sigmoid gate: a zeroed channel of fc1 outputs sigmoid(bias) != 0 (compaction must fold it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.out((y * s).mean((2, 3)))


class DataDependent(nn.Module):
    """FX cannot trace the branch on a tensor value: the dynamic tracer must take over."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 12, 3, padding=1), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        if x.abs().sum() >= 0:  # always true, but a branch on a tensor's value
            y = y + F.relu(self.b(y))
        return self.fc(y.mean((2, 3)))


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, so masked/compact equivalence is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model.eval()


ZOO = {
    "resnet": (ResNetish, (2, 3, 16, 16)),
    "mobilenetv2": (MobileNetV2ish, (2, 3, 16, 16)),
    "efficientnet": (EfficientNetish, (2, 3, 16, 16)),
    "densenet": (DenseNetish, (2, 3, 8, 8)),
    "unet": (UNetish, (2, 3, 16, 16)),
    "mlp": (MLP, (4, 20)),
    "transformer": (lambda: swap_attention(TinyTransformer()), (2, 7, 12)),
    "squeeze_excite": (SqueezeExcite, (2, 3, 8, 8)),
    "data_dependent": (DataDependent, (2, 3, 8, 8)),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = ZOO[name]
    torch.manual_seed(seed)
    model = randomise(factory(), seed)
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
