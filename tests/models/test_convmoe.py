"""The default token model (model=convmoe): every position of the stem's feature map is a
routed token, tokens go back to their own positions, `none` bypasses the experts, evaluation
does not depend on the batch size, bad configs, and the entry points end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.config import ConfigError, validate_model
from dmoe_torch.engine.evaluation import evaluate
from dmoe_torch.models.convmoe import ConvMoEClassifier
from dmoe_torch.moe import RouterSpec, perfect_costs

K, N = 4, 4


def tiny(num_experts=K, seed=0, **kw) -> ConvMoEClassifier:
    torch.manual_seed(seed)
    return ConvMoEClassifier(1, 10, 28, **{"d_model": 16, "num_experts": num_experts, "depth": 2, **kw})


def images(batch, seed=1):
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_every_position_of_the_feature_map_is_a_routed_token():
    model = tiny().eval()
    B, T = 3, model.tokens_per_input
    assert T == 49 and model.num_moe_layers == 2
    out = model(images(B), [perfect_costs(B * T, K, N)] * 2, [RouterSpec("topk", k=1), RouterSpec("topk", k=2)])
    assert out.logits.shape == (B, 10)
    assert [s.mask.shape for s in out.selections] == [(B * T, K)] * 2
    assert [int(s.mask.sum()) for s in out.selections] == [B * T, 2 * B * T]


def test_a_token_returns_to_its_own_position():
    """Only token t = 19 of image 1 can reach an expert in the first MoE layer (every other
    link is in outage): the feature map after that layer differs from the one before it at
    row 19 // 7, column 19 % 7 of image 1 only."""
    model = tiny().eval()
    B, T, t = 2, model.tokens_per_input, 19
    costs = torch.full((B * T, K, N), math.inf, dtype=torch.float64)
    costs[1 * T + t] = 0.0
    seen = {}
    model.mixers[0].register_forward_hook(lambda m, inputs, out: seen.__setitem__("before", out.detach().clone()))
    model.mixers[1].register_forward_pre_hook(lambda m, inputs: seen.__setitem__("after", inputs[0].detach().clone()))
    out = model(images(B), [costs, perfect_costs(B * T, K, N)], [RouterSpec("topk", k=2)] * 2)
    selection = out.selections[0]
    effective = selection.mask & ~selection.failed  # topk ignores the channel: its other links fail
    assert effective.any(1).nonzero().flatten().tolist() == [1 * T + t]
    changed = (seen["after"] != seen["before"]).any(dim=1)  # [B, 7, 7]
    expected = torch.zeros_like(changed)
    expected[1, t // 7, t % 7] = True
    assert torch.equal(changed, expected)


def test_none_bypasses_every_moe_layer():
    model = tiny().eval()
    T = model.tokens_per_input
    costs = [perfect_costs(2 * T, K, N)] * 2
    out = model(images(2), costs, [RouterSpec("none")] * 2)
    assert all(int(s.mask.sum()) == 0 and float(s.energy.sum()) == 0.0 for s in out.selections)
    silent = copy.deepcopy(model)  # experts whose output is zero: top-2 then gives the same logits
    for layer in silent.moe_layers:
        for expert in layer.experts:
            expert.fc2.weight.data.zero_()
            expert.fc2.bias.data.zero_()
    torch.testing.assert_close(out.logits, silent(images(2), costs, [RouterSpec("topk", k=2)] * 2).logits)
    assert not torch.allclose(out.logits, model(images(2), costs, [RouterSpec("topk", k=2)] * 2).logits)


def _loader(x, y, batch_size):
    ids = torch.arange(len(x))
    return [(x[i : i + batch_size], y[i : i + batch_size], ids[i : i + batch_size]) for i in range(0, len(x), batch_size)]


@pytest.mark.parametrize("policy", ["topk", "jesa"])
def test_evaluation_is_identical_for_batch_sizes_25_and_50(policy):
    model = tiny().eval()
    channel = WirelessChannel(ChannelConfig(num_subcarriers=N), K, 16, seed=3)
    x, y = images(50, seed=4), torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(5))
    specs = [RouterSpec(policy, gamma=0.8, k=2, failure_energy=channel.failure_energy_j)] * 2
    results = [
        evaluate(model, _loader(x, y, bs), channel=channel, specs=specs, stream=1, device=torch.device("cpu")) for bs in (25, 50)
    ]
    # The convolutions may round differently with another batch size (oneDNN picks kernels by
    # shape): the loss agrees to float32 precision, everything the router decided exactly.
    assert math.isclose(results[0].pop("loss"), results[1].pop("loss"), rel_tol=1e-6)
    assert results[0] == results[1]
    assert math.isclose(results[0]["energy_uj"], 49 * results[0]["energy_per_token_uj"])


CONVMOE = dict(name="convmoe", d_model=64, num_experts=8, depth=2, hidden_mult=2, kernel_size=3, link_dropout=0.3)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(kernel_size=4), "model.kernel_size=4: must be odd"),
        (dict(depth=0), "model.depth=0: must be"),
        (dict(patch_size=4), "model.patch_size: unknown key"),
    ],
)
def test_bad_model_config_names_the_key(override, message):
    cfg = OmegaConf.create({"data": {"name": "fashion_mnist"}, "model": {**CONVMOE, **override}})
    with pytest.raises(ConfigError) as info:
        validate_model(cfg)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_reports_the_router_z_loss_of_its_layers():
    """train.z_loss_coef > 0 needs the model's z-loss: the mean over layers of each gate's
    mean logsumexp(logits)^2, differentiable in the gates."""
    from dmoe_torch.moe import router_z_loss

    model = tiny().eval()
    T = model.tokens_per_input
    gate_logits = []
    for layer in model.moe_layers:
        layer.gate.register_forward_hook(lambda m, inputs, out: gate_logits.append(out))
    out = model(images(2), [perfect_costs(2 * T, K, N)] * 2, [RouterSpec("topk", k=2)] * 2)
    expected = torch.stack([router_z_loss(logits) for logits in gate_logits]).mean()
    torch.testing.assert_close(out.z_loss, expected)
    out.z_loss.backward()
    assert all(layer.gate.weight.grad.abs().sum() > 0 for layer in model.moe_layers)
