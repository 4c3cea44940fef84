// The smooth activations of the fused layers and their derivatives, elementwise, for the ISA
// units (included by gemm_kernel.h, so inside their anonymous namespace and `#pragma GCC
// target`). Written as branch-free scalar float code that the compiler vectorises for the unit's
// instruction set: the loops below carry no calls (everything is forced inline) and no branches
// once GCC may blend the selects, which needs -fno-trapping-math (setup.py; tests/test_build.py
// checks that every loop vectorises).
//
//   gelu       y = z Phi(z),  Phi(z) = erfc(-z / sqrt 2) / 2             y' = Phi(z) + z phi(z)
//   gelu_tanh  y = z s(2u),   u = sqrt(2/pi) (z + 0.044715 z^3), s = 1 / (1 + e^-x) (the logistic)
//                             y' = s(2u) + z 2u' s(2u) s(-2u),  u' = sqrt(2/pi) (1 + 3 0.044715 z^2)
//   silu       y = z s(z)     y' = s(z) (1 + z s(-z))
//
// Accuracy: relative, in the tails too. Stock's float32 kernels compute 0.5 z (1 + erf(z/sqrt 2))
// and 0.5 z (1 + tanh(u)), which lose every bit for z below about -4 (1 + erf cancels), and its
// derivatives likewise; these forms never subtract nearly equal numbers:
//   - Phi for z < 0 is q = erfc(|z|/sqrt 2) / 2 itself, for z >= 0 it is 1 - q (q <= 1/2);
//   - erfc(a) = t exp(-a^2) Q(t), t = 1 / (1 + a/2), Q a polynomial (normal() below), with
//     exp(-a^2) computed from z^2 split exactly into hi + lo (an fma), as the rounding of a^2
//     alone would cost up to a^2 ulp of relative error;
//   - s(-x) = e^-x s(x): the logistic's complement without 1 - s.
// Max error against float64 over a sweep of [-20, 20] and the extremes: tests/test_activations.py.
// Non-finite inputs give what the formulas above give in IEEE arithmetic, as stock's formulas do:
// NaN -> NaN, +inf -> +inf (derivative: 1, except gelu_tanh's NaN, as stock's), -inf -> NaN
// (-inf times 0; stock's value too), and the derivative at -inf is NaN.

// e^x for float x, |error| within about 1 ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor
// series to degree 7 (truncation below 5e-9 relative), 2^n as two factors so that n down to -174
// scales into float's subnormals with one rounding. Saturates: e^x = 0 below -120, inf above 120.
// NaN gives NaN.
[[gnu::always_inline]] inline float exp_f(float x) {
  x = std::min(std::max(x, -120.0f), 120.0f);  // operand order keeps NaN
  constexpr float kShifter = 12582912.0f;       // 1.5 * 2^23: adding it rounds to an integer
  const float t = std::fma(x, 1.44269504088896341f, kShifter);
  const float n = t - kShifter;
  uint32_t t_bits;
  std::memcpy(&t_bits, &t, 4);
  const int32_t ni = static_cast<int32_t>(t_bits - 0x4B400000u);  // n as an integer, in [-174, 174]
  // r = x - n ln2, ln2 in two parts (the high one has 8 trailing zero bits: n * hi is exact).
  const float r = std::fma(-n, 1.42860682030941723212e-6f, std::fma(-n, 0.693145751953125f, x));
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t n1 = ni >> 1, n2 = ni - n1;  // each within [-87, 87]: a normal power of two
  const uint32_t b1 = static_cast<uint32_t>(n1 + 127) << 23, b2 = static_cast<uint32_t>(n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, 4);
  std::memcpy(&s2, &b2, 4);
  return p * s1 * s2;
}

// The logistic s(x) = 1 / (1 + e^-x) and its complement s(-x), from e = e^-|x| <= 1 (never
// overflows): for x >= 0 s = 1 / (1 + e), s(-x) = e / (1 + e); for x < 0 the two swap.
struct Logistic {
  float s, sm;
};
[[gnu::always_inline]] inline Logistic logistic(float x) {
  const float e = exp_f(-std::fabs(x));
  const float r = 1.0f / (1.0f + e);
  const float er = e * r;
  return x < 0.0f ? Logistic{er, r} : Logistic{r, er};
}

