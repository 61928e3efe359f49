// Schemas of the tubevit op family and the argument checks every backend
// shares. Backends live in cpu/ and cuda/ and register themselves at the
// bottom of their own files (torchvision's csrc/ops pattern).
#include "tube_tokens.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <sstream>
#include <string>

namespace tubevit {

namespace {

constexpr int64_t kMaxTubeParam = (int64_t(1) << 31) - 1;

std::string tube_str(at::IntArrayRef tubes, size_t i) {
  const int64_t* p = tubes.data() + i * kTubeInts;
  std::ostringstream os;
  os << "tube " << i << " (kernel=(" << p[0] << ", " << p[1] << ", " << p[2]
     << "), stride=(" << p[3] << ", " << p[4] << ", " << p[5]
     << "), offset=(" << p[6] << ", " << p[7] << ", " << p[8] << "))";
  return os.str();
}

// The argument's name as messages print it: "x", "weights[2]". Only built
// for a message: TORCH_CHECK evaluates its message arguments on failure,
// and a string built per check cost ~2 us of a ~15 us small call.
std::string arg_name(const char* name, int64_t i) {
  return i < 0 ? std::string(name) : c10::str(name, "[", i, "]");
}

void check_same(const at::Tensor& x, const at::Tensor& t, const char* name,
                int64_t i) {
  // i < 0: a single tensor (no list index in the message)
  TORCH_CHECK_VALUE(t.defined(), arg_name(name, i), " is undefined");
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), arg_name(name, i),
                   " must have the dtype of x (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), arg_name(name, i), " must be on the device of x (", x.device(),
              "), got ", t.device());
}

}  // namespace

TubeLayout resolve_layout(at::IntArrayRef tubes, int64_t channels,
                          const int64_t* size_thw) {
  TORCH_CHECK_VALUE(!tubes.empty(), "tubes must describe at least one tube, got an empty list");
  TORCH_CHECK_VALUE(tubes.size() % kTubeInts == 0,
              "tubes must hold 9 ints per tube (kt, kh, kw, st, sh, sw, ot, oh, ow), got ",
              tubes.size(), " ints");
  TubeLayout L;
  L.channels = channels;
  for (int a = 0; a < 3; ++a) L.size[a] = size_thw[a];
  const size_t n_tubes = tubes.size() / kTubeInts;
  int64_t offset = 0;
  for (size_t i = 0; i < n_tubes; ++i) {
    const int64_t* p = tubes.data() + i * kTubeInts;
    for (int a = 0; a < 3; ++a) {
      TORCH_CHECK_VALUE(p[a] >= 1, tube_str(tubes, i), ": kernel sizes must be >= 1");
      TORCH_CHECK_VALUE(p[3 + a] >= 1, tube_str(tubes, i), ": strides must be >= 1");
      TORCH_CHECK_VALUE(p[6 + a] >= 0, tube_str(tubes, i), ": offsets must be >= 0");
      // Bounds keep every product of tube and input sizes inside int64.
      TORCH_CHECK_VALUE(p[a] <= kMaxTubeParam && p[3 + a] <= kMaxTubeParam && p[6 + a] <= kMaxTubeParam,
                        tube_str(tubes, i), ": kernel, stride and offset must be <= 2^31 - 1");
    }
    TubeGeom g = make_tube_geom(p, channels, size_thw, offset);
    TORCH_CHECK_VALUE(g.num_tokens > 0, tube_str(tubes, i),
                " yields no tokens for input size (T, H, W) = (", size_thw[0],
                ", ", size_thw[1], ", ", size_thw[2],
                "): offset + kernel exceeds the input on some axis");
    offset += g.num_tokens;
    L.tubes.push_back(g);
  }
  L.num_tokens = offset;
  return L;
}

static TubeLayout check_x_and_weights(const at::Tensor& x,
                                      at::TensorList weights,
                                      at::IntArrayRef tubes) {
  TORCH_CHECK_VALUE(x.defined(), "x is undefined");
  TORCH_CHECK_VALUE(x.dim() == 5, "x must be 5-D (B, C, T, H, W), got ", x.dim(),
              "-D with shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
              "x must have a floating dtype, got ", x.scalar_type());
  const int64_t size[3] = {x.size(2), x.size(3), x.size(4)};
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x must have at least one channel, got shape ", x.sizes());
  TubeLayout L = resolve_layout(tubes, x.size(1), size);
  L.batch = x.size(0);
  TORCH_CHECK_VALUE(weights.size() == L.tubes.size(), "weights must hold one tensor per tube (",
              L.tubes.size(), "), got ", weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    check_same(x, w, "weights", i);
    const TubeGeom& g = L.tubes[i];
    TORCH_CHECK_VALUE(w.dim() == 5 && w.size(1) == x.size(1) && w.size(2) == g.k[0] &&
                    w.size(3) == g.k[1] && w.size(4) == g.k[2],
                "weights[", i, "] must have shape (d, C=", x.size(1), ", ", g.k[0],
                ", ", g.k[1], ", ", g.k[2], ") for ", tube_str(tubes, i),
                ", got ", w.sizes());
    if (i == 0) L.dim = w.size(0);
    TORCH_CHECK_VALUE(w.size(0) == L.dim, "weights[", i, "] has d=", w.size(0),
                " but weights[0] has d=", L.dim, "; all tubes must share d");
  }
  TORCH_CHECK_VALUE(L.dim >= 1, "d (weights[0].size(0)) must be >= 1, got ", L.dim);
  return L;
}

