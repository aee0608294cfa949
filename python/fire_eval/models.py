"""Models sized for 3x32x32 inputs. Each names the layers FIRE can repair (`REPAIRABLE`).

The convolutional models start with `input`, an identity: the pixels are FIRE's earliest
feature space. A global trigger that adds or blends a fixed pattern (SIG, Blended) is a shift
along one direction there, before the first nonlinearity mixes it with the image; on CIFAR-10
it is where FIRE repairs them best (README, real-data table)."""
import torch
from torch import nn


def _conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    REPAIRABLE = ["input", "block1", "block2", "block3", "fc"]

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.input = nn.Identity()
        self.block1 = nn.Sequential(_conv_bn(3, w), nn.MaxPool2d(2))  # 16x16
        self.block2 = nn.Sequential(_conv_bn(w, 2 * w), nn.MaxPool2d(2))  # 8x8
        self.block3 = nn.Sequential(_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))  # 4x4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.ReLU(inplace=True))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.fc(self.block3(self.block2(self.block1(self.input(x))))))


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

    REPAIRABLE = ["input", "layer1", "layer2", "layer3", "layer4", "pool"]

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        w = width
        self.input = nn.Identity()
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
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(self.input(x))))))
        return self.linear(self.pool(self.bn(out)))


class VGG(nn.Module):
    """VGG-11 with batch norm for 32x32 inputs; `width=64` is the standard size."""

    REPAIRABLE = ["input", "stage1", "stage2", "stage3", "stage4", "stage5", "fc"]

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        w = width
        self.input = nn.Identity()
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
        x = self.input(x)
        for i in range(1, 6):
            x = getattr(self, f"stage{i}")(x)
        return self.head(self.fc(x))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small vision transformer for 32x32 inputs: 4x4 patches (64 tokens) and a class token,
    four encoder blocks, classification from the class token. `tokens` (the embedded tokens
    with their position embedding, before block1) and the block outputs are (N, 65, C) tokens:
    FIRE repairs them per position (`CHANNEL_DIM = -1`), wherever a trigger token lands;
    `input` (the pixels) flattened. At `tokens` a trigger filling one patch moves that one token
    only; from block1 on, attention has spread it to others."""

    BLOCKS = ["block1", "block2", "block3", "block4"]
    REPAIRABLE = ["input", "tokens", *BLOCKS]
    CHANNEL_DIM = -1
    NOT_POSITIONAL = ["input"]  # pixels (N, 3, H, W), not tokens: repaired flattened only

    CLASS_TOKEN = True

    def __init__(self, num_classes: int = 10, width: int = 64, heads: int = 4, patch: int = 4):
        super().__init__()
        tokens = (32 // patch) ** 2 + int(self.CLASS_TOKEN)
        self.input = nn.Identity()
        self.embed = nn.Conv2d(3, width, patch, patch)
        if self.CLASS_TOKEN:
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, width))
        self.tokens = nn.Identity()  # the embedded tokens before block1: a hook point, no weights
        for name in self.BLOCKS:
            self.add_module(name, EncoderBlock(width, heads))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        t = self.embed(self.input(x)).flatten(2).transpose(1, 2)  # (N, 64, C)
        if self.CLASS_TOKEN:
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        t = self.tokens(t + self.pos)
        for name in self.BLOCKS:
            t = getattr(self, name)(t)
        return self.head(self.pool(self.norm(t)))

    def pool(self, t):
        return t[:, 0]


class ViTMeanPool(ViT):
    """The small ViT without a class token: classification from the mean of the 64 patch
    tokens (global average pooling, as in many later vision transformers). With a class token,
    a trigger token's effect gathers at one fixed position within a block (the class token
    attends to it); without one it spreads to every token (measured on the digits' trigger
    token after block1: median shift 5.7 at the other tokens against 7.8 at the trigger's own,
    experiments/digits-vit-trigger-token/)."""

    CLASS_TOKEN = False

    def pool(self, t):
        return t.mean(1)


class HFViT(nn.Module):
    """Hugging Face's `ViTForImageClassification` (transformers; `pip install 'fire-kernels[hf]'`),
    built from a config of the small ViT's size (no download, random init): 4x4 patches, a class
    token, four encoder layers of width 64. A real architecture from a library people use, as it
    is: FIRE reads its modules' outputs (the encoder layers' hidden states) and its `ModelOutput`.
    Repairable at `input` (the pixels, flattened), the embeddings (tokens with the position
    embedding) and each encoder layer (tokens, per position); the names are transformers' own,
    found at build time (`REPAIRABLE` is set per instance)."""

    CHANNEL_DIM = -1

    def __init__(self, num_classes: int = 10, width: int = 64, heads: int = 4, patch: int = 4):
        super().__init__()
        try:
            from transformers import ViTConfig, ViTForImageClassification
        except ImportError as err:
            raise ImportError("model 'hf-vit' needs transformers: pip install 'fire-kernels[hf]'") from err
        config = ViTConfig(image_size=32, patch_size=patch, num_channels=3, hidden_size=width, num_hidden_layers=4,
                           num_attention_heads=heads, intermediate_size=2 * width, num_labels=num_classes)
        self.input = nn.Identity()
        self.hf = ViTForImageClassification(config)
        layers = [name for name, m in self.named_modules() if type(m).__name__ == "ViTLayer"]
        self.BLOCKS = layers
        self.REPAIRABLE = ["input", "hf.vit.embeddings", *layers]

    def forward(self, x):
        return self.hf(pixel_values=self.input(x)).logits


MODELS = {"cnn": SmallCNN, "preact18": PreActResNet18, "vgg": VGG, "vit": ViT, "vit-gap": ViTMeanPool,
          "hf-vit": HFViT}
# training epochs by default (the transformer learns more slowly: 30 epochs, about 50 s on the
# digits on 2 cores, CA 97-98%)
EPOCHS = {"vit": 30, "vit-gap": 30, "hf-vit": 30}


def channel_dim(model: nn.Module) -> int:
    """Where the channels of the model's repairable layers sit: 1 for conv maps, -1 for tokens."""
    return getattr(model, "CHANNEL_DIM", 1)


def build(name: str, num_classes: int = 10, width: int = None) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    kwargs = {"num_classes": num_classes}
    if width is not None:
        kwargs["width"] = width
    return MODELS[name](**kwargs)
