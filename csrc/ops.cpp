// Every schema of the stablenets library, declared once. Backends register
// kernels in csrc/cpu/*.cpp and csrc/cuda/*.cu.
//
// States stored for the backward have shape (layers, slots, batch, features):
//   resnet, antisymmetric, leapfrog: slots = 2, [Y_j, A_j]   (layer input, act(P_j))
//   verlet: slots = 4, [Y_j, A1_j, Z_{j+1/2}, A2_j]           (A1 = act(Y_j K_j + b_j),
//                                                               A2 = act(Z_{j+1/2} K_j^T + b_j))
// Keeping act(P) rather than P gives act' (1 - A^2, A > 0, 1) and act itself
// without a second activation evaluation. The memory order inside a
// (layer, slot) block belongs to the backend and the width regime that wrote it
// (the CPU tile kernels keep their feature-major tiles): only the matching
// backward op reads states, and a backend may store P instead of act(P) where
// that suits its kernels.
// With store=False the forward returns states with 0 layers; leapfrog and
// verlet then differentiate with the *_backward_reversible ops, which rebuild
// the states from the final ones. They return the four gradients and then the
// rebuilt forward inputs ((Y_0, Y_{-1}) or (Y_0, Z_{-1/2})), which the caller
// compares with the true inputs to detect a loss of reversibility.
#include <Python.h>
#include <torch/library.h>

// Importing stablenets_ext._C registers the ops; the module itself holds only
// the hooks of the autograd formulas (csrc/autograd.cpp).
extern PyMethodDef stablenets_module_methods[];

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          stablenets_module_methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(stablenets, m) {
  m.def(
      "resnet_forward(Tensor y, Tensor weight, Tensor bias, float step, str activation, "
      "bool store) -> (Tensor, Tensor)");
  m.def(
      "resnet_backward(Tensor grad_out, Tensor states, Tensor weight, Tensor bias, float step, "
      "str activation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "antisymmetric_forward(Tensor y, Tensor weight, Tensor bias, float step, float gamma, "
      "str activation, bool store) -> (Tensor, Tensor)");
  m.def(
      "antisymmetric_backward(Tensor grad_out, Tensor states, Tensor weight, Tensor bias, "
      "float step, float gamma, str activation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "leapfrog_forward(Tensor y, Tensor y_prev, Tensor weight, Tensor bias, float step, "
      "str activation, bool store) -> (Tensor, Tensor, Tensor)");
  m.def(
      "leapfrog_backward(Tensor grad_y, Tensor grad_y_prev, Tensor states, Tensor weight, "
      "Tensor bias, float step, str activation) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "leapfrog_backward_reversible(Tensor grad_y, Tensor grad_y_prev, Tensor y, Tensor y_prev, "
      "Tensor weight, Tensor bias, float step, str activation) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
  m.def(
      "verlet_forward(Tensor y, Tensor z, Tensor weight, Tensor bias, float step, "
      "str activation, bool store) -> (Tensor, Tensor, Tensor)");
  m.def(
      "verlet_backward(Tensor grad_y, Tensor grad_z, Tensor states, Tensor weight, Tensor bias, "
      "float step, str activation) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "verlet_backward_reversible(Tensor grad_y, Tensor grad_z, Tensor y, Tensor z, "
      "Tensor weight, Tensor bias, float step, str activation) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
  // Convolutional stacks (csrc/include/stablenets/conv_stack.h): y is
  // (B, C, H, W), weight (layers, C, C, k, k) with odd k ("same" padding),
  // bias (layers, C). States (layers, slots, B, C, H, W) hold pre-activations:
  // [Y_j, P_j] (slots = 2) or, for verlet, [Y_j, P1_j, Z_{j+1/2}, P2_j].
  // The reversible backwards return the rebuilt inputs last, as the dense ones.
  m.def(
      "conv_resnet_forward(Tensor y, Tensor weight, Tensor bias, float step, str activation, "
      "bool store) -> (Tensor, Tensor)");
  m.def(
      "conv_resnet_backward(Tensor grad_out, Tensor states, Tensor weight, Tensor bias, "
      "float step, str activation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_antisymmetric_forward(Tensor y, Tensor weight, Tensor bias, float step, float gamma, "
      "str activation, bool store) -> (Tensor, Tensor)");
  m.def(
      "conv_antisymmetric_backward(Tensor grad_out, Tensor states, Tensor weight, Tensor bias, "
      "float step, float gamma, str activation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_leapfrog_forward(Tensor y, Tensor y_prev, Tensor weight, Tensor bias, float step, "
      "str activation, bool store) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_leapfrog_backward(Tensor grad_y, Tensor grad_y_prev, Tensor states, Tensor weight, "
      "Tensor bias, float step, str activation) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "conv_leapfrog_backward_reversible(Tensor grad_y, Tensor grad_y_prev, Tensor y, "
      "Tensor y_prev, Tensor weight, Tensor bias, float step, str activation) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "conv_verlet_forward(Tensor y, Tensor z, Tensor weight, Tensor bias, float step, "
      "str activation, bool store) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_verlet_backward(Tensor grad_y, Tensor grad_z, Tensor states, Tensor weight, "
      "Tensor bias, float step, str activation) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "conv_verlet_backward_reversible(Tensor grad_y, Tensor grad_z, Tensor y, Tensor z, "
      "Tensor weight, Tensor bias, float step, str activation) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
