// Module bookkeeping (see module.h).
#include "layers/module.h"

#include "core/error.h"

namespace mdff {

Tensor& Module::register_parameter(const std::string& name, Tensor value) {
  MDFF_CHECK(is_floating(value.dtype()), "parameter ", name, " must be a float tensor");
  value.set_requires_grad(true);
  parameters_.emplace_back(name, std::move(value));
  return parameters_.back().second;
}

Tensor& Module::register_buffer(const std::string& name, Tensor value) {
  buffers_.emplace_back(name, std::move(value));
  return buffers_.back().second;
}

void Module::collect(const std::string& prefix, bool parameters, NamedTensors& out) const {
  for (const auto& [name, t] : parameters ? parameters_ : buffers_) out.emplace_back(prefix + name, t);
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", parameters, out);
}

NamedTensors Module::named_parameters() const {
  NamedTensors out;
  collect("", true, out);
  return out;
}

NamedTensors Module::named_buffers() const {
  NamedTensors out;
  collect("", false, out);
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  for (auto& [name, t] : named_parameters()) out.push_back(t);
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (const auto& [name, t] : named_parameters()) n += t.numel();
  return n;
}

void Module::train(bool on) {
  training_ = on;
  for (auto& [name, child] : children_) child->train(on);
}

void Module::zero_grad() {
  for (auto& [name, t] : named_parameters()) t.zero_grad();
}

void Module::to(Device device) {
  for (auto* list : {&parameters_, &buffers_})
    for (auto& [name, t] : *list)
      if (t.device() != device) t.rebind_storage(t.to(device));  // handles elsewhere see the move too
  for (auto& [name, child] : children_) child->to(device);
}

void Module::to(DType dtype) {
  for (auto* list : {&parameters_, &buffers_})
    for (auto& [name, t] : *list)
      if (is_floating(t.dtype()) && t.dtype() != dtype) t.rebind_storage(t.to(dtype));
  for (auto& [name, child] : children_) child->to(dtype);
}

}  // namespace mdff