// Phi(z) and phi(z) = e^(-z^2/2) / sqrt(2 pi) for GELU, from one exponential:
//   erfc(a) = t e^(-a^2) Q(t),  t = 1 / (1 + a/2),  a = |z| / sqrt 2 >= 0,
// Q smooth on (0, 1] (Q(1) = 1, Q(0+) = 1 / (2 sqrt pi)): a degree-10 polynomial fitted to it for
// this project (relative least squares on t in [0.12, 1], i.e. |z| <= 20; relative error of the
// fit 5e-9, of its float32 evaluation 2e-7). |z| beyond 20 is taken as 20: q and phi are 0 in
// float from about 14 on, and z^2 stays finite.
struct Normal {
  float cdf, pdf;
};
[[gnu::always_inline]] inline Normal normal(float z) {
  const float za = std::min(std::fabs(z), 20.0f);  // keeps NaN
  const float t = 1.0f / std::fma(0.35355339059327376f, za, 1.0f);  // 1 / (1 + a/2)
  float Q = 0.04096343740820885f;
  Q = std::fma(Q, t, -0.22141212224960327f);
  Q = std::fma(Q, t, 0.45910635590553284f);
  Q = std::fma(Q, t, -0.40373489260673523f);
  Q = std::fma(Q, t, 0.08444597572088242f);
  Q = std::fma(Q, t, -0.03015771321952343f);
  Q = std::fma(Q, t, 0.08183392882347107f);
  Q = std::fma(Q, t, 0.1783161610364914f);
  Q = std::fma(Q, t, 0.24641075730323792f);
  Q = std::fma(Q, t, 0.2821348011493683f);
  Q = std::fma(Q, t, 0.2820933163166046f);
  // e^(-a^2) = e^(-z^2 / 2) with z^2 = hi + lo exactly: e^(-hi/2) (1 - lo/2).
  const float hi = za * za;
  const float lo = std::fma(za, za, -hi);
  const float g = exp_f(-0.5f * hi) * std::fma(-0.5f, lo, 1.0f);
  const float q = 0.5f * t * g * Q;  // erfc(|z| / sqrt 2) / 2
  return {z < 0.0f ? q : 1.0f - q, g * 0.39894228040143268f};
}

constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCubic = 0.044715f;

// gelu_tanh's 2u and its derivative; |z| beyond 1e4 is taken as 1e4 (z^3 stays finite, s(2u) is
// already 0 or 1 and s(2u) s(-2u) 0 there).
struct TanhArg {
  float u2, du2;
};
[[gnu::always_inline]] inline TanhArg tanh_arg(float z) {
  const float zc = std::min(std::max(z, -1e4f), 1e4f);  // keeps NaN
  const float z2 = zc * zc;
  return {2.0f * kSqrt2OverPi * std::fma(kGeluTanhCubic * zc, z2, zc),
          2.0f * kSqrt2OverPi * std::fma(3.0f * kGeluTanhCubic, z2, 1.0f)};
}

[[gnu::always_inline]] inline float act_f(Act act, float z) {
  switch (act) {
    case Act::Gelu:
      return z * normal(z).cdf;
    case Act::GeluTanh:
      return z * logistic(tanh_arg(z).u2).s;
    case Act::Silu:
      return z * logistic(z).s;
  }
  return z;
}

// grad_y * act'(z).
[[gnu::always_inline]] inline float act_grad_f(Act act, float gy, float z) {
  switch (act) {
    case Act::Gelu: {
      const Normal n = normal(z);
      return gy * std::fma(z, n.pdf, n.cdf);
    }
    case Act::GeluTanh: {
      const TanhArg u = tanh_arg(z);
      const Logistic l = logistic(u.u2);
      return gy * std::fma(z * u.du2, l.s * l.sm, l.s);
    }
    case Act::Silu: {
      const Logistic l = logistic(z);
      return gy * (l.s * std::fma(z, l.sm, 1.0f));
    }
  }
  return gy;
}

