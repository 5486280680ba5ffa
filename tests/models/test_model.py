"""DMoEClassifier: shapes, per-layer routing, gradients, batch independence, learning."""

from __future__ import annotations

import math

import pytest
import torch

from dmoe_torch.models import DMoEClassifier
from dmoe_torch.moe import RouterSpec, perfect_costs

K, N = 4, 4


def small_model(in_channels=1, image_size=28, layers=2, seed=0) -> DMoEClassifier:
    torch.manual_seed(seed)
    return DMoEClassifier(in_channels, 10, image_size, d_model=32, num_experts=K, num_moe_layers=layers)


def images(batch, in_channels=1, size=28, seed=1):
    return torch.randn(batch, in_channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("in_channels, size", [(1, 28), (3, 32)])
def test_forward_shapes_and_per_layer_outputs(in_channels, size):
    model = small_model(in_channels, size, layers=3)
    B = 6
    costs = [perfect_costs(B, K, N) for _ in range(3)]
    specs = [RouterSpec("topk", k=1), RouterSpec("topk", k=2), RouterSpec("dense")]
    out = model(images(B, in_channels, size), costs, specs)
    assert out.logits.shape == (B, 10)
    assert out.aux_loss.dim() == 0
    assert len(out.layer_metrics) == len(out.selections) == 3
    # Each layer followed its own spec.
    assert [int(s.mask.sum(1).max()) for s in out.selections] == [1, 2, K]
    assert out.layer_metrics[1]["experts_per_input"].item() == 2.0


def test_aux_loss_is_mean_over_layers():
    model = small_model()
    B = 8
    x = images(B)
    costs = [perfect_costs(B, K, N)] * 2
    specs = [RouterSpec("topk", k=1), RouterSpec("topk", k=2)]
    out = model(x, costs, specs)
    h = model.stem(x)
    per_layer = []
    for layer, c, spec in zip(model.moe_layers, costs, specs, strict=True):
        result = layer(h, c, spec)
        per_layer.append(result.aux_loss)
        h = result.out
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).mean())


def test_gradients_reach_stem_gates_and_used_experts_only():
    model = small_model()
    B = 16
    # Layer 0: random link energies, every link of expert 3 in outage: channel_topk never selects it.
    costs0 = torch.rand(B, K, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    costs0[:, 3, :] = math.inf
    out = model(images(B), [costs0, perfect_costs(B, K, N)], [RouterSpec("channel_topk", k=2), RouterSpec("topk", k=2)])
    loss = torch.nn.functional.cross_entropy(out.logits, torch.arange(B) % 10) + 0.01 * out.aux_loss
    loss.backward()
    assert not out.selections[0].mask[:, 3].any()
    for layer_index, (layer, selection) in enumerate(zip(model.moe_layers, out.selections, strict=True)):
        for k, expert in enumerate(layer.experts):
            used = bool(selection.mask[:, k].any())
            for name, p in expert.named_parameters():
                where = f"layer {layer_index} expert {k} {name}"
                assert (p.grad is not None) == used, where
                assert not used or torch.isfinite(p.grad).all(), where
        assert layer.gate.weight.grad.abs().sum() > 0
    for p in list(model.stem.parameters()) + list(model.head.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_eval_output_of_a_row_does_not_depend_on_the_batch():
    model = small_model().eval()
    B = 10
    x = images(B)
    costs = [perfect_costs(B, K, N) for _ in range(2)]
    costs[0][::3, 0, 0] = math.inf  # some failed links for the channel-blind topk
    specs = [RouterSpec("topk", k=2)] * 2
    with torch.no_grad():
        whole = model(x, costs, specs).logits
        singles = torch.cat([model(x[b : b + 1], [c[b : b + 1] for c in costs], specs).logits for b in range(B)])
    torch.testing.assert_close(whole, singles, rtol=1e-5, atol=1e-5)


@pytest.fixture
def single_thread():
    # Tiny ops: one thread avoids OpenMP contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_model_fits_a_fixed_batch(single_thread):
    model = small_model(image_size=12)  # small images keep the 30 steps cheap
    B = 32
    x = images(B, size=12)
    y = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(3))
    costs = [perfect_costs(B, K, N)] * 2
    specs = [RouterSpec("topk", k=2)] * 2
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(x, costs, specs)
        loss = torch.nn.functional.cross_entropy(out.logits, y)
        optimiser.zero_grad()
        (loss + 0.01 * out.aux_loss).backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_forward_rejects_wrong_number_of_layers():
    model = small_model()
    costs = [perfect_costs(2, K, N)]
    with pytest.raises(ValueError, match="costs"):
        model(images(2), costs, [RouterSpec("topk")] * 2)
    with pytest.raises(ValueError, match="specs"):
        model(images(2), costs * 2, [RouterSpec("topk")])


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="model.num_moe_layers"):
        DMoEClassifier(1, 10, 28, num_moe_layers=0)
    with pytest.raises(ValueError, match="model.num_experts"):
        DMoEClassifier(1, 10, 28, num_experts=0)
