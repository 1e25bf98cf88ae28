#!/usr/bin/env python3
"""Breaks each backward pass on purpose, one at a time, and checks that the tests notice.

For every mutation below: edit the source, rebuild the gradient and autograd tests in their own build
folder, run them, require a failure, and restore the file. The test suite's perturbation hook
(tests/gradcheck.h) proves in every CI run that each gradient check reacts to a 1% error; this script
proves it also catches the kinds of mistakes people make in real backward code. A mutation that no longer
compiles is reported apart ("did not build") and fails the run: the tests never saw it, so it is not caught.
The file is restored however the run ends: an error, Ctrl-C, SIGTERM (a timeout, a cancelled CI job), SIGHUP.

    scripts/mutation_check.py [--build-dir build-mutation]
    scripts/mutation_check.py --list-only   # only checks that every mutation still applies (CI, < 1 s)
"""
import argparse
import os
import pathlib
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (op, file, original text, broken text): each original must occur exactly once.
MUTATIONS = [
    ("relu", "core/cpu_backend.cpp", "gx[i] = xp[i] > T(0) ? g : T(0);", "gx[i] = g;"),
    ("tanh", "core/cpu_backend.cpp", "gy[i] * (T(1) - yp[i] * yp[i])", "gy[i] * (T(1) - yp[i])"),
    ("softplus", "core/cpu_backend.cpp", "gy[i] * stable_sigmoid(xp[i])", "gy[i] * stable_sigmoid(-xp[i])"),
    ("pairwise_logistic_loss", "core/cpu_backend.cpp", "gp[i] = g * (stable_sigmoid(tp[i]) - sp[i]);",
     "gp[i] = g * stable_sigmoid(tp[i]);"),
    ("quantization_loss", "core/cpu_backend.cpp", "gp[i] = g * (up[i] - sign_value(up[i]));", "gp[i] = g * up[i];"),
    ("cross_entropy (targets not summing to 1)", "core/cpu_backend.cpp", "g * (softmax * mass - static_cast<double>(tp[i]))",
     "g * (softmax - static_cast<double>(tp[i]))"),
    ("conv2d (input gradient)", "core/cpu_backend.cpp", "++ow) out[ow * g.stride] += in[ow];",
     "++ow) out[ow * g.stride] = in[ow];"),
    ("conv2d (weight gradient)", "core/cpu_backend.cpp",
     "blas::gemm(false, true, g.cout, g.k(), width, T(1), gy_matrix.get(), width",
     "blas::gemm(false, true, g.cout, g.k(), width, T(-1), gy_matrix.get(), width"),
    ("conv2d (bias gradient)", "core/cpu_backend.cpp", "for (int64_t q = 0; q < g.p(); ++q) sum += plane[q];",
     "for (int64_t q = 1; q < g.p(); ++q) sum += plane[q];"),
    ("batch_norm2d (x, training)", "core/cpu_backend.cpp", "b[ch] = -g_is / count * sum_gy_xhat[ch] * is;",
     "b[ch] = 0;"),
    ("batch_norm2d (gamma)", "core/cpu_backend.cpp", "grad_gamma[t.c0 + ch] = static_cast<T>(sum_gy_xhat[ch]);",
     "grad_gamma[t.c0 + ch] = static_cast<T>(sum_gy[ch]);"),
    ("batch_norm2d (x, evaluation)", "core/cpu_backend.cpp",
     "gx[base + j] = static_cast<T>(col_invstd[j] * gy[base + j]);", "gx[base + j] = static_cast<T>(gy[base + j]);"),
    ("batch_norm2d_relu", "core/ops.cpp", "const Tensor gh = relu ? relu_grad(saved_y, g) : g;",
     "const Tensor gh = g;"),
    ("add_relu", "core/ops.cpp", "const Tensor gh = relu_grad(saved_out, g);", "const Tensor gh = g;"),
    ("max_pool2d", "core/cpu_backend.cpp", "dst[ap[pl * out_plane + q]] += gy[pl * out_plane + q];",
     "dst[ap[pl * out_plane + q]] = gy[pl * out_plane + q];"),
    ("global_avg_pool", "core/cpu_backend.cpp", "gy[pl] / T(plane)", "gy[pl] / T(plane + 1)"),
    ("upsample_nearest", "core/cpu_backend.cpp", "[](auto* gx, auto* gy, int64_t s, int64_t d) { gx[s] += gy[d]; }",
     "[](auto* gx, auto* gy, int64_t s, int64_t d) { gx[s] = gy[d]; }"),
    ("log_softmax", "core/cpu_backend.cpp", "gy[r * k + j] - std::exp(yp[r * k + j]) * sum",
     "gy[r * k + j] - std::exp(yp[r * k + j])"),
    ("gather_rows", "core/ops.cpp", "backend_of(g).scatter_rows(g, index, gs, true);",
     "backend_of(g).scatter_rows(g, index, gs, false);"),
    ("mul", "core/ops.cpp", "ga = a_needs ? reduce_to(mul(g, saved_b), sa) : Tensor();",
     "ga = a_needs ? reduce_to(g, sa) : Tensor();"),
    ("sub", "core/ops.cpp", "gb = b_needs ? reduce_to(scale(g, -1.0), sb) : Tensor();",
     "gb = b_needs ? reduce_to(g, sb) : Tensor();"),
    ("add (gradient of a broadcast input)", "core/cpu_backend.cpp",
     "for (int64_t i = 0; i < n; ++i) acc[broadcast_offset(i, shape, strides)] += sp[i];",
     "for (int64_t i = 0; i < n; ++i) acc[broadcast_offset(i, shape, strides)] = sp[i];"),
    ("matmul", "core/ops.cpp", "gb = trans_b ? matmul(g, saved_a, true, trans_a, alpha)",
     "gb = trans_b ? matmul(g, saved_a, true, !trans_a, alpha)"),
    ("matmul (alpha)", "core/ops.cpp", "matmul(g, saved_b, false, !trans_b, alpha);", "matmul(g, saved_b, false, !trans_b);"),
    ("linear (bias)", "core/ops.cpp", "b_needs ? reduce_to(g, bias_shape) : Tensor()}",
     "b_needs ? reduce_to(scale(g, 0.5), bias_shape) : Tensor()}"),
    ("concat", "core/ops.cpp", "backend_of(g).copy_block(gi, g, outer, inner[i], whole_inner, offsets[i], false);",
     "backend_of(g).copy_block(gi, g, outer, inner[i], whole_inner, 0, false);"),
    ("sum", "core/ops.cpp", "backend_of(g).binary(BinaryOp::Add, Tensor::zeros(shape, g.dtype(), g.device()), g, gx);",
     "backend_of(g).binary(BinaryOp::Add, Tensor::full(shape, 0.5, g.dtype(), g.device()), g, gx);"),
    ("autograd: summing gradients of a reused tensor", "core/autograd.cpp",
     "if (!inserted) accumulate_pending(slot->second, g);", "if (!inserted) slot->second = g;"),
    ("autograd: summing in place into a gradient another edge holds", "core/autograd.cpp",
     "const bool sole_owner = waiting.impl_ptr().use_count() == 1 && waiting.impl()->storage.use_count() == 1;",
     "const bool sole_owner = true;"),
    ("autograd: a leaf keeping as its .grad a gradient another edge holds", "core/autograd.cpp",
     "const bool sole_owner = g.impl_ptr().use_count() == 1 &&", "const bool sole_owner = true ||"),
]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run(cmd):
    """Runs cmd in the repository, output captured, in a process group of its own: when this script is stopped,
    the whole group is killed (subprocess.run kills only cmake itself, and the ninja and compilers it started
    could then build the mutated file after it was restored)."""
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            output, _ = process.communicate()
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    return subprocess.CompletedProcess(cmd, process.returncode, output)


