"""MoE layer: equivalence with dense MLPs, dispatch, failed links, balance loss, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from dmoe_torch.moe import (
    METRIC_WEIGHTS,
    Expert,
    MetricAverager,
    MoELayer,
    RouterSpec,
    load_balancing_loss,
    perfect_costs,
)

D = 16


def make_layer(num_experts: int, seed: int = 0, dtype=torch.float64) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(D, num_experts, hidden_mult=2).to(dtype)


def random_h(batch: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, D, generator=g, dtype=dtype)


def static_outage_costs(batch: int, num_experts: int, outage: torch.Tensor) -> torch.Tensor:
    """Costs [B, K, K] of random finite energies with the static link of expert k (subcarrier
    k) in outage wherever outage[b, k] is True."""
    g = torch.Generator().manual_seed(7)
    costs = torch.rand(batch, num_experts, num_experts, generator=g, dtype=torch.float64) * 1e-4
    diagonal = torch.arange(num_experts)
    static = costs[:, diagonal, diagonal]
    costs[:, diagonal, diagonal] = torch.where(outage, torch.full_like(static, math.inf), static)
    return costs


def reference_output(layer: MoELayer, h: torch.Tensor, effective: torch.Tensor) -> torch.Tensor:
    """h + sum_{k in S'} s_k / sum_{j in S'} s_j f_k(h), written densely row by row."""
    scores = torch.softmax(layer.gate(h), dim=-1)
    rows = []
    for b in range(h.shape[0]):
        chosen = effective[b].nonzero().flatten().tolist()
        row = h[b]
        if chosen:
            norm = scores[b, chosen].sum()
            for k in chosen:
                row = row + scores[b, k] / norm * layer.experts[k](h[b : b + 1])[0]
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("spec", [RouterSpec("dense"), RouterSpec("topk", k=1)], ids=["dense", "topk1"])
def test_single_expert_equals_residual_mlp_outputs_and_gradients(spec):
    layer = make_layer(1)
    reference = Expert(D, hidden_mult=2).to(torch.float64)
    reference.load_state_dict(layer.experts[0].state_dict())
    h = random_h(12).requires_grad_(True)
    h_ref = h.detach().clone().requires_grad_(True)
    upstream = random_h(12, seed=3)

    result = layer(h, perfect_costs(12, 1, 1), spec)
    expected = h_ref + reference(h_ref)
    torch.testing.assert_close(result.out, expected, rtol=0, atol=1e-12)

    (result.out * upstream).sum().add(result.aux_loss).backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=0, atol=1e-12)
    for (name, p), p_ref in zip(layer.experts[0].named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-12, msg=name)
    # One expert always gets weight 1: the gate has nothing to learn.
    assert torch.count_nonzero(layer.gate.weight.grad) == 0
    assert result.aux_loss.item() == pytest.approx(1.0)


def test_topk_with_all_experts_equals_dense_mixture():
    K = 4
    layer = make_layer(K)
    h = random_h(10)
    costs = perfect_costs(10, K, K)
    topk = layer(h, costs, RouterSpec("topk", k=K))
    dense = layer(h, costs, RouterSpec("dense"))
    torch.testing.assert_close(topk.out, dense.out, rtol=0, atol=1e-12)
    # ... and both are the dense mixture h + sum_k s_k f_k(h) (weights need no renormalising).
    scores = torch.softmax(layer.gate(h), dim=-1)
    mixture = h + sum(scores[:, k : k + 1] * layer.experts[k](h) for k in range(K))
    torch.testing.assert_close(dense.out, mixture, rtol=0, atol=1e-12)
    assert dense.metrics["experts_per_input"].item() == K


def test_balance_loss_matches_hand_computation():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, False]])
    # f = (1, 2, 0) / 3 slots; P = (0.4, 0.4, 0.2); loss = 3 * (0.4/3 + 0.8/3) = 1.2
    loss = load_balancing_loss(scores, mask)
    assert loss.item() == pytest.approx(1.2)
    loss.backward()
    # d loss / d s_{b,k} = K f_k / B
    expected_grad = torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64).expand(2, 3) * 3 / 2
    torch.testing.assert_close(scores.grad, expected_grad)


def test_balance_loss_is_one_when_balanced_and_larger_when_not():
    K = 4
    uniform = torch.full((8, K), 1 / K)
    balanced_mask = torch.eye(K, dtype=torch.bool).repeat(2, 1)  # each expert: 2 of 8 slots
    assert load_balancing_loss(uniform, balanced_mask).item() == pytest.approx(1.0)

    peaked = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(8, K)
    collapsed_mask = torch.zeros(8, K, dtype=torch.bool)
    collapsed_mask[:, 0] = True
    imbalanced = load_balancing_loss(peaked, collapsed_mask).item()
    assert imbalanced == pytest.approx(K * 0.7)
    assert imbalanced > 1.0


def test_layer_aux_loss_uses_full_softmax_and_selection_mask():
    layer = make_layer(6)
    h = random_h(20)
    result = layer(h, perfect_costs(20, 6, 6), RouterSpec("topk", k=2))
    scores = torch.softmax(layer.gate(h), dim=-1)
    torch.testing.assert_close(result.aux_loss, load_balancing_loss(scores, result.selection.mask))


def test_random_routing_is_deterministic_for_a_seed():
    layer = make_layer(8)
    h = random_h(64)
    costs = perfect_costs(64, 8, 8)
    spec = RouterSpec("random_topk", k=2)

    def run(seed):
        return layer(h, costs, spec, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first.selection.mask, again.selection.mask)
    assert torch.equal(first.out, again.out)
    assert not torch.equal(first.selection.mask, other.selection.mask)


def test_experts_run_only_on_routed_rows():
    K, B = 6, 40
    layer = make_layer(K)
    h = random_h(B)
    outage = torch.rand(B, K, generator=torch.Generator().manual_seed(2)) < 0.3
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        expert.register_forward_hook(lambda module, args, output, k=k: seen.__setitem__(k, args[0].detach()))
        for k, expert in enumerate(layer.experts)
    ]
    try:
        result = layer(h, static_outage_costs(B, K, outage), RouterSpec("topk", k=3))
    finally:
        for hook in hooks:
            hook.remove()
    effective = result.selection.mask & ~result.selection.failed
    assert result.selection.failed.any(), "the instance should contain failed links"
    for k in range(K):
        if effective[:, k].any():
            torch.testing.assert_close(seen[k], h[effective[:, k]], rtol=0, atol=0)
        else:
            assert k not in seen
    assert sum(len(rows) for rows in seen.values()) == int(effective.sum())


def test_failed_link_contributes_nothing_and_weights_renormalise():
    K, B = 4, 16
    layer = make_layer(K)
    h = random_h(B)
    scores = torch.softmax(layer.gate(h), dim=-1)
    top2 = scores.topk(2, dim=1).indices
    # In even rows the best expert's static link is in outage.
    outage = torch.zeros(B, K, dtype=torch.bool)
    outage[0::2].scatter_(1, top2[0::2, :1], True)
    failure_energy = 3e-4
    result = layer(h, static_outage_costs(B, K, outage), RouterSpec("topk", k=2, failure_energy=failure_energy))
    sel = result.selection
    assert torch.equal(sel.failed, outage)
    expected = h.clone()
    for b in range(B):
        survivors = [k for k in top2[b].tolist() if not outage[b, k]]
        weights = scores[b, survivors] / scores[b, survivors].sum()
        for w, k in zip(weights, survivors, strict=True):
            expected[b] += w * layer.experts[k](h[b : b + 1])[0]
    torch.testing.assert_close(result.out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.out, reference_output(layer, h, sel.mask & ~sel.failed), rtol=0, atol=1e-12)
    # The failed attempt's energy is counted.
    assert (sel.energy[0::2] >= failure_energy).all()
    assert result.metrics["outage_rate"].item() == pytest.approx((B // 2) / (2 * B))
    assert result.metrics["experts_per_input"].item() == pytest.approx(1.5)


@pytest.mark.parametrize("policy", ["topk", "channel_topk", "dense", "des"])
def test_all_unreachable_batch_passes_input_through(policy):
    K, B = 4, 8
    layer = make_layer(K, dtype=torch.float32)
    h = random_h(B, dtype=torch.float32).requires_grad_(True)
    costs = torch.full((B, K, K), math.inf, dtype=torch.float64)
    result = layer(h, costs, RouterSpec(policy, gamma=0.8, k=2))
    assert torch.equal(result.out, h)
    assert result.metrics["drop_rate"].item() == 1.0
    assert result.metrics["experts_per_input"].item() == 0.0
    (grad_h,) = torch.autograd.grad(result.out.square().sum(), h, retain_graph=True)
    torch.testing.assert_close(grad_h, 2 * h.detach())
    # The balance loss still sees the routed (failed) slots of channel-blind policies.
    (result.out.square().sum() + result.aux_loss).backward()
    assert torch.isfinite(h.grad).all()
    for p in layer.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_zero_effective_scores_give_no_nan():
    # Softmax underflow: the selected experts' scores are exactly 0 in float32.
    layer = make_layer(3, dtype=torch.float32)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.bias.copy_(torch.tensor([0.0, -200.0, -200.0]))
    h = random_h(4, dtype=torch.float32)
    outage = torch.tensor([[True, False, False]]).expand(4, 3)
    result = layer(h, static_outage_costs(4, 3, outage), RouterSpec("channel_topk", k=2))
    assert torch.isfinite(result.out).all()
    # Renormalised over the two (equal) underflowed scores: weight 1/2 each.
    expected = h + 0.5 * layer.experts[1](h) + 0.5 * layer.experts[2](h)
    torch.testing.assert_close(result.out, expected)


def test_metrics_values_and_batch_averaging():
    K, B = 5, 30
    layer = make_layer(K)
    h = random_h(B)
    outage = torch.rand(B, K, generator=torch.Generator().manual_seed(4)) < 0.25
    costs = static_outage_costs(B, K, outage)
    spec = RouterSpec("topk", k=2, failure_energy=1e-4)
    whole = layer(h, costs, spec)
    sel = whole.selection
    effective = sel.mask & ~sel.failed
    m = whole.metrics
    assert set(METRIC_WEIGHTS) <= set(m)
    assert m["energy_j"].item() == pytest.approx(sel.energy.mean().item())
    assert m["outage_rate"].item() == pytest.approx(sel.failed.sum().item() / sel.mask.sum().item())
    torch.testing.assert_close(m["utilisation"], effective.double().mean(0))
    assert m["drop_rate"].item() == pytest.approx((~effective.any(1)).double().mean().item())
    scores = torch.softmax(layer.gate(h), dim=-1).detach()
    assert m["gate_entropy"].item() == pytest.approx(-(scores * scores.log()).sum(1).mean().item())
    assert all(not v.requires_grad for v in m.values())

    # Averaging uneven batches gives the whole-set figures.
    averager = MetricAverager()
    for part in (slice(0, 7), slice(7, 30)):
        averager.update(layer(h[part], costs[part], spec).metrics)
    averaged = averager.compute()
    assert averaged["count"] == B
    for name in METRIC_WEIGHTS:
        expected = m[name].tolist()
        assert averaged[name] == pytest.approx(expected), name


def test_output_is_independent_of_the_rest_of_the_batch():
    K, B = 6, 24
    layer = make_layer(K)
    h = random_h(B)
    costs = static_outage_costs(B, K, torch.rand(B, K, generator=torch.Generator().manual_seed(9)) < 0.2)
    spec = RouterSpec("topk", k=2)
    whole = layer(h, costs, spec).out
    singles = torch.cat([layer(h[b : b + 1], costs[b : b + 1], spec).out for b in range(B)])
    torch.testing.assert_close(whole, singles, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(policy="nope"), "router.policy"),
        (dict(policy="des", gamma=0.0), "router.gamma"),
        (dict(policy="des", gamma=1.5), "router.gamma"),
        (dict(policy="topk", k=0), "router.k"),
        (dict(policy="des", k_min=3, k_max=2), "router.k_max"),
        (dict(policy="topk", failure_energy=-1.0), "router.failure_energy"),
    ],
)
def test_router_spec_rejects_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        RouterSpec(**kwargs)


def test_layer_rejects_mismatched_costs():
    layer = make_layer(4)
    with pytest.raises(ValueError, match="costs"):
        layer(random_h(3), perfect_costs(3, 5, 5), RouterSpec("topk"))
    with pytest.raises(ValueError, match="h must be"):
        layer(torch.zeros(3, D + 1, dtype=torch.float64), perfect_costs(3, 4, 4), RouterSpec("topk"))


# ---------------------------------------------------------------------------------------------
# Combine rules (model.combine), balancing mask (model.balance_on), z-loss, routing health

from dmoe_torch.moe import COMBINE_RULES, balance_mask, combine_weights, load_metrics, router_z_loss  # noqa: E402


def default_combine() -> str:
    """model.combine of conf/model/vmoe.yaml and cnn.yaml (the same; chosen by measurement, README)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    rules = {OmegaConf.load(conf / f"{name}.yaml").combine for name in ("vmoe", "cnn")}
    assert len(rules) == 1, rules
    return rules.pop()


