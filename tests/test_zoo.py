"""A zoo of timm models: every optimizer trains every family for a few steps.

One small member of each timm family (ResNet, ConvNeXt, EfficientNet, MobileNetV3, ViT,
DeiT, Swin, RegNet), random weights, narrowed where timm's constructor allows it (the
layer types stay the family's; the widths are cut so that the dense factors of the
widest layers stay cheap on a CPU), trained 3 steps by each optimizer on a
2 x 3 x 32 x 32 batch: no exception, finite parameters, and every parameter either
covered by the curvature estimate or listed in ``opt.uncovered_parameters``. Where an
optimizer cannot run an operation (AdaHessian and MobileNetV3's ``nn.Hardsigmoid``), the
library's documented error is required, and then the documented way out must train.

The default run takes a representative subset (:data:`DEFAULT`, about a minute on two
CPU cores); the whole zoo (56 cases, 10 to 15 minutes) is marked ``zoo``::

    SECONDORDER_ZOO=1 python -m pytest tests/test_zoo.py -m zoo
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import secondorder

timm = pytest.importorskip("timm")

#: timm model name -> constructor keywords (narrower, shallower, 32 x 32 inputs)
MODELS: dict[str, dict] = {
    "resnet10t": {"stem_width": 8, "channels": (8, 16, 32, 64)},
    "convnext_atto": {"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1)},
    "test_efficientnet": {},  # timm's tiny EfficientNet (efficientnet_b0 blocks, narrow)
    "mobilenetv3_small_050": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2},
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2},
    "swin_tiny_patch4_window7_224": {
        "img_size": 32,
        "window_size": 2,
        "embed_dim": 16,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 1, 2, 2),
    },
    "regnetx_002": {},
}

#: optimizer -> keywords (curvature at every step, so that 3 steps exercise it)
OPTIMIZERS: dict[str, dict] = {
    "KFAC": {"curvature_every": 1, "inverse_every": 2},
    "EKFAC": {"curvature_every": 1, "inverse_every": 2},
    "TwoLevelKFAC": {"curvature_every": 1, "inverse_every": 2},
    "MFAC": {"ngrads": 4},
    "AdaFisher": {},
    "AdaFisherW": {},
    "AdaHessian": {},
}


class _HardSigmoid(torch.nn.Module):
    """nn.Hardsigmoid written with twice-differentiable operations (docs/adahessian.md)."""

    def forward(self, x):
        return F.relu6(x + 3) / 6


def _twice_differentiable(model: torch.nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Hardsigmoid):
            model.set_submodule(name, _HardSigmoid())


#: (model, optimizer) -> the library's documented error and the documented way out: the
#: squeeze-excite gates of MobileNetV3 are nn.Hardsigmoid, which PyTorch cannot
#: differentiate twice
KNOWN_ERRORS = {
    ("mobilenetv3_small_050", "AdaHessian"): (
        r"AdaHessian: the Hessian-vector product differentiates the backward pass of "
        r"nn\.Hardsigmoid",
        _twice_differentiable,
    ),
}

#: the default run: every optimizer on ConvNeXt (channels-first LayerNorm2d), and one
#: optimizer on each of the other layer mixes (BatchNorm; BatchNormAct2d with SiLU, SE and
#: hard-swish; attention with LayerNorm; windowed attention); RegNet and DeiT, the slowest
#: and a repeat of ViT, only in the whole zoo
DEFAULT = {("convnext_atto", opt) for opt in OPTIMIZERS} | {
    ("resnet10t", "KFAC"),
    ("test_efficientnet", "EKFAC"),
    ("mobilenetv3_small_050", "AdaFisher"),
    ("vit_tiny_patch16_224", "TwoLevelKFAC"),
    ("swin_tiny_patch4_window7_224", "KFAC"),
}
FULL = os.environ.get("SECONDORDER_ZOO") == "1"

CASES = [
    pytest.param(
        model,
        opt,
        id=f"{model}-{opt}",
        marks=()
        if (model, opt) in DEFAULT
        else (
            pytest.mark.zoo,
            pytest.mark.skipif(not FULL, reason="the whole zoo runs with SECONDORDER_ZOO=1"),
        ),
    )
    for model in MODELS
    for opt in OPTIMIZERS
]


def _train(model, opt_name):
    """Three steps of ``opt_name`` on ``model``; the optimizer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no curvature estimate for ..." is expected
        opt = getattr(secondorder, opt_name)(model, lr=1e-3, **OPTIMIZERS[opt_name])
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers whose hooks never ran are moved
            loss.backward(create_graph=opt_name == "AdaHessian")
            opt.step()
    return opt


@pytest.mark.parametrize(("model_name", "opt_name"), CASES)
def test_every_optimizer_trains_every_timm_family(model_name, opt_name):
    model = timm.create_model(model_name, pretrained=False, num_classes=3, **MODELS[model_name])
    if (model_name, opt_name) in KNOWN_ERRORS:
        message, way_out = KNOWN_ERRORS[model_name, opt_name]
        with pytest.raises(RuntimeError, match=message):
            _train(model, opt_name)
        model = timm.create_model(model_name, pretrained=False, num_classes=3, **MODELS[model_name])
        way_out(model)
    opt = _train(model, opt_name)
    names = {p: n for n, p in model.named_parameters()}
    for p, name in names.items():
        assert torch.isfinite(p).all(), f"{model_name}/{opt_name}: {name} is not finite"
    covered = {names[p] for p in opt.estimator.params}
    uncovered = set(opt.uncovered_parameters)
    assert covered | uncovered == set(names.values())
    assert not covered & uncovered
