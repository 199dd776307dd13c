"""U-Nets for segmentation: the standard U-Net and TernausNet (VGG-11 encoder).

``unet``: Ronneberger et al. 2015 with two changes that every modern implementation makes:
'same' padding (output size = input size, any multiple of 16) and BatchNorm after each conv.
``ternausnet``: Iglovikov & Shvets 2018, U-Net whose encoder is VGG-11's conv layers and whose
decoder blocks are conv3x3 + transposed conv; no BN, as published.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._factory import register_model


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, in_chans: int = 1, num_classes: int = 2, base: int = 64, depth: int = 4) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.enc = nn.ModuleList([_double_conv(in_chans, widths[0])] +
                                 [_double_conv(widths[i], widths[i + 1]) for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))])
        self.dec = nn.ModuleList([_double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def _conv_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))


class _Decoder(nn.Sequential):
    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__(_conv_relu(cin, mid),
                         nn.ConvTranspose2d(mid, cout, 3, stride=2, padding=1, output_padding=1), nn.ReLU(inplace=True))


class TernausNet(nn.Module):
    def __init__(self, in_chans: int = 3, num_classes: int = 2, base: int = 32) -> None:
        super().__init__()
        b = base
        self.pool = nn.MaxPool2d(2)
        self.conv1 = _conv_relu(in_chans, 2 * b)
        self.conv2 = _conv_relu(2 * b, 4 * b)
        self.conv3 = nn.Sequential(_conv_relu(4 * b, 8 * b), _conv_relu(8 * b, 8 * b))
        self.conv4 = nn.Sequential(_conv_relu(8 * b, 16 * b), _conv_relu(16 * b, 16 * b))
        self.conv5 = nn.Sequential(_conv_relu(16 * b, 16 * b), _conv_relu(16 * b, 16 * b))
        self.center = _Decoder(16 * b, 16 * b, 8 * b)
        self.dec5 = _Decoder(8 * b + 16 * b, 16 * b, 8 * b)
        self.dec4 = _Decoder(8 * b + 16 * b, 16 * b, 4 * b)
        self.dec3 = _Decoder(4 * b + 8 * b, 8 * b, 2 * b)
        self.dec2 = _Decoder(2 * b + 4 * b, 4 * b, b)
        self.dec1 = _conv_relu(b + 2 * b, b)
        self.head = nn.Conv2d(b, num_classes, 1)

    def forward(self, x):
        c1 = self.conv1(x)
        c2 = self.conv2(self.pool(c1))
        c3 = self.conv3(self.pool(c2))
        c4 = self.conv4(self.pool(c3))
        c5 = self.conv5(self.pool(c4))
        x = self.center(self.pool(c5))
        x = self.dec5(torch.cat([x, c5], 1))
        x = self.dec4(torch.cat([x, c4], 1))
        x = self.dec3(torch.cat([x, c3], 1))
        x = self.dec2(torch.cat([x, c2], 1))
        return self.head(self.dec1(torch.cat([x, c1], 1)))


@register_model()
def unet(in_chans: int = 1, num_classes: int = 2, base: int = 64, depth: int = 4) -> UNet:
    """Standard U-Net (64-1024 channels by default); ``base`` scales every width."""
    return UNet(in_chans, num_classes, base, depth)


@register_model()
def ternausnet(in_chans: int = 3, num_classes: int = 2, base: int = 32) -> TernausNet:
    """U-Net with a VGG-11 encoder (TernausNet); ``base=32`` gives VGG-11's 64-512 widths."""
    return TernausNet(in_chans, num_classes, base)
