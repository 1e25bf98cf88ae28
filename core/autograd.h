// Reverse-mode automatic differentiation over a graph recorded as ops run.
//
// Each op that sees an input requiring grad (while grad mode is on) attaches a Node to its output.
// A Node keeps a backward function (closure over the tensors it saved) and one Edge per input: the
// Node that produced that input, or the leaf tensor that wants .grad. Edges do not hold the input
// tensors themselves, so an activation is freed as soon as no backward closure needs it.
//
// backward() runs the Nodes in reverse topological order, sums the gradients that reach a tensor
// from several consumers (the FPN top-down path reuses every level), and accumulates (+=) into the
// .grad of leaves: two backward passes give twice the gradient.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace mdff {

struct Edge {
  std::shared_ptr<Node> node;        // the input came from this op...
  std::shared_ptr<TensorImpl> leaf;  // ...or is this leaf that wants .grad; both empty: no gradient
};

// Receives d(loss)/d(output) and returns d(loss)/d(input) for each input, in order; an undefined
// Tensor means "no gradient for this input".
using BackwardFn = std::function<std::vector<Tensor>(const Tensor& grad_output)>;

struct Node {
  const char* name;  // the op, for error messages and the gradient-perturbation test hook
  std::vector<Edge> edges;
  BackwardFn backward;  // empty once the graph has been released
};

// True while ops should record the graph (thread-local; on by default).
bool grad_enabled();

// Turns graph recording off for its lifetime: evaluation, optimizer updates, running statistics.
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

// Whether an op with these inputs must record a Node.
bool needs_grad(const std::vector<Tensor>& inputs);

// Attaches a Node named `name` to `output` if any input needs grad; returns output either way.
// `inputs` are in the order of the gradients `backward` returns.
Tensor record(Tensor output, const char* name, const std::vector<Tensor>& inputs, BackwardFn backward);

void run_backward(const Tensor& root, const Tensor& grad_output, bool retain_graph);

namespace testing {
// Test hook: multiplies every gradient that Nodes named `op` return by `factor` (1 = off). Tests use
// it to prove that each gradient check is able to fail for that op.
void set_backward_perturbation(const std::string& op, double factor);
}  // namespace testing

}  // namespace mdff
