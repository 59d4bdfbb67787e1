"""Captured values are each layer's output when its forward returned, not after later in-place ops.

ResNet blocks apply ``ReLU(inplace=True)`` to a BN output and add the shortcut with
``out += identity``; an MLP applies ``ReLU(inplace=True)`` to ``fc1``. A capture that keeps a view
of the output stores relu(bn1), relu(bn2 + x), relu(fc1). The references here clone every output
inside an independent forward pass and reduce it in float64 numpy.
"""

from __future__ import annotations

import hashlib

import models
import numpy as np
import pytest
import torch
from reference import minibatch_linear_cka
from torch import nn

from ckapipe.extract.compare import compare
from ckapipe.extract.extraction import extract_activations

N = 32
BATCH = 8


# -- models ---------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """Stem conv/bn/relu(inplace), two residual blocks (the second downsamples), pool, fc."""

    def __init__(self, block: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        if block == "basic":
            self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 12, stride=2))
        else:
            self.layer1 = nn.Sequential(Bottleneck(8, 4, 8), Bottleneck(8, 4, 12, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)
        # eval-mode BN with non-trivial statistics, so bn outputs are not just scaled conv outputs
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.data = torch.rand(c, generator=generator) + 0.5
                module.bias.data = torch.randn(c, generator=generator)
                module.running_mean = torch.randn(c, generator=generator)
                module.running_var = torch.rand(c, generator=generator) + 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class InplaceMLP(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(12, 16)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


class PairOut(nn.Module):
    """Returns ``(linear(x), x.sum())``: a tuple whose element 0 is per-sample."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), x.sum()


class DictOut(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.linear(x)}


class TokenNet(nn.Module):
    """(B, T, D) tokens; every captured output is rewritten in place afterwards.

    ``proj`` gets a residual ``+=``, the tuple and dict outputs an in-place ReLU / add, and
    ``shared`` runs twice (``shared@0`` is tanh'ed in place before ``shared@1`` runs).
    """

    def __init__(self, d: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)
        self.pair = PairOut(d)
        self.shared = nn.Linear(d, d)
        self.dict = DictOut(d)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h += self.mlp(h)
        h, _ = self.pair(h)
        h.relu_()
        h = self.shared(h)
        h.tanh_()
        h = self.shared(h)
        h.mul_(3.0)
        h = self.dict(h)["hidden"]
        h.add_(1.0)
        return h * attention_mask.unsqueeze(-1)


class TokenData(torch.utils.data.Dataset):
    """Dict items ``x`` (T, D) and ``attention_mask`` (T,) with right padding."""

    def __init__(self, n: int = N, length: int = 5, d: int = 6, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.x = torch.from_numpy(rng.standard_normal((n, length, d)).astype(np.float32))
        lengths = rng.integers(2, length + 1, size=n)
        self.mask = torch.from_numpy((np.arange(length)[None] < lengths[:, None]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "attention_mask": self.mask[index]}


RESNET_LAYERS = [
    "conv1",
    "bn1",
    "layer1.0.conv1",
    "layer1.0.bn1",
    "layer1.0.conv2",
    "layer1.0.bn2",
    "layer1.0",
    "layer1.1.bn1",
    "layer1.1.bn2",
    "layer1.1.downsample.1",
]
BOTTLENECK_LAYERS = [
    *RESNET_LAYERS,
    "layer1.0.conv3",
    "layer1.0.bn3",
    "layer1.1.bn3",
]
TOKEN_LAYERS = ["proj", "pair", "shared@0", "shared@1", "dict"]


def make_case(case: str) -> tuple[nn.Module, torch.utils.data.Dataset, list[str]]:
    if case == "basic":
        return TinyResNet("basic"), models.image_dataset(N), RESNET_LAYERS
    if case == "bottleneck":
        return TinyResNet("bottleneck"), models.image_dataset(N), BOTTLENECK_LAYERS
    return InplaceMLP(), models.vector_dataset(N), ["fc1", "fc2"]


# -- independent reference ------------------------------------------------------------------------
def reference_outputs(
    net: nn.Module, loader: torch.utils.data.DataLoader, layers: list[str]
) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray | None]]:
    """Per batch, each layer's raw output cloned inside its hook (``name@K``: the K-th call)."""
    modules = dict(net.named_modules())
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(module: nn.Module, args: object, output: object, name: str) -> None:
        if isinstance(output, tuple):
            output = output[0]
        elif isinstance(output, dict):
            output = output["hidden"]
        seen.setdefault(name, []).append(output.detach().clone())

    module_names = list(dict.fromkeys(layer.split("@")[0] for layer in layers))
    handles = [
        modules[name].register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
        for name in module_names
    ]
    per_layer: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    masks: list[np.ndarray | None] = []
    try:
        net.eval()
        with torch.no_grad():
            for batch in loader:
                seen.clear()
                if isinstance(batch, dict):
                    net(**batch)
                    masks.append(batch["attention_mask"].double().numpy())
                else:
                    net(batch[0] if isinstance(batch, list) else batch)
                    masks.append(None)
                for layer in layers:
                    name, _, call = layer.partition("@")
                    per_layer[layer].append(seen[name][int(call or 0)].double().numpy())
    finally:
        for handle in handles:
            handle.remove()
    return per_layer, masks


def reduce64(values: np.ndarray, reduction: str, mask: np.ndarray | None) -> np.ndarray:
    if reduction == "flatten" or values.ndim == 2 and reduction == "mean":
        return values.reshape(values.shape[0], -1)
    if reduction == "mean":
        return values.mean(axis=1 if values.ndim == 3 else tuple(range(2, values.ndim)))
    if reduction == "cls":
        return values[:, 0, :]
    weights = mask[:, :, None]
    return (values * weights).sum(axis=1) / weights.sum(axis=1)


def reference_features(
    net: nn.Module, data: torch.utils.data.Dataset, layers: list[str], reduction: str
) -> dict[str, np.ndarray]:
    """(n, p) float64 features per layer, rows in dataset order."""
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    per_layer, masks = reference_outputs(net, loader, layers)
    return {
        layer: np.concatenate(
            [reduce64(v, reduction, m) for v, m in zip(batches, masks, strict=True)]
        )
        for layer, batches in per_layer.items()
    }


def stored_features(store, name: str) -> np.ndarray:
    """Rows of ``name`` in dataset order (the store holds them in sample_ids order)."""
    values = np.asarray(store.read(name), dtype=np.float64)
    result = np.empty_like(values)
    result[store.sample_ids] = values
    return result


def extract(tmp_path, net, data, layers, device="cpu", **options):
    return extract_activations(
        net,
        data,
        layers=layers,
        out=tmp_path / "store",
        batch_size=BATCH,
        dtype="float32",
        device=device,
        progress=False,
        **options,
    )


def assert_stored_match(store, expected: dict[str, np.ndarray]) -> None:
    assert store.layer_names == list(expected)
    for name, reference in expected.items():
        np.testing.assert_allclose(
            stored_features(store, name),
            reference,
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"layer {name}: stored values differ from its output at capture time",
        )


def assert_compare_matches(result, expected: dict[str, np.ndarray]) -> None:
    layers = list(expected)
    reference = np.array(
        [[minibatch_linear_cka(expected[a], expected[b], BATCH) for b in layers] for a in layers]
    )
    np.testing.assert_allclose(result.cka, reference, rtol=1e-5, atol=1e-7)


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["basic", "bottleneck", "mlp"])
def test_extraction_stores_outputs_before_inplace_ops(tmp_path, case):
    net, data, layers = make_case(case)
    expected = reference_features(net, data, layers, "flatten")
    store = extract(tmp_path, net, data, layers, order="dataset")
    assert_stored_match(store, expected)


@pytest.mark.parametrize("case", ["basic", "mlp"])
def test_extraction_mean_of_inplace_followed_layers(tmp_path, case):
    # a (B, D) output is kept as is by 'mean', so it must be copied like 'flatten'
    reduction = "mean"
    net, data, layers = make_case(case)
    expected = reference_features(net, data, layers, reduction)
    store = extract(tmp_path, net, data, layers, reduce=reduction)
    assert_stored_match(store, expected)


@pytest.mark.parametrize("reduction", ["flatten", "cls", "mean", "masked_mean"])
def test_token_outputs_tuple_dict_and_repeated_calls(tmp_path, reduction):
    net, data = TokenNet(), TokenData()
    expected = reference_features(net, data, TOKEN_LAYERS, reduction)
    store = extract(tmp_path, net, data, TOKEN_LAYERS, reduce=reduction, output_key="hidden")
    assert_stored_match(store, expected)


@pytest.mark.parametrize(
    ("case", "reduction"),
    [("basic", "flatten"), ("bottleneck", "flatten"), ("mlp", "flatten"), ("mlp", "mean")],
)
def test_compare_uses_outputs_before_inplace_ops(case, reduction):
    net, data, layers = make_case(case)
    expected = reference_features(net, data, layers, reduction)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    result = compare(net, None, loader, layers_a=layers, reduce=reduction, device="cpu")
    assert_compare_matches(result, expected)


def test_compare_token_outputs_cls():
    net, data = TokenNet(), TokenData()
    expected = reference_features(net, data, TOKEN_LAYERS, "cls")
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    result = compare(
        net, None, loader, layers_a=TOKEN_LAYERS, reduce="cls", output_key="hidden", device="cpu"
    )
    assert_compare_matches(result, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["basic", "bottleneck", "mlp"])
def test_cuda_extraction_and_compare_before_inplace_ops(tmp_path, case):
    net, data, layers = make_case(case)
    expected = reference_features(net, data, layers, "flatten")
    store = extract(tmp_path, net, data, layers, device="cuda")
    # cuDNN (TF32) convolutions differ from the CPU reference by ~1e-3; the in-place
    # rewrites this guards against change values by O(1)
    for name, reference in expected.items():
        np.testing.assert_allclose(
            stored_features(store, name), reference, rtol=2e-2, atol=2e-2, err_msg=name
        )
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    result = compare(net, None, loader, layers_a=layers, device="cuda")
    layers_ = list(expected)
    reference = np.array(
        [[minibatch_linear_cka(expected[a], expected[b], BATCH) for b in layers_] for a in layers_]
    )
    np.testing.assert_allclose(result.cka, reference, rtol=1e-2, atol=1e-3)


class InputNormalizer(nn.Module):
    """Normalizes its input in place, as some preprocessing-in-the-model code does."""

    def __init__(self, features: int):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.5).mul_(2.0)
        return self.fc(x)


def test_input_fingerprint_is_of_the_input_before_the_model_rewrites_it(tmp_path):
    # rows large enough that hashing (in threads, while the model runs) is still going on when
    # the model rewrites its input
    features = 2**18
    inputs = torch.from_numpy(
        np.random.default_rng(3).standard_normal((32, features)).astype(np.float32)
    )
    data = torch.utils.data.TensorDataset(inputs)
    store = extract_activations(
        InputNormalizer(features),
        data,
        layers=["fc"],
        out=tmp_path / "store",
        batch_size=16,
        dtype="float32",
        device="cpu",
        order="dataset",
        progress=False,
    )
    state = bytes(32)
    for row in inputs:
        digest = hashlib.sha256(f"|{row.dtype}|{tuple(row.shape)}|".encode())
        digest.update(row.numpy().tobytes())
        state = hashlib.sha256(state + digest.digest()).digest()
    assert store.attrs["input_sha256"] == state.hex()
