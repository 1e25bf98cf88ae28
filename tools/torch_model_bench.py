#!/usr/bin/python3
"""PyTorch's side of bench/bench_model: a server, spawned once per run, that times the twin's
ResNet50-MDFF-SH (tools/torch_twin.py) on the engine's commands, so that the engine and PyTorch can
take turns in one run without ever running at the same time (it only computes while the engine waits
for its answer). Runs on the CPU (Debian's python3-torch 1.13 here) or on the GPU (any torch with CUDA:
2.11 on the lent H200), on the device the spec names.

Protocol, one line each way, answers as JSON on stdout:
    first line   the spec as JSON: {"config": {...torch_twin config, with lr alpha eps weight_decay...},
                 "train_size": n, "device": "cpu" | "cuda", "precision": "tf32" | "fp32"}
                 -> {"ready": true, "version", "python", "threads", "interop_threads", "flush_denormal",
                     "baseline_rss_mib", "model_rss_mib", and on the GPU "gpu", "cuda", "cudnn",
                     "cudnn_benchmark", "fp32_precision", "model_gpu_mib"}
                 or {"error": "..."} when torch is missing, or has no usable CUDA for "cuda"
                 On the GPU, "precision" sets TF32 for cuDNN's convolutions and cuBLAS's matrix products
                 alike (set_tf32; "fp32_precision" reads both back), and torch.backends.cudnn.benchmark is
                 on (cuDNN picks each convolution's fastest algorithm by trying them on the first call of
                 each shape: that happens in the warm-up).
    inputs B E S the inputs of the next commands: B training images (and their labels, rows 0..B-1 of U),
                 E images to encode, S x S pixels, random, on the device -> {"ok": true}
    train N      N training steps (zero_grad, forward, J = J1 + beta J2 + gamma J3 with pairs = dataset,
                 backward, one torch.optim.RMSprop step), model in training mode -> {"times": [s, ...]}
    encode N     N encodings (eval(), torch.no_grad(), forward of E images) -> {"times": [s, ...]}
                 On the GPU each timed step ends with torch.cuda.synchronize().
    peak         -> {"peak_mib": the peak memory since the start or the previous `peak`, "after_mib": the
                 memory in use after it, "reset"} and starts a new phase, as the engine does. On the GPU the
                 memory is the caching allocator's: torch.cuda.max_memory_allocated() (then
                 reset_peak_memory_stats(): "reset" is true) and memory_allocated(), and
                 "reserved_peak_mib" is torch.cuda.max_memory_reserved() (segments held, used or not).
                 On the CPU it is the resident memory: the high-water mark (VmHWM), then freed memory goes
                 back to the system (malloc_trim) and the mark is reset to the current RSS through
                 /proc/self/clear_refs where the kernel allows it ("reset": true; else it stays the
                 process's cumulative peak).
    empty_cache  -> {"ok": true}: on the GPU, the caching allocator's free segments go back to the driver
                 (torch.cuda.empty_cache()), as the engine's do between its warm-up and its timed rounds
    quit         -> {"process_peak_mib": the peak over the whole process, in the measure of `peak`} and exits
"""
import ctypes
import json
import os
import re
import resource
import sys
import time

MIB = 1024.0 * 1024.0


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


