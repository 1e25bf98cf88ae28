#!/usr/bin/python3
"""PyTorch reference timings for bench/bench_conv: reads {"batch": N, "shapes": [...]} on stdin and
prints, per shape, the median seconds of conv2d forward and backward (input and weight gradients)
as JSON. Runs under Debian's python3-torch (/usr/bin/python3); the engine itself never imports torch."""
import json
import os
import sys
import time

import torch


def median_seconds(fn, budget=0.3):
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    torch.set_num_threads(os.cpu_count())  # Debian's torch starts with 1 thread here; the engine uses all cores
    spec = json.load(sys.stdin)
    batch, results = spec["batch"], []
    torch.manual_seed(0)
    for s in spec["shapes"]:
        x = torch.randn(batch, s["cin"], s["size"], s["size"], requires_grad=True)
        w = (0.05 * torch.randn(s["cout"], s["cin"], s["kernel"], s["kernel"])).requires_grad_()
        conv = lambda: torch.nn.functional.conv2d(x, w, None, s["stride"], s["padding"])
        with torch.no_grad():
            forward = median_seconds(conv)
        y = conv()
        gy = torch.randn_like(y)
        backward = median_seconds(lambda: torch.autograd.grad(y, (x, w), gy, retain_graph=True))
        results.append({"forward_s": forward, "backward_s": backward})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
