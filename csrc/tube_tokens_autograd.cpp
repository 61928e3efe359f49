// Autograd of the tubevit op family, in C++ (dispatch key Autograd), written
// the way PyTorch's generated code writes it for its own ops: one
// torch::autograd::Node per op, its inputs saved as SavedVariables, the
// kernel called below autograd. A Python autograd kernel (what
// torch.library.register_autograd installs) runs on every call, even under
// no_grad, and cost ~14 us of a ~22 us tiny CPU call and ~35 us more with
// grad on (bench/host_overhead.py); this costs about what an ATen op's
// autograd costs.
//
// What each backward computes (per tube i; P_i(x): the patch matrix, G_i:
// the tube's rows of the tokens' gradient):
//   tube_tokens:           dx = col2im(G_i W_i), dW_i = G_i^T P_i(x),
//                          db_i = colsum(G_i), dpe = sum over the batch of G
//                          -> all but dpe by the backward op.
//   tube_tokens_backward:  it is bilinear in (G, W) for dx and in (G, x) for
//                          dW, linear in G for db, so with cotangents u (of
//                          dx), V (of dW), c (of db):
//                            grad_G = F(u; W) + F(x; V, c)
//                            grad_x = Bx(G, V),  grad_W = Bw(G, u)
//                          made of the two ops again (F: tube_tokens), each
//                          differentiable, so derivatives of any order work.
// Forward mode (torch.autograd.forward_ad) uses the same bilinearity:
//   tokens' tangent = F(x_t; W) + F(x; W_t, b_t) + pe_t, and for the
//   backward op dx_t = Bx(G_t, W) + Bx(G, W_t), dW_t = Bw(G_t, x) + Bw(G, x_t),
//   db_t = Bb(G_t).
// torch.func.vmap uses the vmap rules of tubevit_ext/_ops.py, which fold the
// vmapped dimension into the batch and call these ops.
//
// Edge order of each node (= the op's differentiable inputs in schema order):
//   TubeTokensBackward0:          x, weights[0..n), biases[0..m), pos_embed
//   TubeTokensBackwardBackward0:  grad_out, x, weights[0..n)
// (patches, tubes and output_mask are not differentiable).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

namespace tubevit {
namespace {

using torch::autograd::CompiledNodeArgs;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::SwapSavedVariables;
using torch::autograd::variable_list;

// Nodes are held by std::shared_ptr up to torch 2.11 and by c10::intrusive_ptr
// after; Edge::function names the one this torch uses.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    // torch::autograd::deleteNode (found by ADL: the name exists only in
    // the torch versions that take this branch) frees long chains without
    // recursion, as PyTorch's own nodes are freed.
    return std::shared_ptr<T>(new T(), [](T* p) { deleteNode(p); });
  } else {
    return c10::make_intrusive<T>();
  }
}

using Tensors = std::vector<at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, Tensors, Tensors>;

// The ops, looked up once. Calls through them dispatch in full (autograd
// included), which is what the formulas need to stay differentiable.
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef,
                                          const std::optional<at::Tensor>&)>&
forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tubevit::tube_tokens", "")
                             .typed<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef,
                                               const std::optional<at::Tensor>&)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, Tensors>(
    const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, const std::optional<at::Tensor>&)>&
forward_with_patches_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tubevit::tube_tokens_with_patches", "")
                             .typed<std::tuple<at::Tensor, Tensors>(const at::Tensor&, at::TensorList, at::TensorList,
                                                                    at::IntArrayRef,
                                                                    const std::optional<at::Tensor>&)>();
  return op;
}

const c10::TypedOperatorHandle<BackwardResult(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                              at::IntArrayRef, std::array<bool, 3>)>&
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tubevit::tube_tokens_backward", "")
                             .typed<BackwardResult(const at::Tensor&, const at::Tensor&, at::TensorList,
                                                   at::TensorList, at::IntArrayRef, std::array<bool, 3>)>();
  return op;
}

// ------------------------------------------------------------------ formulas

bool any_defined(const Tensors& ts) {
  for (const auto& t : ts)
    if (t.defined()) return true;
  return false;
}

// ts with zeros_like(like[i]) where ts[i] is undefined.
Tensors filled(const Tensors& ts, const Tensors& like) {
  Tensors out;
  out.reserve(like.size());
  for (size_t i = 0; i < like.size(); ++i)
    out.push_back(i < ts.size() && ts[i].defined() ? ts[i] : at::zeros_like(like[i]));
  return out;
}

