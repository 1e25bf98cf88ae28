// How a convolution chooses between the algorithms its search measured, by the memory it would add
// (cuda/conv.cpp uses it; device-independent, so that the rules are tested without a GPU).
//
// A plan keeps two algorithms: the fastest, and a lean one (the fastest that needs at most a small
// workspace, or the one needing the least when none is that small). Each call takes the fastest unless
// its workspace would lift the memory in use above the highest level seen at any convolution call
// before: at the moments of a training step when memory is at its peak (the end of the forward pass, the
// start of backward) the lean algorithm runs, and the fastest everywhere else. A workspace then does not
// raise the step's peak of bytes in use by more than the lean one's, where PyTorch's benchmark mode takes
// the fastest algorithm's workspace even at the peak. What this bounds is memory in use, sampled at
// convolution calls: other ops may peak higher (the rule is then only more cautious than it needs to
// be), and the allocator may still need a new segment for a workspace that fits by count but not in one
// free block (the reserved peak).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <vector>

namespace mdff {

// The workspace a lean algorithm may take: 4 MiB, about 0.1% of a ResNet50 training step's peak at 224x224.
constexpr size_t kLeanWorkspaceBytes = size_t(4) << 20;

// One usable algorithm as a search measured it.
struct MeasuredAlgorithm {
  size_t workspace_bytes = 0;
  float milliseconds = 0;
};

// Positions in the list of the two algorithms a plan keeps (-1 for an empty list): the fastest, and the
// lean one: the fastest of those needing at most lean_bytes, else the one needing the least (the faster on
// a tie). They are the same when the fastest is lean.
struct AlgorithmPair {
  int fastest = -1;
  int lean = -1;
};

inline AlgorithmPair choose_fastest_and_lean(const std::vector<MeasuredAlgorithm>& usable,
                                             size_t lean_bytes = kLeanWorkspaceBytes) {
  auto lean_rank = [&](const MeasuredAlgorithm& a) {
    const bool fits = a.workspace_bytes <= lean_bytes;
    return std::make_tuple(!fits, fits ? size_t(0) : a.workspace_bytes, a.milliseconds);
  };
  AlgorithmPair pair;
  for (int i = 0; i < static_cast<int>(usable.size()); ++i) {
    if (pair.fastest < 0 || usable[i].milliseconds < usable[pair.fastest].milliseconds) pair.fastest = i;
    if (pair.lean < 0 || lean_rank(usable[i]) < lean_rank(usable[pair.lean])) pair.lean = i;
  }
  return pair;
}

// The highest memory in use seen at a convolution call, and whether a workspace fits under it.
class WorkspaceHeadroom {
 public:
  // At a call with `in_use` bytes held by tensors (before its workspace): whether `workspace_bytes` more
  // stays within the highest level seen at any call so far, this one included.
  bool fits(size_t in_use, size_t workspace_bytes) {
    observe(in_use);
    return workspace_bytes <= mark_ - in_use;
  }
  // At a call that takes no workspace: its `in_use` bytes still count toward the mark.
  void observe(size_t in_use) { mark_ = std::max(mark_, in_use); }
  size_t mark() const { return mark_; }

 private:
  size_t mark_ = 0;
};

}  // namespace mdff
