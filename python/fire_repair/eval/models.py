"""Models sized for 3x32x32 inputs. Each names the layers FIRE can repair (`REPAIRABLE`)."""
import torch
from torch import nn


def _conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    REPAIRABLE = ["block1", "block2", "block3", "fc"]

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.block1 = nn.Sequential(_conv_bn(3, w), nn.MaxPool2d(2))  # 16x16
        self.block2 = nn.Sequential(_conv_bn(w, 2 * w), nn.MaxPool2d(2))  # 8x8
        self.block3 = nn.Sequential(_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))  # 4x4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.ReLU(inplace=True))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.fc(self.block3(self.block2(self.block1(x)))))


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 (He et al., 2016) for 32x32 inputs; `width=64` is the standard size."""

    REPAIRABLE = ["layer1", "layer2", "layer3", "layer4", "pool"]

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        cfg = [(w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)]
        cin, layers = w, []
        for cout, stride in cfg:
            layers.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.pool(self.bn(out)))


class VGG(nn.Module):
    """VGG-11 with batch norm for 32x32 inputs; `width=64` is the standard size."""

    REPAIRABLE = ["stage1", "stage2", "stage3", "stage4", "stage5", "fc"]

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        w = width
        cfg = [[w], [2 * w], [4 * w, 4 * w], [8 * w, 8 * w], [8 * w, 8 * w]]
        cin = 3
        for i, stage in enumerate(cfg, 1):
            mods = []
            for cout in stage:
                mods.append(_conv_bn(cin, cout))
                cin = cout
            mods.append(nn.MaxPool2d(2))
            self.add_module(f"stage{i}", nn.Sequential(*mods))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(cin, 4 * w), nn.ReLU(inplace=True))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        for i in range(1, 6):
            x = getattr(self, f"stage{i}")(x)
        return self.head(self.fc(x))


MODELS = {"cnn": SmallCNN, "preact18": PreActResNet18, "vgg": VGG}


def build(name: str, num_classes: int = 10, width: int = None) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    kwargs = {"num_classes": num_classes}
    if width is not None:
        kwargs["width"] = width
    return MODELS[name](**kwargs)
