// The backward pass (see autograd.h): topological order, gradient summation, leaf accumulation.
#include "core/autograd.h"

#include <map>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "core/backend.h"
#include "core/error.h"

namespace mdff {

namespace {
thread_local bool grad_mode = true;

std::mutex perturbation_mutex;
std::map<std::string, double> perturbations;  // op name -> factor (testing::set_backward_perturbation)

double perturbation_for(const char* op) {
  std::lock_guard<std::mutex> lock(perturbation_mutex);
  if (perturbations.empty()) return 1.0;
  auto it = perturbations.find(op);
  return it == perturbations.end() ? 1.0 : it->second;
}

// Adds gradient g to the gradient already waiting for a node. In place when the waiting tensor is held by
// nothing else (no other edge, no view of its storage), as PyTorch does: no allocation, and one tensor of
// its size less at that moment; otherwise into a new tensor (an op may hand the same gradient to
// several edges, as add_relu does).
void accumulate_pending(Tensor& waiting, const Tensor& g) {
  MDFF_CHECK(waiting.shape() == g.shape(), "autograd: gradients of shapes ", shape_str(waiting.shape()), " and ",
             shape_str(g.shape()), " reach the same tensor");
  const bool sole_owner = waiting.impl_ptr().use_count() == 1 && waiting.impl()->storage.use_count() == 1;
  Tensor out = sole_owner ? waiting : Tensor::empty(waiting.shape(), waiting.dtype(), waiting.device());
  backend_of(waiting).binary(BinaryOp::Add, waiting, g, out);  // elementwise: safe in place
  waiting = out;
}

// A leaf's first gradient becomes its .grad without a copy when g is the only handle on its storage and spans
// all of it (no other edge or view holds it), as PyTorch's AccumulateGrad steals it; otherwise .grad is a
// copy, so that later sums into .grad change nothing anyone else sees.
void accumulate_into_leaf(TensorImpl& leaf, const Tensor& g) {
  MDFF_CHECK(g.shape() == leaf.shape, "autograd: gradient of shape ", shape_str(g.shape()),
             " for a leaf of shape ", shape_str(leaf.shape));
  if (!leaf.grad) {
    const bool sole_owner = g.impl_ptr().use_count() == 1 && g.impl()->storage.use_count() == 1 &&
                            g.impl()->offset_bytes == 0 && g.impl()->storage->bytes == g.nbytes();
    leaf.grad = (sole_owner ? g.detach() : g.clone()).impl_ptr();
  } else {
    Tensor existing(leaf.grad);
    backend_of(existing).binary(BinaryOp::Add, existing, g, existing);  // elementwise: safe in place
  }
}

// Nodes reachable from `root`, ordered so that every node comes before the nodes it feeds from
// (reverse post-order of a depth-first search; iterative, so deep graphs cannot overflow the stack).
std::vector<Node*> topological_order(Node* root) {
  std::vector<Node*> post_order;
  std::unordered_set<Node*> visited{root};
  std::vector<std::pair<Node*, size_t>> stack{{root, 0}};
  while (!stack.empty()) {
    auto& [node, next_edge] = stack.back();
    if (next_edge < node->edges.size()) {
      Node* child = node->edges[next_edge++].node.get();
      if (child && visited.insert(child).second) stack.emplace_back(child, 0);
    } else {
      post_order.push_back(node);
      stack.pop_back();
    }
  }
  return {post_order.rbegin(), post_order.rend()};
}
}  // namespace

bool grad_enabled() { return grad_mode; }

NoGradGuard::NoGradGuard() : previous_(grad_mode) { grad_mode = false; }
NoGradGuard::~NoGradGuard() { grad_mode = previous_; }

bool needs_grad(const std::vector<Tensor>& inputs) {
  if (!grad_mode) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

Tensor record(Tensor output, const char* name, const std::vector<Tensor>& inputs, BackwardFn backward) {
  if (!needs_grad(inputs)) return output;
  auto node = std::make_shared<Node>();
  node->name = name;
  node->backward = std::move(backward);
  node->edges.reserve(inputs.size());
  for (const Tensor& input : inputs) {
    Edge edge;
    if (input.defined() && input.grad_fn()) edge.node = input.grad_fn();
    else if (input.defined() && input.requires_grad()) edge.leaf = input.impl_ptr();
    node->edges.push_back(std::move(edge));
  }
  output.impl()->grad_fn = std::move(node);
  return output;
}

void run_backward(const Tensor& root, const Tensor& grad_output, bool retain_graph) {
  MDFF_CHECK(root.requires_grad(), "backward: this tensor does not require grad (no input of the ops that made it "
             "was marked with set_requires_grad, or it was computed under NoGradGuard)");
  Tensor seed = grad_output;
  if (!seed.defined()) {
    MDFF_CHECK(root.numel() == 1, "backward: a tensor of shape ", shape_str(root.shape()),
               " needs an explicit grad_output (only one-element tensors get the implicit 1)");
    seed = Tensor::full(root.shape(), 1.0, root.dtype(), root.device());
  }
  MDFF_CHECK(seed.shape() == root.shape(), "backward: grad_output of shape ", shape_str(seed.shape()),
             " for a tensor of shape ", shape_str(root.shape()));
  check_same_dtype(seed, root, "backward");
  check_same_device(seed, root, "backward");

  NoGradGuard no_grad;  // the backward pass itself records nothing
  if (root.is_leaf()) {
    accumulate_into_leaf(*root.impl(), seed);
    return;
  }
  std::unordered_map<Node*, Tensor> pending{{root.grad_fn().get(), seed}};
  for (Node* node : topological_order(root.grad_fn().get())) {
    auto it = pending.find(node);
    if (it == pending.end()) continue;  // no gradient reached this node
    const Tensor grad = std::move(it->second);
    pending.erase(it);
    MDFF_CHECK(node->backward, "backward: the graph through op '", node->name, "' was already released by an earlier "
               "backward(); pass retain_graph=true to that call to backpropagate twice");
    std::vector<Tensor> grads = node->backward(grad);
    MDFF_CHECK(grads.size() == node->edges.size(), "autograd: op '", node->name, "' returned ", grads.size(),
               " gradients for ", node->edges.size(), " inputs");
    if (!retain_graph) node->backward = nullptr;  // frees the tensors its closure saved
    const double factor = perturbation_for(node->name);
    for (size_t i = 0; i < grads.size(); ++i) {
      const Edge& edge = node->edges[i];
      if (!grads[i].defined() || (!edge.node && !edge.leaf)) continue;
      Tensor g = std::move(grads[i]);  // so that a leaf can keep it when nothing else holds it
      if (factor != 1.0) {
        Tensor scaled = Tensor::empty(g.shape(), g.dtype(), g.device());
        backend_of(g).scale(g, factor, scaled);
        g = scaled;
      }
      if (edge.leaf) {
        accumulate_into_leaf(*edge.leaf, g);
      } else {
        auto [slot, inserted] = pending.try_emplace(edge.node.get(), g);
        if (!inserted) accumulate_pending(slot->second, g);
      }
    }
  }
}

namespace testing {
void set_backward_perturbation(const std::string& op, double factor) {
  std::lock_guard<std::mutex> lock(perturbation_mutex);
  if (factor == 1.0) perturbations.erase(op);
  else perturbations[op] = factor;
}
}  // namespace testing

}  // namespace mdff
