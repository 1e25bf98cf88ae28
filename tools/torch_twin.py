#!/usr/bin/python3
"""The PyTorch twin of mdff's MDFF-SH: the same model, losses and RMSProp, written with torch, used as
the reference that tests/test_torch_parity.cpp compares the engine against (as llm.c checks itself
against train_gpt2.py). Runs under Debian's python3-torch (/usr/bin/python3); the engine never
imports torch.

    torch_twin.py IN OUT [IN OUT ...]     compute references for engine-written case files
    torch_twin.py --make-fixture OUT --taps all --scales 1,0.5
                                          write a self-contained tiny-model case (torch's own weights)

A case file (safetensors, written by the engine or by --make-fixture) holds:
    init/NAME        every parameter and buffer of the model, by its state_dict name
    input/images     (N,3,H,W)      input/labels (N,K) multi-hot      input/index (N) rows of U
    input/U          (n,L) codes    input/train_labels (n,K)
    metadata         the configuration: backbone, bits, classes, taps, scales, head sizes, loss and
                     optimizer settings, number of RMSProp steps
OUT holds all of IN, plus, computed in float64 (so that the comparison tests the semantics, not the
rounding: at batch 4 this network's batch norms see 4 values per channel in the last stages, and
PyTorch's own float32 result differs from its float64 result by up to 8e-2):
    ref/u ref/logits ref/j1 ref/j2 ref/j3 ref/total   the first forward pass (training mode)
    grad/NAME        the gradient of every parameter after the first backward pass
    running/NAME     every batch-norm running statistic after the first forward pass
    ref/losses       (steps+1) the total loss before each RMSProp step and after the last
    final/NAME       every parameter after the RMSProp steps (when the config's record_final is true)
and, when the config's float32_check is true, PyTorch's float32 first pass, to measure how far
float32 rounding moves this network's results (ref32/u ref32/logits ref32/j1.. grad32/NAME);
and, when its trajectory_sensitivity is true, ref/losses_perturbed: the same float64 trajectory from
initial weights perturbed by 1e-13 (the rounding difference of sums over ~1000 terms taken in
another order), to measure how far rounding-level differences carry
over the RMSProp steps (far, with two scales at batch 4: see tests/test_torch_parity.cpp).
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402  (tools/safetensors_io.py: no safetensors package on Debian)


# ---- the model, with mdff's (and torchvision's) parameter names ----

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, width, stride):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    def __init__(self, blocks, widths, stem):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        channels = stem
        for stage in range(4):
            layers = []
            for b in range(blocks[stage]):
                layers.append(Bottleneck(channels, widths[stage], 2 if stage > 0 and b == 0 else 1))
                channels = widths[stage] * 4
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def taps(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c3 = self.layer2(self.layer1(h))
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)


class MdffSh(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        bb = cfg["backbone"]
        self.cfg = cfg
        self.backbone = ResNet(bb["blocks"], bb["widths"], bb["stem"])
        c3, c4, c5 = (4 * w for w in bb["widths"][1:])
        lateral, bits, taps = cfg["lateral_channels"], cfg["bits"], cfg["taps"]
        self.uses_fc1, self.uses_convs = taps != "convs", taps != "fc1"
        fusion_in, hash_in = 0, bits
        if self.uses_fc1:
            self.fc1 = nn.Linear(c5, cfg["fc1_features"])
            fusion_in += cfg["fc1_features"]
        if self.uses_convs:
            self.lateral3, self.lateral4, self.lateral5 = (nn.Conv2d(c, lateral, 1) for c in (c3, c4, c5))
            self.hash3, self.hash4, self.hash5 = (nn.Linear(lateral, bits) for _ in range(3))
            fusion_in += 3 * lateral
            hash_in += 3 * bits
        self.fusion = nn.Linear(fusion_in, cfg["fusion_features"])
        self.hash_fusion = nn.Linear(cfg["fusion_features"], bits)
        self.hash = nn.Linear(hash_in, bits)
        self.classifier = nn.Linear(bits, cfg["classes"])

    def forward(self, images):
        scales = self.cfg["scales"]
        sums = {}

        def accumulate(key, value):
            sums[key] = sums[key] + value if key in sums else value

        for scale in scales:
            x = images
            if scale != 1.0:
                size = tuple(max(1, math.floor(d * scale + 0.5)) for d in images.shape[2:])
                x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            c3, c4, c5 = self.backbone.taps(x)
            if self.uses_fc1:
                accumulate("fc1", F.relu(self.fc1(F.adaptive_avg_pool2d(c5, 1).flatten(1))))
            if self.uses_convs:
                p5 = self.lateral5(c5)
                l4 = self.lateral4(c4)
                p4 = l4 + F.interpolate(p5, size=l4.shape[2:], mode="nearest")
                l3 = self.lateral3(c3)
                p3 = l3 + F.interpolate(p4, size=l3.shape[2:], mode="nearest")
                for key, p in (("g3", p3), ("g4", p4), ("g5", p5)):
                    accumulate(key, F.adaptive_avg_pool2d(p, 1).flatten(1))
        mean = (lambda t: t) if len(scales) == 1 else (lambda t: t * (1.0 / len(scales)))
        fusion_inputs, hashes = [], []
        if self.uses_convs:
            g3, g4, g5 = mean(sums["g3"]), mean(sums["g4"]), mean(sums["g5"])
            fusion_inputs = [g3, g4, g5]
            hashes = [torch.tanh(self.hash3(g3)), torch.tanh(self.hash4(g4)), torch.tanh(self.hash5(g5))]
        if self.uses_fc1:
            fusion_inputs.append(mean(sums["fc1"]))
        f = F.relu(self.fusion(torch.cat(fusion_inputs, 1)))
        hashes.append(torch.tanh(self.hash_fusion(f)))
        u = torch.tanh(self.hash(torch.cat(hashes, 1)))
        return u, self.classifier(u)


# ---- the losses (method.md §3), written independently of the engine's ----

def stable_softplus(x):
    return torch.clamp(x, min=0) + torch.log1p(torch.exp(-x.abs()))


def losses(u, logits, labels, index, U, train_labels, cfg):
    if cfg["pairs"] == "dataset":
        U[index.long()] = u.detach()  # the batch's rows first
        theta = 0.5 * u @ U.t()
        s = (labels @ train_labels.t() > 0).to(u.dtype)
    else:
        theta = 0.5 * u @ u.t()
        s = (labels @ labels.t() > 0).to(u.dtype)
    j1 = (stable_softplus(theta) - s * theta).mean()
    b = torch.where(u >= 0, torch.ones_like(u), -torch.ones_like(u))
    j2 = ((b - u) ** 2).sum() / u.shape[0]
    target = labels / labels.sum(1, keepdim=True)
    j3 = -(target * F.log_softmax(logits, 1)).sum() / u.shape[0]
    return j1, j2, j3, j1 + cfg["beta"] * j2 + cfg["gamma"] * j3


# ---- a case: load, run, record ----

def config_from(metadata):
    cfg = json.loads(metadata["config"])
    cfg["scales"] = [float(s) for s in cfg["scales"]]
    return cfg


def first_pass(model, tensors, cfg, dtype):
    """One forward pass (training mode) and the losses in `dtype`, on copies of the inputs."""
    model = model.to(dtype)
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items() if k.startswith("input/")}
    u, logits = model(inputs["input/images"])
    terms = losses(u, logits, inputs["input/labels"], inputs["input/index"], inputs["input/U"].clone(),
                   inputs["input/train_labels"], cfg)
    return model, u, logits, terms


def run_case(tensors, metadata):
    cfg = config_from(metadata)
    torch.manual_seed(0)
    model = MdffSh(cfg)
    if "resnet50" == cfg["backbone"].get("name"):  # the names and shapes are torchvision's own
        import torchvision
        tv = {k: v.shape for k, v in torchvision.models.resnet50().state_dict().items()
              if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
        ours = {k[len("backbone."):]: v.shape for k, v in model.state_dict().items()
                if k.startswith("backbone.") and not k.endswith("num_batches_tracked")}
        assert tv == ours, "the twin's ResNet50 differs from torchvision's"
    state = model.state_dict()
    init = {k[len("init/"):]: v for k, v in tensors.items() if k.startswith("init/")}
    if init:
        missing = [k for k in state if not k.endswith("num_batches_tracked") and k not in init]
        assert not missing, f"the case file lacks {missing[:5]}"
        model.load_state_dict({**state, **init})
    else:  # --make-fixture: torch's own initial weights become the case's
        for k, v in state.items():
            if not k.endswith("num_batches_tracked"):
                tensors["init/" + k] = v.clone()
    model.train()
    out = dict(tensors)
    if cfg.get("float32_check"):
        model32 = MdffSh(cfg)
        model32.load_state_dict(model.state_dict())
        model32, u, logits, terms = first_pass(model32, tensors, cfg, torch.float32)
        terms[3].backward()
        out.update({"ref32/" + key: value.detach() for key, value in
                    (("u", u), ("logits", logits), ("j1", terms[0]), ("j2", terms[1]), ("j3", terms[2]), ("total", terms[3]))})
        out.update({"grad32/" + name: p.grad.clone() for name, p in model32.named_parameters()})
    if cfg.get("trajectory_sensitivity"):
        perturbed = MdffSh(cfg)
        perturbed.load_state_dict(model.state_dict())
        perturbed = perturbed.double()
        with torch.no_grad():
            for p in perturbed.parameters():
                p.mul_(1 + 1e-13 * torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        out["ref/losses_perturbed"] = torch.tensor(trajectory(perturbed, tensors, cfg, {}), dtype=torch.float64)
    model = model.double()
    out["ref/losses"] = torch.tensor(trajectory(model, tensors, cfg, out), dtype=torch.float64)
    if cfg.get("record_final", True):
        for name, p in model.named_parameters():
            out["final/" + name] = p.detach().clone()
    return out


def trajectory(model, tensors, cfg, out):
    """RMSProp steps in float64 from the model's weights; records the first pass into `out`."""
    as64 = {k: (v.double() if v.is_floating_point() else v) for k, v in tensors.items()}
    images, labels = as64["input/images"], as64["input/labels"]
    index, U, train_labels = as64["input/index"], as64["input/U"].clone(), as64["input/train_labels"]
    opt = torch.optim.RMSprop(model.parameters(), lr=cfg["lr"], alpha=cfg["alpha"], eps=cfg["eps"],
                              weight_decay=cfg["weight_decay"])
    totals = []
    for step in range(cfg["steps"] + 1):
        opt.zero_grad()
        u, logits = model(images)
        j1, j2, j3, total = losses(u, logits, labels, index, U, train_labels, cfg)
        totals.append(total.item())
        if step == cfg["steps"]:
            break
        total.backward()
        if step == 0:
            for key, value in (("u", u), ("logits", logits), ("j1", j1), ("j2", j2), ("j3", j3), ("total", total)):
                out["ref/" + key] = value.detach().clone()
            for name, p in model.named_parameters():
                out["grad/" + name] = p.grad.clone()
            for name, b in model.named_buffers():
                if not name.endswith("num_batches_tracked"):
                    out["running/" + name] = b.clone()
        opt.step()
    return totals