// The tokens' change along (x_t, w_t, b_t, pe_t), absent terms left out
// (undefined if all are): F(x_t; W) + F(x; w_t, b_t) + pe_t. w_t / b_t may
// be empty or hold undefined entries.
at::Tensor tokens_tangent(at::IntArrayRef tubes, const at::Tensor& x, const Tensors& weights, const at::Tensor& x_t,
                          const Tensors& w_t, const Tensors& b_t, const at::Tensor& pe_t) {
  at::Tensor out;
  if (x_t.defined()) out = forward_op().call(x_t, weights, {}, tubes, std::nullopt);
  const bool has_w = any_defined(w_t), has_b = any_defined(b_t);
  if (has_w || has_b) {
    Tensors bias_like;
    if (has_b)
      for (const auto& w : weights) bias_like.push_back(w.new_empty({w.size(0)}));
    const Tensors wf = filled(has_w ? w_t : Tensors{}, weights);
    const at::Tensor term = forward_op().call(x, wf, has_b ? filled(b_t, bias_like) : Tensors{}, tubes,
                                              pe_t.defined() ? std::optional<at::Tensor>(pe_t) : std::nullopt);
    out = out.defined() ? out + term : term;
  } else if (pe_t.defined()) {
    out = out.defined() ? out + pe_t : pe_t.unsqueeze(0).expand({x.size(0), pe_t.size(0), pe_t.size(1)}).contiguous();
  }
  return out;
}

BackwardResult call_backward(const at::Tensor& G, const at::Tensor& x, const Tensors& weights, at::IntArrayRef tubes,
                             std::array<bool, 3> mask) {
  return backward_op().call(G, x, weights, {}, tubes, mask);
}

const at::Tensor& fw_grad(const at::Tensor& t) { return t._fw_grad(/*level=*/0); }

bool any_fw_grad(const at::Tensor& x, at::TensorList a, at::TensorList b, const std::optional<at::Tensor>& c) {
  if (torch::autograd::isFwGradDefined(x) || torch::autograd::isFwGradDefined(c)) return true;
  for (const auto& t : a)
    if (torch::autograd::isFwGradDefined(t)) return true;
  for (const auto& t : b)
    if (torch::autograd::isFwGradDefined(t)) return true;
  return false;
}

// Primal of a dual tensor (itself when it has no tangent).
at::Tensor primal(const at::Tensor& t) { return torch::autograd::isFwGradDefined(t) ? t._fw_primal(0) : t; }

Tensors primals(at::TensorList ts) {
  Tensors out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(primal(t));
  return out;
}

Tensors tangents(at::TensorList ts) {
  Tensors out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.defined() ? fw_grad(t) : at::Tensor());
  return out;
}

Tensors unpack_all(const std::vector<SavedVariable>& saved) {
  Tensors out;
  out.reserve(saved.size());
  for (const auto& s : saved) out.push_back(s.unpack());
  return out;
}

void save_all(std::vector<SavedVariable>& dst, at::TensorList ts) {
  dst.reserve(ts.size());
  for (const auto& t : ts) dst.emplace_back(t, /*is_output=*/false);
}

// ------------------------------------------------------------------ nodes

// Compiled autograd's protocol for a node's saved state: swap each in
// (before), run the backward, swap each back (after), in the same order.
template <typename F, typename... Saved>
variable_list with_swapped(SwapSavedVariables& swap, F&& backward, Saved&... saved) {
  (swap.before(saved), ...);
  variable_list result = backward();
  (swap.after(saved), ...);
  return result;
}

struct TubeTokensBackward0 : public Node {
  std::string name() const override { return "TubeTokensBackward0"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list result(num_outputs());
    const at::Tensor& G = grads[0];
    if (!G.defined()) return result;  // no gradient reached the tokens
    const size_t nw = weights_.size(), b0 = 1 + nw, pe_i = b0 + n_biases_;
    const bool need_x = task_should_compute_output(0);
    bool need_w = false, need_b = false;
    for (size_t i = 1; i < b0; ++i) need_w = need_w || task_should_compute_output(i);
    for (size_t i = b0; i < pe_i; ++i) need_b = need_b || task_should_compute_output(i);
    if (need_x || need_w || need_b) {
      const Tensors weights = unpack_all(weights_);
      // Saved patches only serve dW; an empty list makes the backend gather.
      const Tensors patches = need_w ? unpack_all(patches_) : Tensors{};
      auto [dx, dws, dbs] = backward_op().call(G, x_.unpack(), weights, patches, tubes_, {need_x, need_w, need_b});
      if (need_x) result[0] = std::move(dx);
      for (size_t i = 0; need_w && i < nw; ++i)
        if (task_should_compute_output(1 + i)) result[1 + i] = std::move(dws[i]);
      for (size_t i = 0; need_b && i < n_biases_; ++i)
        if (task_should_compute_output(b0 + i)) result[b0 + i] = std::move(dbs[i]);
    }
    if (has_pe_ && task_should_compute_output(pe_i)) result[pe_i] = G.sum(0);
    return result;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    for (auto& s : weights_) s.reset_data();
    for (auto& s : patches_) s.reset_data();
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    args.collect(x_, false);
    args.collect(weights_, false);
    args.collect(patches_, false);
    args.collect(tubes_);
    args.collect(n_biases_);
    args.collect(has_pe_);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    return with_swapped(saved, [&] { return apply(variable_list(grads)); }, x_, weights_, patches_);
  }

