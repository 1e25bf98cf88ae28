#!/usr/bin/python3
"""The reference for tests/test_pretrained_torchvision.cpp: torchvision's own ResNet50, with random weights,
saved as a state_dict the way ImageNet weights are, and its outputs, so that the test can load the weights
with load_pretrained_backbone (models/pretrained.h) and compare the engine's layer2..layer4 outputs.

    torchvision_resnet50.py WEIGHTS REFERENCE [--seed S] [--batch N] [--size S]

WEIGHTS   torchvision.models.resnet50()'s state_dict, float32, by torchvision's names (fc.* and the
          num_batches_tracked counters included, as in torchvision's checkpoint files). The batch norms are
          not left at their initialisation (weight 1, bias 0, mean 0, variance 1, which makes eval-mode batch
          norm the identity): their weights and biases are random, and their running statistics are measured
          on random images (so that activations keep a sane scale through the 16 blocks) and then jittered.
REFERENCE input (N,3,S,S) float32 random images; c3, c4, c5, the outputs of layer2, layer3 and layer4 in
          eval mode, computed in float64 from the same float32 values; c3_f32, c4_f32, c5_f32, the same in
          float32, to show how far PyTorch's own float32 rounding moves them.
Runs under Debian's python3-torch and python3-torchvision; tools/safetensors_io.py writes the files.
"""
import argparse
import copy
import os
import sys

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402  (tools/safetensors_io.py: no safetensors package on Debian)


def randomise_batch_norms(model, size, generator):
    """Random affine parameters; running statistics of random images, each jittered by up to 2x."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.uniform_(-0.2, 0.2, generator=generator)
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average: after one batch, that batch's statistics
        model.train()
        model(torch.randn(8, 3, size, size, generator=generator))
        for bn in norms:
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.2 * std * torch.randn(std.shape, generator=generator))
            bn.running_var.mul_(torch.empty(std.shape).uniform_(0.5, 2.0, generator=generator))
            bn.momentum = 0.1
    model.eval()


def taps(model, images):
    """torchvision's forward up to layer4, keeping the outputs of layer2, layer3 and layer4."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    c3 = model.layer2(model.layer1(x))
    c4 = model.layer3(c3)
    return c3, c4, model.layer4(c4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights")
    parser.add_argument("reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # torchvision's initialisation draws from the global generator
    generator = torch.Generator().manual_seed(args.seed)
    model = torchvision.models.resnet50()
    randomise_batch_norms(model, args.size, generator)
    safetensors_io.save(args.weights, model.state_dict(), {"written_by": "torchvision_resnet50.py"})

    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    reference = {"input": images}
    with torch.no_grad():
        model64 = copy.deepcopy(model).double()
        for name, value in zip(("c3", "c4", "c5"), taps(model64, images.double())):
            reference[name] = value
        for name, value in zip(("c3_f32", "c4_f32", "c5_f32"), taps(model, images)):
            reference[name] = value
    safetensors_io.save(args.reference, reference, {"torchvision": torchvision.__version__})


if __name__ == "__main__":
    main()
