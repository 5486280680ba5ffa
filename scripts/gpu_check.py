"""The router on a CUDA device: no host sync, the same answers as on the CPU, and its cost.

Run by scripts/gpu_check.sh on a CUDA machine (nothing else depends on a GPU):

1. every built-in token policy's ``route()`` on CUDA tensors under
   ``torch.cuda.set_sync_debug_mode("error")`` (after one warm-up call, which copies the
   cached constant tables to the device), and the MoE layer's forward under "warn", counting
   its host syncs (one is expected: the group sizes of the dispatch);
2. the selections on CUDA against the CPU's (masks equal, energies within 1e-9 relative);
3. a deterministic combine: two forward + backward passes under
   ``torch.use_deterministic_algorithms(True)`` give bit-identical gradients.

    python scripts/gpu_check.py --out gpu_router.json
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.moe import MoELayer, RouterSpec
from dmoe_torch.selection import POLICY_TABLE, route

ROWS, D, K = 256 * 49, 64, 8
PARAMS = dict(k=2, gamma=0.25, k_min=1, k_max=2, lam=1e4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    channel = WirelessChannel(ChannelConfig(), num_devices=K, d_model=D, seed=0)
    costs_cpu = channel.costs(torch.arange(ROWS), layer=0, stream=0)
    scores_cpu = torch.softmax(torch.randn(ROWS, K) * 3, dim=1)
    costs, scores = costs_cpu.to(device), scores_cpu.to(device)
    policies = [n for n, p in POLICY_TABLE.items() if p.builtin and p.token_solver is not None and n != "random_topk"]
    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(device), "sync_free": {}, "equal_to_cpu": {}}

    for name in policies:
        route(name, scores, costs, check_values=False, **PARAMS)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            on_gpu = route(name, scores, costs, check_values=False, **PARAMS)
            report["sync_free"][name] = True
        except RuntimeError as exc:
            report["sync_free"][name] = f"sync: {str(exc).splitlines()[0]}"
            on_gpu = None
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if on_gpu is not None:
            on_cpu = route(name, scores_cpu, costs_cpu, **PARAMS)
            same_mask = bool(torch.equal(on_gpu.mask.cpu(), on_cpu.mask))
            close = bool(torch.allclose(on_gpu.energy.cpu(), on_cpu.energy, rtol=1e-9, atol=0.0))
            report["equal_to_cpu"][name] = {
                "mask": same_mask,
                "energy": close,
                "rows_differing": int((on_gpu.mask.cpu() != on_cpu.mask).any(1).sum()),
            }

    layer = MoELayer(D, K, link_dropout=0.3).to(device).train()
    h = torch.randn(ROWS, D, device=device, requires_grad=True)
    for policy in ("topk", "des", "jesa"):
        spec = RouterSpec(policy, gamma=0.25, k_max=2)
        layer(h, costs_cpu, spec, generator=torch.Generator().manual_seed(0))  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = layer(h, costs_cpu, spec, generator=torch.Generator().manual_seed(0))
        torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        report.setdefault("layer_forward_syncs", {})[policy] = {"count": len(syncs), "messages": sorted(set(syncs))[:4]}
        del out

    torch.use_deterministic_algorithms(True)
    grads = []
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        h.grad = None
        out = layer(h, costs_cpu, RouterSpec("jesa", gamma=0.25, k_max=2), generator=torch.Generator().manual_seed(0))
        out.out.square().mean().backward()
        grads.append(torch.cat([h.grad.flatten(), layer.gate.weight.grad.flatten()]).cpu())
    torch.use_deterministic_algorithms(False)
    report["deterministic_backward_bit_identical"] = bool(torch.equal(grads[0], grads[1]))

    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
