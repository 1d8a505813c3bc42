"""A network the project has never seen: max pooling, batch norm, residual blocks, global average pooling."""
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.b, self.bn_b = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.bn_b(self.b(self.relu(self.bn_a(self.a(x))))))


class MixedNet(nn.Module):
    def __init__(self, width: int = 24, num_classes: int = 10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2))
        self.block1 = Block(w)
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.block2 = Block(2 * w)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 64), nn.ReLU(),
                                  nn.Dropout(0.1), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.block2(self.down(self.block1(self.stem(x)))))


def mixed_net(width: int = 24, num_classes: int = 10) -> nn.Module:
    return MixedNet(width, num_classes)
