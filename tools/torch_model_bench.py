#!/usr/bin/python3
"""PyTorch's side of bench/bench_model: a server, spawned once per run, that times the twin's
ResNet50-MDFF-SH (tools/torch_twin.py) on the engine's commands, so that the engine and PyTorch can
take turns in one run without ever running at the same time (it only computes while the engine waits
for its answer).

Protocol, one line each way, answers as JSON on stdout:
    first line   the spec as JSON: {"config": {...torch_twin config, with lr alpha eps weight_decay...},
                 "batch": B, "encode_batch": E, "image_size": S, "train_size": n}
                 -> {"ready": true, "version", "threads", "interop_threads", "flush_denormal",
                     "baseline_rss_mib", "model_rss_mib"}   or {"error": "..."} when torch is missing
    train N      N training steps (zero_grad, forward, J = J1 + beta J2 + gamma J3 with pairs = dataset,
                 backward, one torch.optim.RMSprop step), model in training mode -> {"times": [s, ...]}
    encode N     N encodings (eval(), torch.no_grad(), forward of E images) -> {"times": [s, ...]}
    peak         -> {"peak_rss_mib": the high-water mark of the resident memory since the start or the
                 previous `peak`, "rss_mib": the resident memory after the reset} and starts a new
                 phase, as the engine does: freed memory goes back to the system (malloc_trim) and the
                 mark is reset to the current RSS through /proc/self/clear_refs where the kernel allows
                 it ("reset": true), else it stays the process's cumulative peak ("reset": false)
    quit         -> {"process_peak_rss_mib": the peak over the whole process} and exits
"""
import ctypes
import json
import os
import re
import resource
import sys
import time


def hwm_mib():
    """The resident high-water mark (VmHWM, resettable), or ru_maxrss where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)\s+kB", f.read()).group(1)) / 1024.0
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def rss_mib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)\s+kB", f.read()).group(1)) / 1024.0


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    spec = json.loads(sys.stdin.readline())
    baseline = hwm_mib()
    try:
        import torch
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import torch_twin as tw
    except Exception as e:  # ImportError, or a torch that fails to load
        reply({"error": f"{type(e).__name__}: {e} (install Debian's python3-torch)"})
        return
    torch.set_num_threads(os.cpu_count())  # Debian's torch starts with 1 thread here; the engine uses all cores
    flush_denormal = torch.set_flush_denormal(True)  # as the engine does (core/cpu_backend.cpp)
    torch.manual_seed(0)
    cfg = spec["config"]
    model = tw.MdffSh(cfg)
    model.train()
    opt = torch.optim.RMSprop(model.parameters(), lr=cfg["lr"], alpha=cfg["alpha"], eps=cfg["eps"],
                              weight_decay=cfg["weight_decay"])
    n, batch, size = spec["train_size"], spec["batch"], spec["image_size"]
    train_labels = torch.zeros(n, cfg["classes"])
    train_labels[torch.arange(n), torch.arange(n) % cfg["classes"]] = 1
    U = torch.rand(n, cfg["bits"]) * 2 - 1
    index = torch.arange(batch, dtype=torch.int64) % n
    labels = train_labels[index]
    images = torch.randn(batch, 3, size, size)
    encode_images = torch.randn(spec["encode_batch"], 3, size, size)
    phase_peaks = []

    def train_step():
        opt.zero_grad()
        u, logits = model(images)
        total = tw.losses(u, logits, labels, index, U, train_labels, cfg)[3]
        total.item()  # as the engine's trainer reads the loss every step
        total.backward()
        opt.step()

    def encode_step():
        with torch.no_grad():
            model(encode_images)

    reply({"ready": True, "version": torch.__version__, "threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(), "flush_denormal": flush_denormal,
           "baseline_rss_mib": baseline, "model_rss_mib": hwm_mib()})
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] in ("train", "encode"):
            step = train_step if words[0] == "train" else encode_step
            model.train(words[0] == "train")
            times = []
            for _ in range(int(words[1])):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            reply({"times": times})
        elif words[0] == "peak":
            phase_peaks.append(hwm_mib())
            ctypes.CDLL(None).malloc_trim(0)  # glibc, as the engine
            reset = reset_hwm()
            reply({"peak_rss_mib": phase_peaks[-1], "rss_mib": rss_mib(), "reset": reset})
        elif words[0] == "quit":
            reply({"process_peak_rss_mib": max(phase_peaks + [hwm_mib()])})
            return
        else:
            reply({"error": f"unknown command {line.strip()!r}"})


if __name__ == "__main__":
    main()