def single_expert_gate_grad(combine: str) -> torch.Tensor:
    """Gate weight gradient of a task loss on a batch where every row has one effective expert:
    top-2 routing with the second expert's static link in outage on every row."""
    K, B = 4, 12
    torch.manual_seed(0)
    layer = MoELayer(D, K, combine=combine).to(torch.float64)
    h = random_h(B)
    second = torch.softmax(layer.gate(h), -1).topk(2, dim=1).indices[:, 1]
    outage = torch.zeros(B, K, dtype=torch.bool)
    outage[torch.arange(B), second] = True
    result = layer(h, static_outage_costs(B, K, outage), RouterSpec("topk", k=2))
    effective = result.selection.mask & ~result.selection.failed
    assert (effective.sum(1) == 1).all() and result.metrics["single_expert_rate"].item() == 1.0
    (result.out * random_h(B, seed=3)).sum().backward()
    return layer.gate.weight.grad


def test_default_combine_trains_the_gate_on_single_expert_rows():
    assert torch.linalg.norm(single_expert_gate_grad(default_combine())) > 1e-3


def test_renormalized_combine_gives_the_gate_nothing_on_single_expert_rows():
    # The failure the default exists to avoid: w = 1 on every row, so d loss / d gate = 0.
    assert torch.count_nonzero(single_expert_gate_grad("renormalized")) == 0