  SavedVariable x_;
  std::vector<SavedVariable> weights_, patches_;
  std::vector<int64_t> tubes_;
  size_t n_biases_ = 0;
  bool has_pe_ = false;
};

struct TubeTokensBackwardBackward0 : public Node {
  std::string name() const override { return "TubeTokensBackwardBackward0"; }

  // grads: the cotangents of (dx, dws..., dbs...), the groups present as the
  // forward's output_mask asked for them (dx always: empty when not asked).
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list result(num_outputs());
    const size_t nw = weights_.size();
    const at::Tensor u = mask_[0] ? grads[0] : at::Tensor();
    Tensors V, c;
    size_t k = 1;
    if (mask_[1])
      for (size_t i = 0; i < nw; ++i) V.push_back(grads[k++]);
    if (mask_[2])
      for (size_t i = 0; i < nw; ++i) c.push_back(grads[k++]);
    const bool need_g = task_should_compute_output(0), need_x = task_should_compute_output(1);
    bool need_w = false;
    for (size_t i = 0; i < nw; ++i) need_w = need_w || task_should_compute_output(2 + i);
    const bool has_v = any_defined(V);
    if (!need_g && !(need_x && has_v) && !(need_w && u.defined())) return result;
    const at::Tensor G = grad_out_.unpack(), x = x_.unpack();
    const Tensors weights = unpack_all(weights_);
    if (need_g) result[0] = tokens_tangent(tubes_, x, weights, u, V, c, at::Tensor());
    if (need_x && has_v) result[1] = std::get<0>(call_backward(G, x, filled(V, weights), tubes_, {true, false, false}));
    if (need_w && u.defined()) {
      Tensors gW = std::get<1>(call_backward(G, u, weights, tubes_, {false, true, false}));
      for (size_t i = 0; i < nw; ++i)
        if (task_should_compute_output(2 + i)) result[2 + i] = std::move(gW[i]);
    }
    return result;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    grad_out_.reset_data();
    x_.reset_data();
    for (auto& s : weights_) s.reset_data();
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    args.collect(grad_out_, false);
    args.collect(x_, false);
    args.collect(weights_, false);
    args.collect(tubes_);
    args.collect(std::vector<bool>(mask_.begin(), mask_.end()));
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    return with_swapped(saved, [&] { return apply(variable_list(grads)); }, grad_out_, x_, weights_);
  }

  SavedVariable grad_out_, x_;
  std::vector<SavedVariable> weights_;
  std::vector<int64_t> tubes_;
  std::array<bool, 3> mask_{};
};

// ------------------------------------------------------------------ kernels

// Shared by tube_tokens and tube_tokens_with_patches: the node (null when no
// input requires grad or grad mode is off) before the call, history and
// tangent after it.
NodePtr tokens_node(const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::IntArrayRef tubes,
                    const std::optional<at::Tensor>& pos_embed) {
  if (!torch::autograd::compute_requires_grad(x, weights, biases, pos_embed)) return nullptr;
  NodePtr node = make_node<TubeTokensBackward0>();
  auto* n = static_cast<TubeTokensBackward0*>(node.get());
  node->set_next_edges(torch::autograd::collect_next_edges(x, weights, biases, pos_embed));
  n->tubes_ = tubes.vec();
  n->n_biases_ = biases.size();
  n->has_pe_ = pos_embed.has_value() && pos_embed->defined();
  return node;
}

void finish_tokens(const NodePtr& node, at::Tensor& out, const at::Tensor& x, at::TensorList weights,
                   at::TensorList biases, at::IntArrayRef tubes, const std::optional<at::Tensor>& pos_embed,
                   at::TensorList patches) {
  if (node) {
    auto* n = static_cast<TubeTokensBackward0*>(node.get());
    n->x_ = SavedVariable(x, /*is_output=*/false);
    save_all(n->weights_, weights);
    save_all(n->patches_, patches);
    torch::autograd::set_history(out, node);
  }
  if (any_fw_grad(x, weights, biases, pos_embed)) {
    const at::Tensor pe_t =
        pos_embed.has_value() && pos_embed->defined() ? fw_grad(*pos_embed) : at::Tensor();
    const at::Tensor t = tokens_tangent(tubes, primal(x), primals(weights), fw_grad(x), tangents(weights),
                                        tangents(biases), pe_t);
    if (t.defined()) out._set_fw_grad(t, /*level=*/0, /*is_inplace_op=*/false);
  }
}