TubeLayout check_forward_args(const at::Tensor& x, at::TensorList weights,
                              at::TensorList biases, at::IntArrayRef tubes,
                              const c10::optional<at::Tensor>& pos_embed) {
  TubeLayout L = check_x_and_weights(x, weights, tubes);
  TORCH_CHECK_VALUE(biases.empty() || biases.size() == L.tubes.size(),
              "biases must be empty (no bias) or hold one tensor per tube (",
              L.tubes.size(), "), got ", biases.size());
  for (size_t i = 0; i < biases.size(); ++i) {
    check_same(x, biases[i], "biases", i);
    TORCH_CHECK_VALUE(biases[i].dim() == 1 && biases[i].size(0) == L.dim, "biases[", i,
                "] must have shape (", L.dim, ",), got ", biases[i].sizes());
  }
  if (pos_embed.has_value() && pos_embed->defined()) {
    check_same(x, *pos_embed, "pos_embed", -1);
    TORCH_CHECK_VALUE(pos_embed->dim() == 2 && pos_embed->size(0) == L.num_tokens &&
                    pos_embed->size(1) == L.dim,
                "pos_embed must have shape (N=", L.num_tokens, ", d=", L.dim,
                "), got ", pos_embed->sizes());
  }
  return L;
}

TubeLayout check_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                               at::TensorList weights, at::IntArrayRef tubes) {
  TubeLayout L = check_x_and_weights(x, weights, tubes);
  check_same(x, grad_out, "grad_out", -1);
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == L.batch &&
                  grad_out.size(1) == L.num_tokens && grad_out.size(2) == L.dim,
              "grad_out must have shape (B=", L.batch, ", N=", L.num_tokens,
              ", d=", L.dim, "), got ", grad_out.sizes());
  return L;
}

void check_patches(at::TensorList patches, const at::Tensor& x, const TubeLayout& L) {
  if (patches.empty()) return;
  TORCH_CHECK_VALUE(patches.size() == L.tubes.size(),
                    "patches must be empty (gather from x) or hold one tensor per tube (",
                    L.tubes.size(), "), got ", patches.size());
  for (size_t i = 0; i < patches.size(); ++i) {
    check_same(x, patches[i], "patches", static_cast<int64_t>(i));
    const TubeGeom& g = L.tubes[i];
    TORCH_CHECK_VALUE(patches[i].dim() == 3 && patches[i].size(0) == L.batch &&
                          patches[i].size(1) == g.num_tokens && patches[i].size(2) == g.patch_size,
                      "patches[", i, "] must have shape (B=", L.batch, ", n=", g.num_tokens,
                      ", K=", g.patch_size, "), got ", patches[i].sizes());
  }
}

}  // namespace tubevit

// The schemas of the ops users call. Backends: cpu/tube_tokens_cpu.cpp,
// cuda/tube_tokens_cuda.cu; autograd: tube_tokens_autograd.cpp. Fake (meta)
// kernels and vmap rules are registered from Python (tubevit_ext/_ops.py) so
// that they share tubevit_ext/geometry.py. Test-only ops live in the
// tubevit_testing namespace (testing/testing_ops.cpp).
TORCH_LIBRARY(tubevit, m) {
  // x (B,C,T,H,W); weights[i] (d,C,kt,kh,kw); biases [] or [(d,)]*n;
  // tubes: 9 ints per tube; pos_embed (N,d) or None -> tokens (B,N,d).
  m.def(
      "tube_tokens(Tensor x, Tensor[] weights, Tensor[] biases, int[] tubes, "
      "Tensor? pos_embed) -> Tensor");
  // output_mask = (grad_x, grad_weights, grad_biases). Entries not asked
  // for come back as an empty tensor (grad_x, shape (0,)) or an empty list.
  // patches: [] (dW gathers the patches from x again) or the per-tube patch
  // matrices tube_tokens_with_patches returned for this x; backends that
  // gather on the fly (CUDA) ignore them. Results are the same either way.
  m.def(
      "tube_tokens_backward(Tensor grad_out, Tensor x, Tensor[] weights, "
      "Tensor[] patches, int[] tubes, bool[3] output_mask) -> (Tensor, Tensor[], Tensor[])");
  // tube_tokens plus the patch matrices its GEMMs read, for the backward to
  // reuse: patches[i] (B, n_i, K_i) contiguous, dtype of x, K ordered
  // (c, kt, kh, kw) like weights[i].reshape(d, K). CPU only: there the
  // gather is a memory-bound pass worth ~5 % of a training step, paid for
  // with memory (about 1.4x the token output for the paper tubes).
  m.def(
      "tube_tokens_with_patches(Tensor x, Tensor[] weights, Tensor[] biases, int[] tubes, "
      "Tensor? pos_embed) -> (Tensor, Tensor[])");
}