// One loop per activation, so each vectorises without a branch inside.
template <Act A>
void act_loop(const float* __restrict__ z, float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = act_f(A, z[i]);
}
template <Act A>
void act_grad_loop(const float* __restrict__ gy, const float* __restrict__ z, float* __restrict__ g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = act_grad_f(A, gy[i], z[i]);
}

inline void act_f32(Act act, const float* z, float* y, int64_t n) {
  switch (act) {
    case Act::Gelu: return act_loop<Act::Gelu>(z, y, n);
    case Act::GeluTanh: return act_loop<Act::GeluTanh>(z, y, n);
    case Act::Silu: return act_loop<Act::Silu>(z, y, n);
  }
}
inline void act_grad_f32(Act act, const float* gy, const float* z, float* g, int64_t n) {
  switch (act) {
    case Act::Gelu: return act_grad_loop<Act::Gelu>(gy, z, g, n);
    case Act::GeluTanh: return act_grad_loop<Act::GeluTanh>(gy, z, g, n);
    case Act::Silu: return act_grad_loop<Act::Silu>(gy, z, g, n);
  }
}

// Half types: blocks of kActBlock elements widened to float with the ISA's loads, computed, and
// rounded once with its stores (nearest even, as stock's conversions).
constexpr int64_t kActBlock = 256;

template <class I, typename T>
void widen(const T* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += I::W) I::store(dst + j, I::load(src + j, static_cast<int>(std::min<int64_t>(I::W, n - j))));
}
template <class I, typename T>
void narrow(const float* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += I::W) {
    const int w = static_cast<int>(std::min<int64_t>(I::W, n - j));
    I::store(dst + j, I::load(src + j, w), w);
  }
}

template <class I, typename T>
void activation_typed(Act act, const void* z, void* y, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    act_f32(act, static_cast<const float*>(z), static_cast<float*>(y), n);
  } else {
    alignas(64) float zf[kActBlock], yf[kActBlock];
    for (int64_t i = 0; i < n; i += kActBlock) {
      const int64_t b = std::min(kActBlock, n - i);
      widen<I>(static_cast<const T*>(z) + i, zf, b);
      act_f32(act, zf, yf, b);
      narrow<I>(yf, static_cast<T*>(y) + i, b);
    }
  }
}

template <class I, typename T>
void activation_grad_typed(Act act, const void* gy, const void* z, void* g, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    act_grad_f32(act, static_cast<const float*>(gy), static_cast<const float*>(z), static_cast<float*>(g), n);
  } else {
    alignas(64) float gyf[kActBlock], zf[kActBlock], gf[kActBlock];
    for (int64_t i = 0; i < n; i += kActBlock) {
      const int64_t b = std::min(kActBlock, n - i);
      widen<I>(static_cast<const T*>(gy) + i, gyf, b);
      widen<I>(static_cast<const T*>(z) + i, zf, b);
      act_grad_f32(act, gyf, zf, gf, b);
      narrow<I>(gf, static_cast<T*>(g) + i, b);
    }
  }
}

template <class I>
void activation_any(DType dtype, Act act, const void* z, void* y, int64_t n) {
  switch (dtype) {
    case DType::F32: return activation_typed<I, float>(act, z, y, n);
    case DType::BF16: return activation_typed<I, bf16_t>(act, z, y, n);
    case DType::F16: return activation_typed<I, f16_t>(act, z, y, n);
  }
}

template <class I>
void activation_grad_any(DType dtype, Act act, const void* gy, const void* z, void* g, int64_t n) {
  switch (dtype) {
    case DType::F32: return activation_grad_typed<I, float>(act, gy, z, g, n);
    case DType::BF16: return activation_grad_typed<I, bf16_t>(act, gy, z, g, n);
    case DType::F16: return activation_grad_typed<I, f16_t>(act, gy, z, g, n);
  }
}
