"""Check ckapipe's CKA on real convolutional activations in float16/float32 against float64.

Builds two randomly initialised CNNs (torchvision ResNet-18 and ResNet-34 if torchvision is
importable, else two small CNNs defined here), captures their block outputs with forward hooks
on random images, and prints, per input dtype, max |CKA − CKA₆₄| over all layer pairs, where
CKA₆₄ is the float64 reference of bench/reference.py on exactly the values ckapipe was given.
An uncentered float32 Gram (the pytorch-cka style) is shown for contrast.

GPU session:   python bench/gpu_estimator_check.py --device cuda --images 64 --size 224
CPU smoke run: python bench/gpu_estimator_check.py --device cpu --images 16 --size 64
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import reference
import torch
from torch import nn

from ckapipe.analyze.estimators import MinibatchCKA, cka

BAR = 1e-4


def small_cnn(widths: list[int]) -> nn.Sequential:
    """Conv-BN-ReLU blocks, stride 2 every other block; outputs are post-ReLU."""
    blocks, c_in = [], 3
    for i, c_out in enumerate(widths):
        stride = 2 if i % 2 == 0 else 1
        blocks.append(
            nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            )
        )
        c_in = c_out
    return nn.Sequential(*blocks)


def build_models() -> dict[str, tuple[nn.Module, list[str]]]:
    """name → (model, names of the modules whose outputs are captured)."""
    try:
        import torchvision
    except ImportError:
        a, b = small_cnn([16, 16, 32, 32]), small_cnn([16, 32, 32, 64, 64, 64])
        return {
            "cnn4": (a, [str(i) for i in range(len(a))]),
            "cnn6": (b, [str(i) for i in range(len(b))]),
        }
    models = {}
    for name, factory in (
        ("resnet18", torchvision.models.resnet18),
        ("resnet34", torchvision.models.resnet34),
    ):
        model = factory(weights=None)
        blocks = [
            n for n, _ in model.named_modules() if n.count(".") == 1 and n.startswith("layer")
        ]
        models[name] = (model, blocks)
    return models


@torch.no_grad()
def capture(model: nn.Module, layers: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float32 block outputs (n, C, H, W), on the images' device."""
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[name].register_forward_hook(
            # cloned in the hook: a later in-place op (ReLU(inplace=True), out += identity)
            # would otherwise rewrite the kept output
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach().clone())
        )
        for name in layers
    ]
    model.eval()(images)
    for h in hooks:
        h.remove()
    return {name: outputs[name] for name in layers}


def reference64(acts_a, acts_b, batches) -> dict[str, np.ndarray]:
    """Biased, unbiased and minibatch CKA of all layer pairs in float64 (bench/reference.py),
    on exactly the values ckapipe is given."""
    xs = [v.cpu().numpy().reshape(v.shape[0], -1) for v in acts_a.values()]
    ys = [v.cpu().numpy().reshape(v.shape[0], -1) for v in acts_b.values()]
    return {
        "biased": reference.cka(xs, ys, unbiased=False),
        "unbiased": reference.cka(xs, ys),
        "minibatch": reference.minibatch_cka(xs, ys, batches),
    }


def naive_float32(xa: torch.Tensor, xb: torch.Tensor) -> float:
    """Uncentered float32 Gram, centered afterwards (what loses precision)."""
    a, b = xa.float().reshape(xa.shape[0], -1), xb.float().reshape(xb.shape[0], -1)
    n = a.shape[0]
    h = torch.eye(n, device=a.device) - 1.0 / n
    ka, kb = h @ (a @ a.T) @ h, h @ (b @ b.T) @ h
    return float((ka * kb).sum() / torch.sqrt((ka * ka).sum() * (kb * kb).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="minibatch size m for MinibatchCKA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    images = torch.randn(args.images, 3, args.size, args.size, device=device)
    (name_a, (model_a, layers_a)), (name_b, (model_b, layers_b)) = build_models().items()
    acts_a = capture(model_a.to(device), layers_a, images)
    acts_b = capture(model_b.to(device), layers_b, images)
    batches = [
        slice(s, min(s + args.batch, args.images)) for s in range(0, args.images, args.batch)
    ]
    batches = [b for b in batches if b.stop - b.start >= 4]
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"{name_a} ({len(layers_a)} blocks) vs {name_b} ({len(layers_b)} blocks), "
        f"{args.images} images {args.size}x{args.size}, minibatch m={args.batch}"
    )

    results: dict[str, dict[str, float]] = {}
    for dtype in (torch.float16, torch.float32):
        xa = {k: v.to(dtype) for k, v in acts_a.items()}
        xb = {k: v.to(dtype) for k, v in acts_b.items()}
        ref = reference64(xa, xb, batches)
        start = time.perf_counter()
        got = {
            est: np.array(
                [
                    [cka(xa[la], xb[lb], unbiased=est == "unbiased") for lb in layers_b]
                    for la in layers_a
                ]
            )
            for est in ("biased", "unbiased")
        }
        acc = MinibatchCKA(layers_a, layers_b)
        for sl in batches:
            acc.update({k: v[sl] for k, v in xa.items()}, {k: v[sl] for k, v in xb.items()})
        got["minibatch"] = acc.compute()
        elapsed = time.perf_counter() - start
        naive = np.array([[naive_float32(xa[la], xb[lb]) for lb in layers_b] for la in layers_a])
        row = {est: float(np.max(np.abs(got[est] - ref[est]))) for est in got}
        row["naive_float32_biased"] = float(np.max(np.abs(naive - ref["biased"])))
        row["ckapipe_seconds"] = elapsed
        results[str(dtype).removeprefix("torch.")] = row
        verdict = "PASS" if max(row[e] for e in got) < BAR else "FAIL"
        print(
            f"{str(dtype):14s} max|CKA-CKA64| biased {row['biased']:.2e}  unbiased {row['unbiased']:.2e}  "
            f"minibatch {row['minibatch']:.2e}  [{verdict} at {BAR:g}]  | uncentered float32 Gram "
            f"{row['naive_float32_biased']:.2e}  ({elapsed:.2f} s)"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"args": vars(args), "models": [name_a, name_b], "results": results}, fh, indent=2
            )


if __name__ == "__main__":
    main()