at::Tensor tube_tokens_autograd(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                at::IntArrayRef tubes, const std::optional<at::Tensor>& pos_embed) {
  NodePtr node = tokens_node(x, weights, biases, tubes, pos_embed);
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = forward_op().call(x, weights, biases, tubes, pos_embed);
  }
  finish_tokens(node, out, x, weights, biases, tubes, pos_embed, {});
  return out;
}

std::tuple<at::Tensor, Tensors> tube_tokens_with_patches_autograd(const at::Tensor& x, at::TensorList weights,
                                                                  at::TensorList biases, at::IntArrayRef tubes,
                                                                  const std::optional<at::Tensor>& pos_embed) {
  NodePtr node = tokens_node(x, weights, biases, tubes, pos_embed);
  std::tuple<at::Tensor, Tensors> res;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    res = forward_with_patches_op().call(x, weights, biases, tubes, pos_embed);
  }
  // The patches are not differentiable (no history): the node keeps them
  // for dW, the one thing saved here that the caller does not hold.
  finish_tokens(node, std::get<0>(res), x, weights, biases, tubes, pos_embed, std::get<1>(res));
  return res;
}

BackwardResult tube_tokens_backward_autograd(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                             at::TensorList patches, at::IntArrayRef tubes,
                                             std::array<bool, 3> output_mask) {
  NodePtr node;
  if (torch::autograd::compute_requires_grad(grad_out, x, weights)) {
    node = make_node<TubeTokensBackwardBackward0>();
    auto* n = static_cast<TubeTokensBackwardBackward0*>(node.get());
    node->set_next_edges(torch::autograd::collect_next_edges(grad_out, x, weights));
    n->tubes_ = tubes.vec();
    n->mask_ = output_mask;
  }
  BackwardResult res;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    res = backward_op().call(grad_out, x, weights, patches, tubes, output_mask);
  }
  auto& [dx, dws, dbs] = res;
  if (node) {
    auto* n = static_cast<TubeTokensBackwardBackward0*>(node.get());
    n->grad_out_ = SavedVariable(grad_out, false);
    n->x_ = SavedVariable(x, false);
    save_all(n->weights_, weights);
    torch::autograd::set_history(dx, node);
    torch::autograd::set_history(dws, node);
    torch::autograd::set_history(dbs, node);
  }
  if (any_fw_grad(grad_out, {x}, weights, std::nullopt)) {
    const at::Tensor G = primal(grad_out), xp = primal(x), G_t = fw_grad(grad_out), x_t = fw_grad(x);
    const Tensors W = primals(weights), W_t = tangents(weights);
    const bool has_wt = any_defined(W_t);
    if (output_mask[0] && (G_t.defined() || has_wt)) {
      at::Tensor t;
      if (G_t.defined()) t = std::get<0>(call_backward(G_t, xp, W, tubes, {true, false, false}));
      if (has_wt) {
        at::Tensor s = std::get<0>(call_backward(G, xp, filled(W_t, W), tubes, {true, false, false}));
        t = t.defined() ? t + s : s;
      }
      dx._set_fw_grad(t, 0, false);
    }
    if (output_mask[1] && (G_t.defined() || x_t.defined())) {
      Tensors t;
      if (G_t.defined()) t = std::get<1>(call_backward(G_t, xp, W, tubes, {false, true, false}));
      if (x_t.defined()) {
        const Tensors s = std::get<1>(call_backward(G, x_t, W, tubes, {false, true, false}));
        if (t.empty()) t = s;
        else
          for (size_t i = 0; i < s.size(); ++i) t[i] = t[i] + s[i];
      }
      for (size_t i = 0; i < dws.size(); ++i) dws[i]._set_fw_grad(t[i], 0, false);
    }
    if (output_mask[2] && G_t.defined()) {
      Tensors t = std::get<2>(call_backward(G_t, xp, W, tubes, {false, false, true}));
      for (size_t i = 0; i < dbs.size(); ++i) dbs[i]._set_fw_grad(t[i], 0, false);
    }
  }
  return res;
}

}  // namespace
}  // namespace tubevit

TORCH_LIBRARY_IMPL(tubevit, Autograd, m) {
  m.impl("tube_tokens", &tubevit::tube_tokens_autograd);
  m.impl("tube_tokens_with_patches", &tubevit::tube_tokens_with_patches_autograd);
  m.impl("tube_tokens_backward", &tubevit::tube_tokens_backward_autograd);
}
