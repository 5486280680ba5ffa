"""The token-level model (model=vmoe): token routing, equivalence to a dense block, batch
independence of evaluation, the `none` policy, bad configs, and the entry points end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.channel.links import frame_ids, layer_costs
from dmoe_torch.config import ConfigError, validate_model, validate_router
from dmoe_torch.engine.evaluation import evaluate
from dmoe_torch.models.vmoe import VMoEClassifier
from dmoe_torch.moe import RouterSpec, perfect_costs

K, N = 4, 4


def tiny(num_experts=K, seed=0, **kw) -> VMoEClassifier:
    torch.manual_seed(seed)
    args = dict(d_model=16, num_experts=num_experts, depth=4, moe_every=2, num_heads=2, patch_size=7, stem="linear")
    args.update(kw)
    return VMoEClassifier(1, 10, 28, **args)


def images(batch, seed=1):
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_moe_blocks_route_every_token_of_every_image():
    model = tiny(class_token=True)
    B, T = 3, model.tokens_per_input
    assert T == 16 + 1 and model.moe_block_ids == [1, 3] and model.num_moe_layers == 2
    costs = [perfect_costs(B * T, K, N) for _ in range(2)]
    out = model(images(B), costs, [RouterSpec("topk", k=1), RouterSpec("topk", k=2)])
    assert out.logits.shape == (B, 10)
    assert [s.mask.shape for s in out.selections] == [(B * T, K)] * 2
    assert [int(s.mask.sum()) for s in out.selections] == [B * T, 2 * B * T]


def test_frame_ids_are_sample_then_token():
    assert frame_ids(torch.tensor([5, 0]), 3).tolist() == [15, 16, 17, 0, 1, 2]


def test_token_channel_draws_are_keyed_by_sample_and_token():
    channel = WirelessChannel(ChannelConfig(num_subcarriers=N), K, 16, seed=0)
    T = 16
    together = layer_costs(channel, torch.tensor([7, 3]), 2, stream=5, tokens_per_input=T)
    alone = layer_costs(channel, torch.tensor([3]), 2, stream=5, tokens_per_input=T)
    for layer in range(2):
        assert torch.equal(together[layer][T:], alone[layer])  # image 3's tokens, wherever it sits
        assert not torch.equal(together[layer][:T], together[layer][T:])
    assert not torch.equal(together[0], together[1])  # each MoE layer has its own draw


def test_one_expert_moe_block_equals_dense_mlp_block():
    """K = 1 with a perfect channel: every token goes to the single expert with weight 1, so
    the model equals the same weights with dense MLP blocks (outputs and gradients)."""
    moe_model = tiny(num_experts=1)
    dense_model = copy.deepcopy(moe_model)
    for block_id in dense_model.moe_block_ids:
        block = dense_model.blocks[block_id]
        block.mlp, block.moe = block.moe.experts[0], None
    dense_model.moe_block_ids, dense_model.num_moe_layers = [], 0
    x, y = images(5), torch.arange(5)
    T = moe_model.tokens_per_input
    out = moe_model(x, [perfect_costs(5 * T, 1, 1)] * 2, [RouterSpec("topk", k=1)] * 2)
    # The dense copy has no MoE block; run its forward by hand (no routing inputs needed).
    h = dense_model.patch_embed(dense_model.stem(x)).flatten(2).transpose(1, 2) + dense_model.pos_embed
    for block in dense_model.blocks:
        h = block(h)
    dense_logits = dense_model.head(dense_model.norm(h).mean(1))
    torch.testing.assert_close(out.logits, dense_logits, rtol=1e-5, atol=1e-6)
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    torch.nn.functional.cross_entropy(dense_logits, y).backward()
    moe_grads = dict(moe_model.named_parameters())
    for name, param in dense_model.named_parameters():
        moe_name = name
        for block_id in moe_model.moe_block_ids:
            moe_name = moe_name.replace(f"blocks.{block_id}.mlp.", f"blocks.{block_id}.moe.experts.0.")
        torch.testing.assert_close(moe_grads[moe_name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The gate gets no gradient from a single expert (its weight is always 1).
    assert all(p.grad is None or not p.grad.any() for n, p in moe_model.named_parameters() if ".gate." in n)


def _loader(x, y, batch_size):
    ids = torch.arange(len(x))
    return [(x[i : i + batch_size], y[i : i + batch_size], ids[i : i + batch_size]) for i in range(0, len(x), batch_size)]


@pytest.mark.parametrize("policy", ["topk", "des", "jesa", "none"])
def test_evaluation_is_identical_for_batch_sizes_50_and_100(policy):
    model = tiny(num_experts=K).eval()
    channel = WirelessChannel(ChannelConfig(num_subcarriers=K), K, 16, seed=3)
    x, y = images(100, seed=4), torch.randint(0, 10, (100,), generator=torch.Generator().manual_seed(5))
    specs = [RouterSpec(policy, gamma=0.8, k=2, failure_energy=channel.failure_energy_j)] * 2
    results = [
        evaluate(model, _loader(x, y, bs), channel=channel, specs=specs, stream=1, device=torch.device("cpu")) for bs in (50, 100)
    ]
    assert results[0] == results[1]
    if policy == "none":
        assert results[0]["energy_uj"] == 0.0 and results[0]["experts_per_token"] == 0.0
        assert results[0]["drop_rate"] == 1.0
    else:
        assert results[0]["energy_uj"] > 0
        # per image = per token x tokens, summed over the two layers
        assert math.isclose(results[0]["energy_uj"], 16 * results[0]["energy_per_token_uj"])
        assert math.isclose(results[0]["energy_uj"], sum(layer["energy_uj"] for layer in results[0]["layers"]))


def test_none_bypasses_every_moe_block():
    model = tiny().eval()
    T = model.tokens_per_input
    costs = [perfect_costs(2 * T, K, N)] * 2
    out = model(images(2), costs, [RouterSpec("none")] * 2)
    assert all(int(s.mask.sum()) == 0 and float(s.energy.sum()) == 0.0 for s in out.selections)
    # Bypassing = the experts' outputs are zero: scaling every expert's last layer by 0 and
    # routing top-2 gives the same logits.
    silent = copy.deepcopy(model)
    for layer in silent.moe_layers:
        for expert in layer.experts:
            expert.fc2.weight.data.zero_()
            expert.fc2.bias.data.zero_()
    torch.testing.assert_close(out.logits, silent(images(2), costs, [RouterSpec("topk", k=2)] * 2).logits)


@pytest.mark.parametrize("stem, stem_convs", [("linear", 0), ("conv", 1), ("conv2", 2)])
def test_every_stem_gives_the_same_tokens(stem, stem_convs):
    model = tiny(stem=stem, patch_size=4)
    convs = [m for m in model.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == stem_convs and model.tokens_per_input == 49
    embedded = model.patch_embed(model.stem(images(2)))
    assert embedded.shape == (2, 16, 7, 7)  # d_model channels on the 7x7 token grid
    if stem == "conv2":
        assert convs[1].stride == (2, 2) and model.patch_embed.kernel_size == (2, 2)


VMOE = dict(
    name="vmoe",
    d_model=64,
    num_experts=8,
    depth=6,
    moe_every=2,
    num_heads=4,
    patch_size=4,
    hidden_mult=2,
    class_token=False,
    stem="conv",
)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(patch_size=5), "model.patch_size=5: must divide the image size 28"),
        (dict(moe_every=7), "model.moe_every=7: must be an integer"),
        (dict(num_heads=5), "model.num_heads=5: must divide model.d_model=64"),
        (dict(stem="resnet"), "model.stem='resnet': must be one of conv, conv2, linear"),
        (dict(stem="conv2", patch_size=7), "model.patch_size=7: must be even with model.stem=conv2"),
        (dict(num_moe_layers=2), "model.num_moe_layers: unknown key"),
    ],
)
def test_bad_model_config_names_the_key(override, message):
    cfg = OmegaConf.create({"data": {"name": "fashion_mnist"}, "model": {**VMOE, **override}})
    with pytest.raises(ConfigError) as info:
        validate_model(cfg)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_gamma_list_must_have_one_value_per_moe_block():
    cfg = OmegaConf.create(
        {
            "data": {"name": "fashion_mnist"},
            "model": VMOE,
            "router": {"policy": "jesa", "k": 2, "gamma": [0.9, 0.5], "k_min": 1, "k_max": None},
        }
    )
    shape = validate_model(cfg)
    assert shape.num_moe_layers == 3
    with pytest.raises(ConfigError, match=r"router.gamma=\[0.9, 0.5\]: has 2 values for 3 MoE layers"):
        validate_router(cfg, "router", shape, num_subcarriers=16)
    cfg.router.gamma = [0.9, 0.5, 0.3]
    assert validate_router(cfg, "router", shape, num_subcarriers=16)["gamma"] == [0.9, 0.5, 0.3]
