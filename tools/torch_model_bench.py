#!/usr/bin/python3
"""PyTorch's side of bench/bench_model: times forward + backward of the twin's ResNet50-MDFF-SH
(tools/torch_twin.py) on the configuration given as JSON on stdin, and prints the median seconds and
the process's peak RSS (after and before building the model) as JSON."""
import json
import os
import resource
import sys
import time

import torch

import torch_twin as tw


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    torch.set_num_threads(os.cpu_count())  # Debian's torch starts with 1 thread here; the engine uses all cores
    spec = json.load(sys.stdin)
    baseline = rss_mib()
    torch.manual_seed(0)
    cfg = spec["config"]
    model = tw.MdffSh(cfg)
    model.train()
    n, batch, size = spec["train_size"], spec["batch"], spec["image_size"]
    train_labels = torch.zeros(n, cfg["classes"])
    train_labels[torch.arange(n), torch.arange(n) % cfg["classes"]] = 1
    U = torch.rand(n, cfg["bits"]) * 2 - 1
    index = torch.arange(batch, dtype=torch.int32)
    images = torch.randn(batch, 3, size, size)
    times = []
    for i in range(spec["warmup"] + spec["iterations"]):
        model.zero_grad()
        t0 = time.perf_counter()
        u, logits = model(images)
        total = tw.losses(u, logits, train_labels[:batch], index, U, train_labels, cfg)[3]
        total.backward()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    json.dump({"median_s": sorted(times)[len(times) // 2], "peak_rss_mib": rss_mib(), "baseline_rss_mib": baseline,
               "threads": torch.get_num_threads(), "version": torch.__version__}, sys.stdout)


if __name__ == "__main__":
    main()
