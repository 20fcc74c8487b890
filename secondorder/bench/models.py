"""Models of the larger benchmark tasks (:mod:`secondorder.bench.tasks`).

Everything with weights is built from ``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.LayerNorm`` and ``nn.Embedding``, so the curvature optimizers see every layer they know.
Input preprocessing (scaling, normalisation, augmentation) lives in parameter-free modules at
the front of the model, because the runner feeds the stored tensors straight to ``model(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CharGPT",
    "CifarInput",
    "CifarResNet",
    "autoencoder",
    "cifar_resnet",
    "resnet18_cifar",
]


class CifarInput(nn.Module):
    """``uint8`` images ``(n, 3, 32, 32)`` to normalised floats, augmented in training mode.

    Training mode applies the usual CIFAR augmentation per image: a random 32x32 crop of the
    image zero-padded by 4 pixels on each side, then a horizontal flip with probability 1/2
    (torchvision's ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()``). The random
    numbers come from torch's global generator on the input's device, which the runner seeds.
    Evaluation mode only normalises.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], pad: int = 4) -> None:
        super().__init__()
        self.pad = pad
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() / 255.0 if not x.is_floating_point() else x
        if self.training:
            x = self._augment(x)
        return (x - self.mean) / self.std

    def _augment(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        p, dev = self.pad, x.device
        out = x
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), device=dev)
            dx = torch.randint(0, 2 * p + 1, (n,), device=dev)
            rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
            batch = torch.arange(n, device=dev)[:, None, None, None]
            chans = torch.arange(c, device=dev)[None, :, None, None]
            out = padded[batch, chans, rows, cols]
        flip = torch.rand(n, device=dev) < 0.5
        return torch.where(flip[:, None, None, None], out.flip(3), out)


class _BasicBlock(nn.Module):
    """He et al. (2016) basic block; option-A shortcut (stride-2 subsampling, zero channels)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra:
            half = self.extra // 2
            short = F.pad(short, (0, 0, 0, 0, half, self.extra - half))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    """The CIFAR ResNet-(6n+2) of He et al. (2016), section 4.2.

    A 3x3 convolution with 16 channels, then three stages of ``n`` basic blocks with 16, 32 and
    64 channels (the first block of stages 2 and 3 has stride 2), global average pooling and a
    linear classifier; identity shortcuts with zero-padded channels (option A), so the
    parameter counts are the paper's: 0.27M for n=3 (ResNet-20), 0.46M for n=5 (ResNet-32).
    """

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(_BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def cifar_resnet(depth: int, num_classes: int, input_stats: tuple | None = None) -> nn.Module:
    """ResNet-``depth`` (depth = 6n+2) for CIFAR, behind :class:`CifarInput` if stats given."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    net = CifarResNet((depth - 2) // 6, num_classes)
    return nn.Sequential(CifarInput(*input_stats), net) if input_stats else net


def resnet18_cifar(num_classes: int, input_stats: tuple | None = None) -> nn.Module:
    """timm's ResNet-18 adapted to 32x32 inputs: 3x3 stride-1 stem, no max-pool.

    This is the common CIFAR variant (e.g. kuangliu/pytorch-cifar); the stem change keeps the
    feature maps 32/16/8/4 pixels wide instead of 8/4/2/1. About 11.2M parameters.
    """
    import timm  # imported here: slow, and only this task needs it

    net = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return nn.Sequential(CifarInput(*input_stats), net) if input_stats else net


def autoencoder(sizes: Sequence[int], act: type[nn.Module], code_linear: bool = True) -> nn.Module:
    """Fully connected autoencoder ``sizes[0] - ... - sizes[-1]`` returning output *logits*.

    Every hidden layer uses ``act`` except the narrowest (the code), which is linear when
    ``code_linear`` (as in Hinton & Salakhutdinov, 2006). The last layer has no activation:
    the sigmoid output of the classic autoencoder is applied by the loss
    (``binary_cross_entropy_with_logits``) and the metric.
    """
    layers: list[nn.Module] = []
    code = min(range(1, len(sizes) - 1), key=lambda i: sizes[i])
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 1 < len(sizes) - 1 and not (code_linear and i + 1 == code):
            layers.append(act())
    return nn.Sequential(*layers)


class _CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than F.scaled_dot_product_attention: twice differentiable on
        # every backend (Hessian-vector optimizers) and plain to read.
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = _CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharGPT(nn.Module):
    """A small GPT (pre-LayerNorm, learned positions, causal attention) over characters.

    ``(n, t)`` character indices to ``(n, t, vocab)`` next-character logits; ``t <= context``.
    """

    def __init__(
        self, vocab: int, context: int = 64, dim: int = 128, layers: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(_Block(dim, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        return self.head(self.ln(self.blocks(x)))
