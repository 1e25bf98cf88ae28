#!/usr/bin/python3
"""What PyTorch holds at the end of a training step's forward pass, device-independently: the twin's
(tools/torch_twin.py) ResNet50-MDFF-SH as bench/bench_model builds it (scales 1 and 0.5, 48 bits, 10
classes, RMSProp, J with pairs = dataset against 5,000 U rows), after two full steps (so that RMSProp's
state exists), then a third forward pass and loss under torch.autograd.graph.saved_tensors_hooks. Every
tensor autograd keeps for backward is counted once per storage, each rounded up to 512 bytes as
PyTorch's CUDA allocator counts it (max_memory_allocated), next to the parameters, buffers, RMSProp
state and inputs. Gradients are not there: zero_grad sets them to None, and backward allocates them
as it reaches each parameter.

The set of saved tensors is the same on the CPU and the GPU (cuDNN's batch norm adds a reserve of a
few bytes), so Debian's CPU torch tells what the GPU run holds when backward starts; the engine's
counterpart is its CPU tensor count (bench_model --device cpu, "engine tensor peaks").

    /usr/bin/python3 tools/torch_saved_memory.py [--batch 32] [--image-size 224]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_twin as tw  # noqa: E402

MIB = 1024.0 * 1024.0
CONFIG = {"backbone": {"name": "resnet50", "blocks": [3, 4, 6, 3], "widths": [64, 128, 256, 512], "stem": 64},
          "bits": 48, "classes": 10, "taps": "all", "scales": [1.0, 0.5], "lateral_channels": 256,
          "fc1_features": 1024, "fusion_features": 1024, "pairs": "dataset", "beta": 0.1, "gamma": 0.01,
          "lr": 1e-5, "alpha": 0.99, "eps": 1e-8, "weight_decay": 1e-5}


def storages(tensors):
    """{storage address: bytes} of the tensors' storages (views of one storage count once)."""
    found = {}
    for t in tensors:
        s = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage().untyped()
        found[s.data_ptr()] = s.nbytes()
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--train-size", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    cfg, n = CONFIG, args.train_size
    model = tw.MdffSh(cfg).train()
    opt = torch.optim.RMSprop(model.parameters(), lr=cfg["lr"], alpha=cfg["alpha"], eps=cfg["eps"],
                              weight_decay=cfg["weight_decay"])
    train_labels = torch.zeros(n, cfg["classes"])
    train_labels[torch.arange(n), torch.arange(n) % cfg["classes"]] = 1
    U = torch.rand(n, cfg["bits"]) * 2 - 1
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    index = torch.arange(args.batch) % n
    labels = train_labels[index]

    def forward():
        u, logits = model(images)
        return tw.losses(u, logits, labels, index, U, train_labels, cfg)[3]

    for _ in range(2):
        opt.zero_grad()
        forward().backward()
        opt.step()
    opt.zero_grad()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        total = forward()
    groups = {"parameters": storages(model.parameters()), "buffers": storages(model.buffers()),
              "RMSProp state": storages(v for state in opt.state.values() for v in state.values()
                                        if torch.is_tensor(v) and v.dim() > 0),
              "inputs, labels, U": storages([images, index, labels, train_labels, U])}
    counted = set().union(*groups.values())
    groups["saved for backward"] = {k: v for k, v in storages(saved).items() if k not in counted}
    print(f"PyTorch {torch.__version__}, the twin at {args.image_size}x{args.image_size}, batch {args.batch}: "
          "held at the end of the forward pass (512-byte blocks)")
    all_bytes = 0
    for name, group in groups.items():
        size = sum((b + 511) // 512 * 512 for b in group.values())
        all_bytes += size
        print(f"  {name:20s} {len(group):5d} storages {size / MIB:10.1f} MiB")
    print(f"  {'total':20s}                {all_bytes / MIB:10.1f} MiB")
    del total


if __name__ == "__main__":
    main()