def set_tf32(torch, on):
    """TF32 for cuDNN's convolutions and cuBLAS's matrix products alike, through the fp32_precision settings
    of torch >= 2.9 ("tf32" or "ieee"; mixing them with the older allow_tf32 flags is an error there), else
    the allow_tf32 flags; returns both settings as read back."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    # cudnn.conv first: an older matmul raises AssertionError, not AttributeError, for an unknown name
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        matmul.fp32_precision = cudnn.conv.fp32_precision = "tf32" if on else "ieee"
        return {"matmul": matmul.fp32_precision, "cudnn_conv": cudnn.conv.fp32_precision}
    matmul.allow_tf32 = cudnn.allow_tf32 = on
    return {key: "tf32" if flag else "ieee" for key, flag in (("matmul", matmul.allow_tf32),
                                                              ("cudnn_conv", cudnn.allow_tf32))}


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
        reply({"error": f"{sys.executable} cannot import torch: {type(e).__name__}: {e}"})
        return
    on_gpu = spec["device"] == "cuda"
    if on_gpu and not torch.cuda.is_available():
        reply({"error": f"{sys.executable}'s torch {torch.__version__} has no usable CUDA "
                        "(torch.cuda.is_available() is false)"})
        return
    device = torch.device(spec["device"])
    torch.set_num_threads(os.cpu_count())  # Debian's torch starts with 1 thread here; the engine uses all cores
    flush_denormal = torch.set_flush_denormal(True)  # as the engine does (core/cpu_backend.cpp)
    if on_gpu:
        fp32_precision = set_tf32(torch, spec["precision"] == "tf32")
        torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    torch.manual_seed(0)
    cfg = spec["config"]
    model = tw.MdffSh(cfg).to(device)
    model.train()
    opt = torch.optim.RMSprop(model.parameters(), lr=cfg["lr"], alpha=cfg["alpha"], eps=cfg["eps"],
                              weight_decay=cfg["weight_decay"])
    n = spec["train_size"]
    train_labels = torch.zeros(n, cfg["classes"])
    train_labels[torch.arange(n), torch.arange(n) % cfg["classes"]] = 1
    train_labels = train_labels.to(device)
    U = (torch.rand(n, cfg["bits"]) * 2 - 1).to(device)
    inputs = {}
    phase_peaks = []

    def train_step():
        opt.zero_grad()
        u, logits = model(inputs["images"])
        total = tw.losses(u, logits, inputs["labels"], inputs["index"], U, train_labels, cfg)[3]
        total.item()  # as the engine's trainer reads the loss every step
        total.backward()
        opt.step()

    def encode_step():
        with torch.no_grad():
            model(inputs["encode_images"])

    def peak():
        """The phase's peak and the memory in use after it, in MiB; starts a new phase."""
        if on_gpu:
            measured = {"peak_mib": torch.cuda.max_memory_allocated() / MIB,
                        "after_mib": torch.cuda.memory_allocated() / MIB, "reset": True,
                        "reserved_peak_mib": torch.cuda.max_memory_reserved() / MIB}
            torch.cuda.reset_peak_memory_stats()
        else:
            measured = {"peak_mib": hwm_mib()}
            ctypes.CDLL(None).malloc_trim(0)  # glibc, as the engine
            measured["reset"] = reset_hwm()
            measured["after_mib"] = rss_mib()
        phase_peaks.append(measured["peak_mib"])
        return measured

    ready = {"ready": True, "version": torch.__version__, "python": sys.executable,
             "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
             "flush_denormal": flush_denormal, "baseline_rss_mib": baseline, "model_rss_mib": hwm_mib()}
    if on_gpu:
        ready.update({"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                      "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
                      "fp32_precision": fp32_precision,
                      "model_gpu_mib": torch.cuda.memory_allocated() / MIB})
    reply(ready)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "inputs":
            batch, encode_batch, size = (int(w) for w in words[1:4])
            index = torch.arange(batch, dtype=torch.int64, device=device) % n
            inputs = {"images": torch.randn(batch, 3, size, size, device=device), "index": index,
                      "labels": train_labels[index],
                      "encode_images": torch.randn(encode_batch, 3, size, size, device=device)}
            reply({"ok": True})
        elif words[0] in ("train", "encode"):
            step = train_step if words[0] == "train" else encode_step
            model.train(words[0] == "train")
            times = []
            for _ in range(int(words[1])):
                t0 = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t0)
            reply({"times": times})
        elif words[0] == "peak":
            reply(peak())
        elif words[0] == "empty_cache":
            if on_gpu:
                torch.cuda.empty_cache()
            reply({"ok": True})
        elif words[0] == "quit":
            reply({"process_peak_mib": max(phase_peaks + [peak()["peak_mib"]])})
            return
        else:
            reply({"error": f"unknown command {line.strip()!r}"})


if __name__ == "__main__":
    main()