def test_combine_weights_values_and_straight_through_gradient():
    logits = torch.tensor(
        [[2.0, 1.0, 0.0, -1.0], [0.5, 0.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True
    )
    effective = torch.tensor([[True, True, False, False], [True, False, False, False], [False] * 4])
    scores = torch.softmax(logits, -1)
    renorm = combine_weights(logits, scores, effective, "renormalized")
    raw = combine_weights(logits, scores, effective, "raw")
    st = combine_weights(logits, scores, effective, "renormalized_st")
    s = scores.detach()
    expected = torch.zeros(3, 4, dtype=torch.float64)
    expected[0, :2] = s[0, :2] / s[0, :2].sum()
    expected[1, 0] = 1.0
    torch.testing.assert_close(renorm, expected)
    torch.testing.assert_close(st, expected)  # same forward value
    torch.testing.assert_close(raw, s * effective)
    # Gradient of renormalized_st = gradient of renormalized + gradient of raw, for any upstream.
    upstream = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = [torch.autograd.grad((w * upstream).sum(), logits, retain_graph=True)[0] for w in (renorm, raw, st)]
    torch.testing.assert_close(grads[2], grads[0] + grads[1])
    assert torch.count_nonzero(grads[0][1]) == 0 and torch.count_nonzero(grads[2][1]) > 0  # single-expert row
    assert torch.count_nonzero(grads[2][2]) == 0  # a row without expert stays constant


def test_layer_rejects_an_unknown_combine_rule_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.combine must be one of renormalized, raw, renormalized_st"):
        MoELayer(D, 4, combine="mean")
    with pytest.raises(ValueError, match=r"model\.balance_on must be one of selection, scores"):
        MoELayer(D, 4, balance_on="channel")
    assert COMBINE_RULES[0] == "renormalized"  # what an absent key (older runs) means


def test_balance_on_scores_counts_the_score_only_topk_not_the_channel_selection():
    K, B = 4, 8
    torch.manual_seed(0)
    h = random_h(B)
    costs = perfect_costs(B, K, K) + 1e-3
    costs[:, 0, :] = 1e-9  # expert 0 cheapest: channel_topk@1 routes every row to it
    spec = RouterSpec("channel_topk", k=1)
    on_selection = MoELayer(D, K).to(torch.float64)
    on_scores = MoELayer(D, K, balance_on="scores").to(torch.float64)
    on_scores.load_state_dict(on_selection.state_dict())
    a, b = on_selection(h, costs, spec), on_scores(h, costs, spec)
    scores = torch.softmax(on_selection.gate(h), -1)
    assert a.selection.mask[:, 0].all()
    top1 = torch.zeros(B, K, dtype=torch.bool).scatter_(1, scores.argmax(1, keepdim=True), True)
    torch.testing.assert_close(a.aux_loss, K * scores[:, 0].mean())  # all load on expert 0
    torch.testing.assert_close(b.aux_loss, load_balancing_loss(scores, top1))
    assert not torch.isclose(a.aux_loss, b.aux_loss)


def test_balance_mask_uses_two_experts_for_gamma_policies_and_router_k_otherwise():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.05, 0.05, 0.5]])  # balance_on=scores ignores the selection
    jesa = balance_mask("scores", None, scores, RouterSpec("jesa", gamma=0.5))
    top3 = balance_mask("scores", None, scores, RouterSpec("topk", k=3))
    assert jesa.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert top3.sum(1).tolist() == [3, 3] and not top3[1, 1:3].all()


