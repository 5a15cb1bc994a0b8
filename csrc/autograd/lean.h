// Lean training's record of the activations the C++ autograd Functions write (pyfast/ops/lean.py has the design):
// while Python's lean scope is open, each Function records its output with what rebuilds it, and the scope's
// saved-tensor hook asks for a tensor's recipe when any op saves it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pyfast::autograd::lean {

// act(x*scale + shift [+ residual*res_scale + res_shift]), as primitives::bn_act_forward computes it (the
// Functions' own forward pass: the rebuild is bit-identical). Undefined tensors are absent arguments.
struct Recipe {
  at::Tensor x, scale, shift, residual, res_scale, res_shift;
  bool relu;
};

// On: the Functions record (the scope opens); off: nothing is recorded and every record is dropped.
void set_recording(bool on);
bool recording();
void record(const at::Tensor& activation, Recipe recipe);
// `t`'s recipe, if a Function recorded `t` itself (not another tensor at its address) and `t` is unchanged since;
// the record is dropped, Python keeping the recipe from then on. (A record holds its tensors, a block output's
// shortcut among them, so it is taken at the activation's first save, while that shortcut is still alive and
// Python can reference it by its own recipe instead.)
std::optional<Recipe> take(const at::Tensor& t);

}  // namespace pyfast::autograd::lean
