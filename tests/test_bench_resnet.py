"""The benchmark's CIFAR-style ResNet-18 (bench/resnet.py): its layers, sizes and FLOP count.

bench/ is not a package; the module is loaded from its file. The FLOP count is checked against
an independent count from forward hooks on every Conv2d and Linear (output size × kernel
multiply-adds), the layer widths against the hooked output shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import load_file_module
from torch import nn

_RESNET_PY = Path(__file__).resolve().parents[1] / "bench" / "resnet.py"


def _load_resnet():
    return load_file_module(_RESNET_PY, "bench_resnet")


def _hooked_forward(net: nn.Module, x: torch.Tensor, names: list[str]):
    """(outputs of ``names``, multiply-adds per image of all conv and linear layers)."""
    modules = dict(net.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    multiply_adds = [0]

    def count(module, args, output):
        # per image: one output map (C, H, W) or vector, each value c_in/groups × k × k (or p_in)
        per_output = module.weight[0].numel()
        multiply_adds[0] += output[0].numel() * per_output

    handles = [modules[name].register_forward_hook(
        lambda mod, args, out, name=name: outputs.__setitem__(name, out.clone())
    ) for name in names]  # fmt: skip
    handles += [m.register_forward_hook(count) for m in net.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(count) for m in net.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.inference_mode():
            net(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, multiply_adds[0]


def test_resnet18_layers_widths_and_flops():
    resnet = _load_resnet()
    net = resnet.make_resnet18(0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs, multiply_adds = _hooked_forward(net, x, resnet.RESNET18_LAYERS)

    assert resnet.RESNET18_LAYERS == [
        "stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1",
        "layer3.0", "layer3.1", "layer4.0", "layer4.1",
    ]  # fmt: skip
    shapes = [tuple(outputs[name].shape[1:]) for name in resnet.RESNET18_LAYERS]
    assert (
        shapes == [(64, 32, 32)] * 3 + [(128, 16, 16)] * 2 + [(256, 8, 8)] * 2 + [(512, 4, 4)] * 2
    )
    widths = [outputs[name][0].numel() for name in resnet.RESNET18_LAYERS]
    assert resnet.resnet18_layer_widths() == widths
    # block outputs are after a ReLU
    assert all(float(outputs[name].min()) >= 0.0 for name in resnet.RESNET18_LAYERS)
    expected = 2 * multiply_adds / sum(widths)
    assert abs(resnet.resnet18_flops_per_feature() - expected) < 1e-9 * expected


def test_resnet18_seeds():
    resnet = _load_resnet()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        first, again, other = (resnet.make_resnet18(s)(x) for s in (3, 3, 4))
    assert not resnet.make_resnet18(3).training
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