def test_balance_loss_balanced_is_one_and_hugging_face_scale_is_k_times():
    # Uniform scores, every expert in exactly 2 of 8 rows' top-2: ours = 1.0 exactly; Hugging
    # Face's load_balancing_loss_func divides by tokens, not slots: K * sum_k (2/8 * 2) * 1/K = k = 2.
    K, B, k = 4, 8, 2
    uniform = torch.full((B, K), 1 / K, dtype=torch.float64)
    mask = torch.zeros(B, K, dtype=torch.bool)
    for b in range(B):
        mask[b, [b % K, (b + 1) % K]] = True
    ours = load_balancing_loss(uniform, mask).item()
    theirs = K * ((mask.double().sum(0) / B) * uniform.mean(0)).sum().item()
    assert ours == 1.0
    assert theirs == pytest.approx(k * ours)


def test_router_z_loss_matches_hand_computation_and_is_reported_by_the_layer():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    # logsumexp: log 2 and log 4; mean of squares
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    layer = make_layer(4)
    h = random_h(6)
    result = layer(h, perfect_costs(6, 4, 4), RouterSpec("topk", k=2))
    torch.testing.assert_close(result.z_loss, torch.logsumexp(layer.gate(h), -1).pow(2).mean())


def test_load_metrics_and_dead_experts_are_over_all_batches():
    assert load_metrics(torch.tensor([1.0, 1.0, 1.0, 1.0])) == {"load_max_over_mean": 1.0, "load_cv": 0.0, "dead_experts": 0.0}
    m = load_metrics(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    assert m["load_max_over_mean"] == 3.0 and m["dead_experts"] == 2.0
    assert m["load_cv"] == pytest.approx(math.sqrt(((3 - 1) ** 2 + 0 + 1 + 1) / 4) / 1.0)
    # Two batches, each with a different expert idle: no expert is dead over both.
    K = 3
    layer = make_layer(K)
    spec = RouterSpec("topk", k=1)
    h = random_h(40)
    winners = torch.softmax(layer.gate(h), -1).argmax(1)
    used = winners.unique()
    assert len(used) >= 2
    averager = MetricAverager()
    per_batch_dead = []
    for expert in used.tolist():
        rows = (winners == expert).nonzero().squeeze(1)
        metrics = layer(h[rows], perfect_costs(len(rows), K, K), spec).metrics
        per_batch_dead.append(load_metrics(metrics["utilisation"])["dead_experts"])
        averager.update(metrics)
    result = averager.compute()
    assert all(d == K - 1 for d in per_batch_dead)  # every batch alone has idle experts
    assert result["dead_experts"] == K - len(used)
    assert result["single_expert_rate"] == 1.0