def stop_through_finally():
    """Makes SIGTERM and SIGHUP, as SIGINT, raise an exception: by default they end Python at once, without the
    `finally` that restores the mutated source, which left core/*.cpp broken. A signal ignored when the script
    started (SIGINT in a background job) stays ignored."""
    def stop(signum, _frame):
        for other in STOP_SIGNALS:  # one stop is enough: a second signal must not cut the restore short
            signal.signal(other, signal.SIG_IGN)
        print(f"mutation_check: stopped by {signal.Signals(signum).name}; restoring the source", file=sys.stderr)
        raise SystemExit(128 + signum)
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, stop)


def restore(path, text):
    """Writes the original text back with the stop signals held, so that a second one cannot leave the file
    truncated between the open and the write; a signal held is acted on once the file is whole."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        path.write_text(text)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def first_error(build_output):
    """The compiler's first error line, which names what in the broken text no longer fits the source."""
    lines = build_output.strip().splitlines() or [""]
    return next((line for line in lines if "error" in line), lines[-1])[:200]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", default="build-mutation")
    parser.add_argument("--list-only", action="store_true",
                        help="check that each mutation's text occurs exactly once in its file, build nothing")
    args = parser.parse_args()
    stale = [f"{op}: the text to mutate occurs {(ROOT / rel).read_text().count(original)} times in {rel}"
             for op, rel, original, _ in MUTATIONS if (ROOT / rel).read_text().count(original) != 1]
    if stale:
        sys.exit("update this script's MUTATIONS:\n  " + "\n  ".join(stale))
    if args.list_only:
        print(f"all {len(MUTATIONS)} mutations apply")
        return
    stop_through_finally()
    build = args.build_dir
    configure = run(["cmake", "-S", ".", "-B", build, "-G", "Ninja", "-DMDFF_CUDA=OFF"])
    if configure.returncode:
        sys.exit(configure.stdout)
    targets = ["test_gradcheck", "test_autograd"]
    baseline = run(["cmake", "--build", build, "--target", *targets])
    if baseline.returncode or any(run([f"{build}/tests/{t}"]).returncode for t in targets):
        sys.exit("the unmutated tests do not pass: fix that first")
    caught, not_built, missed = [], [], []
    for op, rel, original, broken in MUTATIONS:
        path = ROOT / rel
        text = path.read_text()
        try:
            path.write_text(text.replace(original, broken))
            result = run(["cmake", "--build", build, "--target", *targets])
            if result.returncode:
                # The tests never ran: the broken text no longer fits the code around it.
                not_built.append(op)
                status = f"did not build: the mutation needs updating ({first_error(result.stdout)})"
            else:
                failed = [t for t in targets if run([f"{build}/tests/{t}"]).returncode != 0]
                (caught if failed else missed).append(op)
                status = "caught by " + ", ".join(failed) if failed else "NOT CAUGHT"
        finally:
            restore(path, text)
        print(f"{op:48s} {status}", flush=True)
    run(["cmake", "--build", build, "--target", *targets])  # leave the build matching the sources
    print(f"{len(caught)} of {len(MUTATIONS)} broken backward passes caught")
    if not_built:
        print(f"{len(not_built)} did not build (update them in MUTATIONS): {', '.join(not_built)}")
    if missed:
        print(f"{len(missed)} NOT CAUGHT: {', '.join(missed)}")
    sys.exit(0 if len(caught) == len(MUTATIONS) else 1)


if __name__ == "__main__":
    main()
