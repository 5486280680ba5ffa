"""The wireless channel on its own: per-link energies for your own device geometry.

    python examples/channel_energies.py

``WirelessChannel(cfg, num_devices=K, d_model=d, seed=s)`` places K devices around the
access point (uniform over the annulus d_min_m..d_max_m, from the seed) and gives, for any
frames, the energy of every link: ``costs(frame_ids, layer, stream)`` [R, K, N] in joules,
downlink + uplink of one hidden vector of d * bits_per_element bits, ``+inf`` where either
hop misses the latency budget (outage).  The fading is a pure function of (seed, stream,
layer, frame id): the same frame gives the same draw whatever the batch.

For a geometry of your own, combine your path loss with the channel's fading and let
``costs_from_gains`` turn linear gains [..., K, N] into energies.  ``ChannelConfig(model=
"tdl" | "umi" | "uma")`` selects the 3GPP TR 38.901 models (needs sionna-no-rt's tables).
"""

from __future__ import annotations

from itertools import pairwise

import torch

from dmoe_torch import ChannelConfig, WirelessChannel, db_to_linear, outage_probability, path_loss_db

FRAMES = 2000  # frames (inputs) to draw: enough for the outage shares to settle


def main() -> None:
    cfg = ChannelConfig(num_subcarriers=8, latency_budget_s=1e-3)
    channel = WirelessChannel(cfg, num_devices=4, d_model=64, seed=0)
    frames = torch.arange(FRAMES)
    costs = channel.costs(frames, layer=0, stream=0)  # [R, K, N] J
    print(
        f"the channel's own placement: distances {[round(d) for d in channel.distances_m.tolist()]} m, "
        f"costs {tuple(costs.shape)}, median {costs[costs.isfinite()].median().item() * 1e6:.2f} µJ per link"
    )

    # Your own geometry: devices at these distances (m), the default path loss
    # 128.1 + 37.6 log10(d / km) dB, and the channel's unit-mean fading |h|^2.
    distances = torch.tensor([60.0, 150.0, 300.0, 450.0], dtype=torch.float64)
    mean_gain = db_to_linear(-path_loss_db(distances))  # [K] linear
    fading = torch.from_numpy(channel.power_gains(frames, layer=0, stream=0))  # [R, K, N]
    own_costs = channel.costs_from_gains(mean_gain[None, :, None] * fading)  # [R, K, N] J
    print("your geometry:")
    medians, gaps = [], []
    for k, d in enumerate(distances.tolist()):
        link = own_costs[:, k, :]
        outage = (~link.isfinite()).double().mean().item()
        theory = outage_probability(cfg, mean_gain[k].item(), channel.payload_bits)
        median = link.flatten().median().item()  # +inf once most links are in outage
        medians.append(median)
        gaps.append(abs(outage - theory))
        print(
            f"  device {k} at {d:4.0f} m: path loss {path_loss_db(torch.tensor(d)).item():6.1f} dB, "
            f"median link energy {median * 1e6:8.3f} µJ, outage {outage:.3f} (closed form {theory:.3f})"
        )
    print(f"energy grows with distance: {all(a < b for a, b in pairwise(medians))}")
    print(f"largest outage gap to the closed form: {max(gaps):.4f}")


if __name__ == "__main__":
    main()
