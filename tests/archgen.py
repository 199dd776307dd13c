"""Seeded random CNN architectures for fuzzing the capture: every coupling the engine must get right.

``random_net(seed)`` builds a small network from a random program of blocks: plain and grouped
convs, depthwise convs, residual add/sub/multiply, concats, chunk into gate or concat (C2f-like),
literal split sizes held in a module attribute (MixConv-like), squeeze-excitation, functional
batch/group/layer norm written with the module's own parameters, layer scale, channel shuffle
with sizes read from the shape, transposed convs and upsampling, an op the engine does not model
(cumsum), and a classification (pool or flatten->Linear) or segmentation head.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvNorm(nn.Module):
    """conv -> norm (module or functional with own parameters) -> activation."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int, norm: str, act: str, rng: random.Random):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=norm == "none")
        self.norm, self.act = norm, act
        if norm == "bn":
            self.bn = nn.BatchNorm2d(cout)
        elif norm == "gn":
            self.gn = nn.GroupNorm(2 if cout % 2 == 0 else 1, cout)
        elif norm in ("fbn", "fgn", "fln"):
            self.weight = nn.Parameter(torch.rand(cout) + 0.5)
            self.bias = nn.Parameter(torch.rand(cout) - 0.5)
            if norm == "fbn":
                self.register_buffer("running_mean", torch.rand(cout) - 0.5)
                self.register_buffer("running_var", torch.rand(cout) + 0.5)
            self.num_features = cout
            self.num_groups = 1 if norm == "fgn" else None
        if norm == "bn":
            with torch.no_grad():
                self.bn.running_mean.uniform_(-0.5, 0.5)
                self.bn.running_var.uniform_(0.5, 1.5)
                self.bn.weight.uniform_(0.5, 1.5)
                self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = self.conv(x)
        if self.norm == "bn":
            x = self.bn(x)
        elif self.norm == "gn":
            x = self.gn(x)
        elif self.norm == "fbn":
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)
        elif self.norm == "fgn":
            x = F.group_norm(x, self.num_groups, self.weight, self.bias)
        elif self.norm == "fln":  # channels-last layer norm, as ConvNeXt / timm's LayerNorm2d
            x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias).permute(0, 3, 1, 2)
        if self.act == "relu":
            x = F.relu(x)
        elif self.act == "silu":
            x = F.silu(x)
        elif self.act == "hswish":
            x = F.hardswish(x)
        return x


class Block(nn.Module):
    def __init__(self, kind: str, c: int, rng: random.Random):
        super().__init__()
        self.kind = kind
        norm = rng.choice(["bn", "bn", "fbn", "gn", "fgn", "fln", "none"])
        act = rng.choice(["relu", "silu", "hswish"])
        cn = lambda i, o, k=3, s=1, g=1: ConvNorm(i, o, k, s, g, norm, act, rng)  # noqa: E731
        m = rng.choice([4, 6, 8, 12])
        self.out_c = c
        if kind == "conv":
            o = rng.choice([4, 6, 8, 12, 16])
            g = rng.choice([g for g in (1, 2, 4) if c % g == 0 and o % g == 0])
            self.a = cn(c, o, rng.choice([1, 3]), 1, g)
            self.out_c = o
        elif kind == "dw":
            mult = rng.choice([1, 2])
            self.a = cn(c, c * mult, 3, 1, c)
            self.out_c = c * mult
        elif kind in ("res_add", "res_sub", "res_mul"):
            self.a, self.b = cn(c, m), cn(m, c, 1)
        elif kind == "concat":
            o1, o2 = rng.choice([4, 6, 8]), rng.choice([4, 6, 8])
            self.a, self.b = cn(c, o1, 1), cn(c, o2, 3)
            self.out_c = o1 + o2
        elif kind == "chunk_gate":
            self.a = cn(c, 2 * m, 1)
            self.out_c = m
        elif kind == "c2f":
            self.a, self.b, self.c = cn(c, 2 * m, 1), cn(m, m, 3), cn(3 * m, c, 1)
        elif kind == "mixsplit":
            self.splits = [c - c // 2, c // 2]
            self.convs = nn.ModuleList([nn.Conv2d(n, n, k, 1, k // 2, groups=n) for n, k in zip(self.splits, (3, 5))])
        elif kind == "se":
            self.fc1, self.fc2 = nn.Conv2d(c, max(2, c // 4), 1), nn.Conv2d(max(2, c // 4), c, 1)
        elif kind == "scale":
            self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        elif kind == "shuffle":
            self.groups = 2 if c % 2 == 0 else 1
        elif kind == "up":
            o = rng.choice([4, 8, 12])
            self.up = nn.ConvTranspose2d(c, o, 2, stride=2)
            self.a = cn(o, o, 3, 2)  # back down: spatial size unchanged overall
            self.out_c = o
        elif kind == "interp":
            self.a = cn(c, c, 3, 2)
        elif kind == "unknown":
            self.a = nn.Conv2d(c, c, 1)

    def forward(self, x):
        k = self.kind
        if k in ("conv", "dw"):
            return self.a(x)
        if k == "res_add":
            return x + self.b(self.a(x))
        if k == "res_sub":
            return x - self.b(self.a(x))
        if k == "res_mul":
            return x * torch.sigmoid(self.b(self.a(x)))
        if k == "concat":
            return torch.cat([self.a(x), self.b(x)], 1)
        if k == "chunk_gate":
            a, b = self.a(x).chunk(2, 1)
            return a * torch.sigmoid(b)
        if k == "c2f":
            y = list(self.a(x).chunk(2, 1))
            y.append(self.b(y[-1]))
            return self.c(torch.cat(y, 1))
        if k == "mixsplit":
            parts = torch.split(x, self.splits, 1)
            return torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1)
        if k == "se":
            s = x.mean((2, 3), keepdim=True)
            return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        if k == "scale":
            return x * self.gamma.view(1, -1, 1, 1)
        if k == "shuffle":
            b, c, h, w = x.shape
            return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)
        if k == "up":
            return self.a(self.up(x))
        if k == "interp":
            return F.interpolate(self.a(x), scale_factor=2.0, mode="nearest")
        if k == "unknown":
            return self.a(torch.cumsum(x, dim=1))
        raise AssertionError(k)


KINDS = ["conv", "dw", "res_add", "res_sub", "res_mul", "concat", "chunk_gate", "c2f", "mixsplit", "se",
         "scale", "shuffle", "up", "interp", "unknown"]


class RandomNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        self.task = rng.choice(["pool", "flatten", "seg"])
        c = rng.choice([6, 8, 12])
        self.stem = nn.Conv2d(3, c, 3, 2, 1)
        blocks = []
        for _ in range(rng.randint(2, 6)):
            b = Block(rng.choice(KINDS), c, rng)
            blocks.append(b)
            c = b.out_c
        self.blocks = nn.Sequential(*blocks)
        if self.task == "seg":
            self.head = nn.Conv2d(c, 3, 1)
        elif self.task == "flatten":
            self.head = nn.Linear(c * 4 * 4, 5)
        else:
            self.head = nn.Linear(c, 5)

    def forward(self, x):
        size = x.shape[-2:]
        h = self.blocks(self.stem(x))
        if self.task == "seg":
            return F.interpolate(self.head(h), size=size, mode="bilinear", align_corners=False)
        if self.task == "flatten":
            return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 4), 1))
        return self.head(h.mean((2, 3)))


def random_net(seed: int) -> RandomNet:
    torch.manual_seed(seed)
    return RandomNet(seed).eval()