def tiny_case(taps, scales, seed=0):
    """A self-contained case on the tiny model: torch draws the weights and the inputs."""
    cfg = {"backbone": {"name": "tiny", "blocks": [1, 1, 1, 1], "widths": [4, 8, 8, 16], "stem": 8},
           "bits": 6, "classes": 3, "taps": taps, "scales": scales, "lateral_channels": 8, "fc1_features": 12,
           "fusion_features": 10, "pairs": "dataset", "beta": 0.1, "gamma": 0.01, "lr": 1e-3, "alpha": 0.99,
           "eps": 1e-8, "weight_decay": 1e-5, "steps": 3, "record_final": True}
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, batch = 10, 4
    train_labels = torch.zeros(n, 3)
    for i in range(n):
        train_labels[i, i % 3] = 1
        if i % 4 == 0:
            train_labels[i, (i + 1) % 3] = 1  # some multi-label rows
    index = torch.tensor([7, 2, 5, 0], dtype=torch.int32)
    tensors = {"input/images": torch.randn(batch, 3, 16, 16, generator=g), "input/labels": train_labels[index.long()],
               "input/index": index, "input/U": torch.rand(n, 6, generator=g) * 2 - 1,
               "input/train_labels": train_labels}
    return tensors, {"config": json.dumps(cfg)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="IN OUT pairs")
    parser.add_argument("--make-fixture", metavar="OUT")
    parser.add_argument("--taps", default="all")
    parser.add_argument("--scales", default="1,0.5")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.make_fixture:
        tensors, metadata = tiny_case(args.taps, [float(s) for s in args.scales.split(",")])
        safetensors_io.save(args.make_fixture, run_case(tensors, metadata), metadata)
        return
    if len(args.files) % 2:
        parser.error("give IN OUT pairs")
    for path_in, path_out in zip(args.files[::2], args.files[1::2]):
        tensors, metadata = safetensors_io.load(path_in)
        safetensors_io.save(path_out, run_case(tensors, metadata), metadata)


if __name__ == "__main__":
    main()
