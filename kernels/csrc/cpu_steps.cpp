// Fused sampler steps on the CPU: every update of wgfcore.ops in one pass, noise drawn in the pass.
//
// ALGORITHMS §2. The C++ twin of kernels/sampler_step.py, rounding as its oracle wgfcore.ops does:
// out = (c0 t0 + c1 t1) + cz z in fp32, each product and sum rounded (torch's separate mul and
// add), and Heun's c0 t0 + c1 t1 + c2 t2 + c3 t3 as wgfcore.ops forms it, c0 t0 then three fused
// multiply-adds; then one rounding to the storage dtype. Built by kernels/cpu_steps.py with
// -ffp-contract=off, so the compiler fuses nothing that the oracle does not. z is explicit or drawn
// from the Triton kernels' Philox stream (same key, counters, element layout and transform).
// Only the headers it uses, not <torch/extension.h>: that halves the first-use build (~30 s of
// compiler time less on one core).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef WGF_NOISE_R
#error "WGF_NOISE_R (kernels NOISE_R) must be defined by the build"
#endif

namespace {

constexpr int64_t R = WGF_NOISE_R;  // counters per group; a group is 4 R elements
constexpr int64_t GROUP = 4 * R;

enum Noise : int64_t { NOISE_NONE = 0, NOISE_EXPLICIT = 1, NOISE_PHILOX = 2 };

// --- bit casts and storage conversions (branch-free, so that loops vectorise) --------------------

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

struct bf16_t { uint16_t v; };
#if defined(__FLT16_MAX__)
using half_t = _Float16;  // the compiler's IEEE half: F16C / NEON conversions, round to nearest even
inline float load(half_t h) { return static_cast<float>(h); }
inline void store(half_t* p, float f) { *p = static_cast<half_t>(f); }
#else
using half_t = c10::Half;
inline float load(half_t h) { return static_cast<float>(h); }
inline void store(half_t* p, float f) { *p = static_cast<half_t>(f); }
#endif
inline float load(float f) { return f; }
inline float load(double d) { return static_cast<float>(d); }  // fp64 storage is computed in fp32
inline float load(bf16_t b) { return float_of(static_cast<uint32_t>(b.v) << 16); }
inline void store(float* p, float f) { *p = f; }
inline void store(double* p, float f) { *p = static_cast<double>(f); }
inline void store(bf16_t* p, float f) {
  // Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16's rule, hence torch's .to().
  uint32_t u = bits_of(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  p->v = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}
inline int64_t nonfinite(float v) { return (bits_of(v) & 0x7f800000u) == 0x7f800000u; }

// --- the noise: Philox4x32-10 and Box-Muller exactly as triton.language.random -------------------

// log of a positive normal float (here in [2^-24, 1]): x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(1 + f) by Cephes' logf
// polynomial (S. L. Moshier), e ln 2 split in two so that the sum stays within ~1 ulp.
inline float log_unit(float x) {
  // Selects are written on integer bits: GCC turns float ternaries into branches here, and a
  // branch in the loop body stops it from vectorising the loop.
  uint32_t u = bits_of(x);
  uint32_t mb = (u & 0x007fffffu) | 0x3f800000u;       // m in [1, 2)
  uint32_t hi = static_cast<uint32_t>(mb > 0x3fb504f3u);  // m > sqrt(2) (fp32): halve m, raise e
  float m = float_of(mb - (hi << 23));
  int32_t e = static_cast<int32_t>(u >> 23) - 127 + static_cast<int32_t>(hi);
  float f = m - 1.0f;
  float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  float fe = static_cast<float>(e);
  y = y + -2.12194440e-4f * fe;
  y = y + -0.5f * z;
  return (f + y) + 0.693359375f * fe;
}

// sin and cos of th in [-pi, 2 pi]: th = j pi/2 + r (three-part pi/2, exact products for |j| <= 4),
// Cephes' sinf/cosf polynomials on |r| <= pi/4, then the quadrant's swap and signs (j & 3 is the
// quadrant for negative j too).
inline void sincos_turn(float th, float* s_out, float* c_out) {
  // j = floor(th 2/pi + 1/2), from a truncation (std::floor does not vectorise without
  // -fno-trapping-math, and a loop that does not vectorise runs 5x slower here)
  float v = th * 0.636619772f + 0.5f;
  int32_t t = static_cast<int32_t>(v);
  int32_t j = t - static_cast<int32_t>(v < static_cast<float>(t));
  float jf = static_cast<float>(j);
  float r = ((th - jf * 1.5703125f) - jf * 4.837512969970703125e-4f) - jf * 7.54978995489188216e-8f;
  float z = r * r;
  float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z
            - 0.5f * z + 1.0f;
  uint32_t swap = 0u - static_cast<uint32_t>(j & 1);  // odd quadrant: sin and cos trade places
  uint32_t sb = bits_of(s), cb = bits_of(c);
  uint32_t sv = (cb & swap) | (sb & ~swap);
  uint32_t cv = (sb & swap) | (cb & ~swap);
  uint32_t s_sign = static_cast<uint32_t>(j & 2) << 30;        // quadrants 2, 3: sin < 0
  uint32_t c_sign = static_cast<uint32_t>((j + 1) & 2) << 30;  // quadrants 1, 2: cos < 0
  *s_out = float_of(sv ^ s_sign);
  *c_out = float_of(cv ^ c_sign);
}

// triton.language.random.uint_to_uniform_float for 32-bit words.
inline float uniform(uint32_t x) {
  int32_t i = static_cast<int32_t>(x);
  i = i ^ (i >> 31);  // i < 0 ? ~i : i
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// Box-Muller as triton's pair_uniform_to_normal (tl.randn4x: fp32 and fp64 states).
inline void box_muller(float u1, float u2, float* n1, float* n2) {
  u1 = float_of(std::max(bits_of(u1), bits_of(1.0e-7f)));  // max(1e-7, u1): both >= 0, so on bits
  float th = 6.283185307179586f * u2;
  float rad = std::sqrt(-2.0f * log_unit(u1));
  float s, c;
  sincos_turn(th, &s, &c);
  *n1 = rad * c;
  *n2 = rad * s;
}

// Philox4x32-10 as triton.language.random.philox_impl: counter words (c, 0, 0, 0) for c in
// [c0, c0 + n), key (k0, k1) = (seed, step); u[k][j] is word k of counter c0 + j.
constexpr uint32_t PHILOX_A = 0xD2511F53u, PHILOX_B = 0xCD9E8D57u;       // round multipliers
constexpr uint32_t PHILOX_KA = 0x9E3779B9u, PHILOX_KB = 0xBB67AE85u;     // key increments

inline uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

void philox_portable(uint32_t k0, uint32_t k1, uint32_t c0, int64_t j0, int64_t j1, uint32_t (*u)[R]) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    uint32_t x0 = c0 + static_cast<uint32_t>(j), x1 = 0, x2 = 0, x3 = 0;
    uint32_t a = k0, b = k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      uint32_t p0 = x0, p2 = x2;
      x0 = mulhi(PHILOX_B, p2) ^ x1 ^ a;
      x2 = mulhi(PHILOX_A, p0) ^ x3 ^ b;
      x1 = PHILOX_B * p2;
      x3 = PHILOX_A * p0;
      a += PHILOX_KA;
      b += PHILOX_KB;
    }
    u[0][j] = x0;
    u[1][j] = x1;
    u[2][j] = x2;
    u[3][j] = x3;
  }
}

// The same words with explicit SIMD: compilers vectorise the 32x32->64 multiplies of the
// portable loop with 64-bit multiplies (vpmullq), about twice the work of pmuludq on even and
// odd lanes, which yields the high and low halves at once. Bit for bit the portable result
// (tests/test_cpu_steps.py compares them).
#if defined(__AVX512F__)
constexpr int64_t LANES = 16;
inline void mul_hilo(__m512i x, __m512i m, __m512i* hi, __m512i* lo) {
  __m512i even = _mm512_mul_epu32(x, m);                         // products of dwords 0, 2, ...
  __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);  // products of dwords 1, 3, ...
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}
void philox_simd(uint32_t k0, uint32_t k1, uint32_t c0, int64_t j0, int64_t j1, uint32_t (*u)[R]) {
  const __m512i A = _mm512_set1_epi32(static_cast<int>(PHILOX_A)), B = _mm512_set1_epi32(static_cast<int>(PHILOX_B));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = j0; j < j1; j += LANES) {  // whole vectors: j0 is a multiple of LANES, and so is R
    __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c0 + static_cast<uint32_t>(j))), iota);
    __m512i x1 = _mm512_setzero_si512(), x2 = x1, x3 = x1;
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mul_hilo(x2, B, &hi_b, &lo_b);
      mul_hilo(x0, A, &hi_a, &lo_a);
      x0 = _mm512_ternarylogic_epi32(hi_b, x1, _mm512_set1_epi32(static_cast<int>(a)), 0x96);  // a ^ b ^ c
      x2 = _mm512_ternarylogic_epi32(hi_a, x3, _mm512_set1_epi32(static_cast<int>(b)), 0x96);
      x1 = lo_b;
      x3 = lo_a;
      a += PHILOX_KA;
      b += PHILOX_KB;
    }
    _mm512_store_si512(reinterpret_cast<__m512i*>(&u[0][j]), x0);
    _mm512_store_si512(reinterpret_cast<__m512i*>(&u[1][j]), x1);
    _mm512_store_si512(reinterpret_cast<__m512i*>(&u[2][j]), x2);
    _mm512_store_si512(reinterpret_cast<__m512i*>(&u[3][j]), x3);
  }
}
#elif defined(__AVX2__)
constexpr int64_t LANES = 8;
inline void mul_hilo(__m256i x, __m256i m, __m256i* hi, __m256i* lo) {
  __m256i even = _mm256_mul_epu32(x, m);
  __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
void philox_simd(uint32_t k0, uint32_t k1, uint32_t c0, int64_t j0, int64_t j1, uint32_t (*u)[R]) {
  const __m256i A = _mm256_set1_epi32(static_cast<int>(PHILOX_A)), B = _mm256_set1_epi32(static_cast<int>(PHILOX_B));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t j = j0; j < j1; j += LANES) {
    __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c0 + static_cast<uint32_t>(j))), iota);
    __m256i x1 = _mm256_setzero_si256(), x2 = x1, x3 = x1;
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mul_hilo(x2, B, &hi_b, &lo_b);
      mul_hilo(x0, A, &hi_a, &lo_a);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, x1), _mm256_set1_epi32(static_cast<int>(a)));
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, x3), _mm256_set1_epi32(static_cast<int>(b)));
      x1 = lo_b;
      x3 = lo_a;
      a += PHILOX_KA;
      b += PHILOX_KB;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(&u[0][j]), x0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(&u[1][j]), x1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(&u[2][j]), x2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(&u[3][j]), x3);
  }
}
#else
constexpr int64_t LANES = 1;
void philox_simd(uint32_t k0, uint32_t k1, uint32_t c0, int64_t j0, int64_t j1, uint32_t (*u)[R]) {
  philox_portable(k0, k1, c0, j0, j1, u);
}
#endif
static_assert(R % LANES == 0, "NOISE_R must hold whole vectors");

// The 16-bit states' transform, kernels/noise.py's box_muller16: 24-bit uniforms u in (0, 1] and
// t in [-1/2, 1/2), exact in fp32; rad = sqrt(max(-2 ln 2 log2 u, 0)), here as -2 ln u (the same
// number, one rounding fewer).
inline void box_muller16(uint32_t w_r, uint32_t w_a, float* n1, float* n2) {
  float u = static_cast<float>((w_r >> 8) + 1u) * 5.9604644775390625e-8f;                  // 2^-24
  float t = static_cast<float>(static_cast<int32_t>(w_a) >> 8) * 5.9604644775390625e-8f;  // arithmetic shift
  float th = t * 6.283185307179586f;
  float v = -2.0f * log_unit(u);
  float rad = std::sqrt(float_of(static_cast<uint32_t>(std::max(static_cast<int32_t>(bits_of(v)), 0))));  // max(v, 0)
  float s, c;
  sincos_turn(th, &s, &c);
  *n1 = rad * c;
  *n2 = rad * s;
}

// Four normals per counter c in [c0, c0 + n): tl.randn4x(key, c) (B16: box_muller16), in place: w[k][j] holds word k
// of counter c0 + j, then (as float bits) normal k of it (Box-Muller of words 0, 1 gives normals
// 0, 1; of words 2, 3 normals 2, 3). For c0 = g R, w read flat is the noise of group g's elements
// in order: element g 4R + k R + r takes normal k of counter g R + r.
constexpr int64_t BLOCK = 128;  // counters per block: philox words, then Box-Muller, while they are in L1

template <bool B16>
__attribute__((noinline)) void normals(uint32_t k0, uint32_t k1, uint32_t c0, int64_t n, uint32_t (*w)[R]) {
  int64_t blocks = (n + BLOCK - 1) / BLOCK;
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t j0 = b * BLOCK, j1 = std::min(n, j0 + BLOCK);
    philox_simd(k0, k1, c0, j0, j1, w);
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      float n0, n1, n2, n3;
      if (B16) {
        box_muller16(w[0][j], w[1][j], &n0, &n1);
        box_muller16(w[2][j], w[3][j], &n2, &n3);
      } else {
        box_muller(uniform(w[0][j]), uniform(w[1][j]), &n0, &n1);
        box_muller(uniform(w[2][j]), uniform(w[3][j]), &n2, &n3);
      }
      w[0][j] = bits_of(n0);
      w[1][j] = bits_of(n1);
      w[2][j] = bits_of(n2);
      w[3][j] = bits_of(n3);
    }
  }
}

// --- the update --------------------------------------------------------------------------------

// Coefficients: slot k scales tensor k (k < 4), slot 4 the noise. Each is a pointer with a stride
// per sample: 0 for one value, 1 for a per-sample (B,) fp32 vector.
struct Coefs {
  const float* p[5];
  int64_t stride[5];
  bool per_sample() const {
    for (int k = 0; k < 5; ++k) if (stride[k]) return true;
    return false;
  }
  float at(int k, int64_t b) const { return p[k][b * stride[k]]; }
};

// S: the state's storage type (out, t0, t2, z); N: the network outputs' (t1, t3). CHECK names
// the network output whose non-finite elements are counted (1 or 3). One contiguous run [lo, hi)
// with fixed coefficients; nz: the run's noise (PHILOX) indexed from lo.
template <typename S, typename N, int NT, int NOISE, int CHECK>
int64_t run(S* out, const S* t0, const N* t1, const S* t2, const N* t3, const S* z, const float* nz,
            int64_t lo, int64_t hi, float c0, float c1, float c2, float c3, float cz) {
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = lo; i < hi; ++i) {
    float v1 = load(t1[i]);
    float acc, v3 = 0.0f;
    if (NT >= 4) {  // wgfcore.ops' Heun corrector: c0 t0, then each further term by a fused multiply-add
      v3 = load(t3[i]);
      acc = std::fma(c3, v3, std::fma(c2, load(t2[i]), std::fma(c1, v1, c0 * load(t0[i]))));
    } else {
      acc = c0 * load(t0[i]) + c1 * v1;
    }
    if (NOISE == NOISE_EXPLICIT) acc = acc + cz * load(z[i]);
    if (NOISE == NOISE_PHILOX) acc = acc + cz * nz[i - lo];
    store(out + i, acc);
    if (CHECK == 1) bad += nonfinite(v1);
    if (CHECK == 3) bad += nonfinite(v3);
  }
  return bad;
}

// A run that may cross sample boundaries: split it where per-sample coefficients change.
template <typename S, typename N, int NT, int NOISE, int CHECK>
int64_t run_span(S* out, const S* t0, const N* t1, const S* t2, const N* t3, const S* z, const float* nz,
                 int64_t lo, int64_t hi, const Coefs& c, bool per_sample, int64_t inner) {
  if (!per_sample) {
    return run<S, N, NT, NOISE, CHECK>(out, t0, t1, t2, t3, z, nz, lo, hi, *c.p[0], *c.p[1], *c.p[2], *c.p[3],
                                       *c.p[4]);
  }
  int64_t bad = 0;
  while (lo < hi) {
    int64_t b = lo / inner;
    int64_t end = std::min(hi, (b + 1) * inner);
    bad += run<S, N, NT, NOISE, CHECK>(out, t0, t1, t2, t3, z, nz, lo, end, c.at(0, b), c.at(1, b), c.at(2, b),
                                       c.at(3, b), c.at(4, b));
    nz = nz ? nz + (end - lo) : nz;
    lo = end;
  }
  return bad;
}

// Groups [g0, g1) of GROUP elements. With PHILOX noise each group's normals are formed first (a
// 16 KB buffer, arithmetic in registers and L1), then the group is updated in one sequential
// sweep, so that memory is read and written in order. (Forming the normals while prefetching the
// next group's lines measured no faster: the two costs add, about 1.1 + 0.5 ns per fp32 element
// on one core of the development machine, in thread CPU time.)
template <typename S, typename N, int NT, int NOISE, int CHECK>
int64_t groups(S* out, const S* t0, const N* t1, const S* t2, const N* t3, const S* z, int64_t numel,
               int64_t inner, const Coefs& c, uint32_t seed, uint32_t step, int64_t g0, int64_t g1) {
  bool per_sample = c.per_sample();
  if (NOISE != NOISE_PHILOX) {
    return run_span<S, N, NT, NOISE, CHECK>(out, t0, t1, t2, t3, z, nullptr, g0 * GROUP,
                                            std::min(numel, g1 * GROUP), c, per_sample, inner);
  }
  alignas(64) uint32_t w[4][R];
  const float* noise = reinterpret_cast<const float*>(&w[0][0]);
  int64_t bad = 0;
  for (int64_t g = g0; g < g1; ++g) {
    int64_t base = g * GROUP;
    // Counters whose normals are used: element base + k R + r exists only if r < numel - base.
    normals<sizeof(S) == 2>(seed, step, static_cast<uint32_t>(g * R), std::min(R, numel - base), w);
    bad += run_span<S, N, NT, NOISE, CHECK>(out, t0, t1, t2, t3, z, noise, base, std::min(numel, base + GROUP), c,
                                            per_sample, inner);
  }
  return bad;
}

template <typename S, typename N, int NT, int NOISE, int CHECK>
int64_t launch(const at::Tensor& out, const at::Tensor* t, const at::Tensor* z, const Coefs& c, uint32_t seed,
               uint32_t step) {
  int64_t numel = out.numel();
  int64_t inner = numel / out.size(0);
  S* o = reinterpret_cast<S*>(out.data_ptr());
  const S* p0 = reinterpret_cast<const S*>(t[0].data_ptr());
  const N* p1 = reinterpret_cast<const N*>(t[1].data_ptr());
  const S* p2 = reinterpret_cast<const S*>(t[2].data_ptr());
  const N* p3 = reinterpret_cast<const N*>(t[3].data_ptr());
  const S* pz = z ? reinterpret_cast<const S*>(z->data_ptr()) : nullptr;
  int64_t ngroups = (numel + GROUP - 1) / GROUP;
  // Grain in groups: noise costs ~10x a memory-bound update per element, so it splits finer.
  int64_t grain = NOISE == NOISE_PHILOX ? 2 : 8;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, ngroups, grain, [&](int64_t g0, int64_t g1) {
    int64_t b = groups<S, N, NT, NOISE, CHECK>(o, p0, p1, p2, p3, pz, numel, inner, c, seed, step, g0, g1);
    if (b) bad += b;
  });
  return bad.load();
}

// Storage types of a ScalarType.
template <typename F>
void with_storage(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); return;
    case at::kDouble: f(double{}); return;
    case at::kHalf: f(half_t{}); return;
    case at::kBFloat16: f(bf16_t{}); return;
    default: TORCH_CHECK(false, "cpu_steps: unsupported storage dtype ", t);
  }
}

// Dispatch on (state dtype, network-output dtype, NT, noise, check): network outputs are either
// in the state's dtype or in fp32 (CppSteps.accept converts any other to fp32, keeping its values).
int64_t dispatch(const at::Tensor& out, const at::Tensor* t, const at::Tensor* z, int64_t nt, int64_t noise,
                 int64_t check, const Coefs& c, uint32_t seed, uint32_t step) {
  at::ScalarType st = out.scalar_type(), nty = t[1].scalar_type();
  TORCH_CHECK(nty == st || nty == at::kFloat, "cpu_steps: network outputs must be in the state's dtype or fp32");
  int64_t bad = 0;
  with_storage(st, [&](auto s_tag) {
    using S = decltype(s_tag);
    auto go = [&](auto n_tag) {
      using N = decltype(n_tag);
      if (nt == 4) {
        TORCH_CHECK(noise == NOISE_NONE, "cpu_steps: a 4-tensor update takes no noise");
        bad = check ? launch<S, N, 4, NOISE_NONE, 3>(out, t, z, c, seed, step)
                    : launch<S, N, 4, NOISE_NONE, 0>(out, t, z, c, seed, step);
        return;
      }
      TORCH_CHECK(nt == 2, "cpu_steps: updates combine 2 or 4 tensors");
      // The public launchers (check 0) and the sampling loop (check 1) share these instances:
      // counting costs one compare per element of a pass bounded by memory, so it is always on.
      if (noise == NOISE_PHILOX) bad = launch<S, N, 2, NOISE_PHILOX, 1>(out, t, z, c, seed, step);
      else if (noise == NOISE_EXPLICIT) bad = launch<S, N, 2, NOISE_EXPLICIT, 1>(out, t, z, c, seed, step);
      else bad = launch<S, N, 2, NOISE_NONE, 1>(out, t, z, c, seed, step);
    };
    if (nty == st) go(S{});
    else go(float{});
  });
  return bad;
}

// --- entry points ------------------------------------------------------------------------------

// Writing a step's result into a dead network output (the sampling loop's `out=`, Run.spare): the
// loop has seen that no Python name but its own holds the tensor; here the memory itself must be
// unshared and torch's own, as numpy's temporary elision requires of an array it reuses: no other
// C++ holder of the tensor (a TorchScript attribute, a saved tensor), no view or storage object
// sharing its storage, memory from torch's CPU allocator (not numpy's, a file mapping's or a
// user's buffer), the state's dtype, size and dense layout, and no autograd history (a sampler
// function called with grad enabled). Otherwise the step allocates.
int64_t g_sole_uses = -1;  // a sole tensor's use count as seen here; set by calibrate(), -1: never reuse

void calibrate(const at::Tensor& fresh) { g_sole_uses = static_cast<int64_t>(fresh.use_count()); }

// `also`: how many other arguments of this call are o itself (each holds one more use).
bool writable(const at::Tensor& o, const at::Tensor& like, int64_t also) {
  if (g_sole_uses < 0 || static_cast<int64_t>(o.use_count()) > g_sole_uses + also) return false;
  const c10::Storage& st = o.storage();
  return st.use_count() == 1 && st.allocator() == c10::GetAllocator(c10::kCPU) && o.storage_offset() == 0 &&
         o.scalar_type() == like.scalar_type() && o.sizes().equals(like.sizes()) && o.is_contiguous() &&
         !o.requires_grad();  // else the result would carry the network's autograd history
}

// The sampling loop's step (CppSteps): row i of the packed (N, NT + 1) fp32 table, the noise key
// from the 0-d int64 seed tensor, and the first step whose checked network output held a NaN or
// inf lowered into `flag` (a 0-d int64). Inputs were validated once, at plan(). `into`: a dead
// tensor the result may be written into when writable() (each element is read before it is written).
at::Tensor table_step(const at::Tensor& t0, const at::Tensor& t1, const at::Tensor& t2, const at::Tensor& t3,
                      const at::Tensor& table, int64_t i, int64_t nt, bool noisy, const at::Tensor& seed,
                      const at::Tensor& flag, const c10::optional<at::Tensor>& into) {
  at::Tensor out;
  if (into.has_value()) {  // counted before any copy below adds uses
    const c10::TensorImpl* o = into->unsafeGetTensorImpl();
    int64_t also = (t0.unsafeGetTensorImpl() == o) + (t1.unsafeGetTensorImpl() == o) +
                   (t2.unsafeGetTensorImpl() == o) + (t3.unsafeGetTensorImpl() == o);
    if (writable(*into, t0, also)) out = *into;
  }
  if (!out.defined()) out = at::empty_like(t0);
  at::Tensor ts[4] = {t0, t1, t2, t3};
  if (t0.numel() == 0) return out;
  const float* row = table.data_ptr<float>() + i * (nt + 1);
  Coefs c;
  for (int k = 0; k < 5; ++k) c.stride[k] = 0;
  static const float zero = 0.0f;
  for (int k = 0; k < 4; ++k) c.p[k] = k < nt ? row + k : &zero;
  c.p[4] = row + nt;
  uint32_t key = static_cast<uint32_t>(*seed.data_ptr<int64_t>());
  int64_t bad = dispatch(out, ts, nullptr, nt, noisy ? NOISE_PHILOX : NOISE_NONE, 1, c, key,
                         static_cast<uint32_t>(i));
  if (bad) {
    int64_t* f = flag.data_ptr<int64_t>();
    *f = std::min(*f, i);
  }
  return out;
}

// The public launchers (kernels.cpu_steps.predict/em/project/heun): tensors validated in Python;
// each coefficient slot is a value or an fp32 tensor, 0-d or (B,) and contiguous.
void affine(at::Tensor& out, const std::vector<at::Tensor>& ts, const c10::optional<at::Tensor>& z,
            const std::vector<double>& values, const std::vector<c10::optional<at::Tensor>>& tensors,
            int64_t noise, int64_t seed, int64_t step) {
  TORCH_CHECK(values.size() == 5 && tensors.size() == 5, "cpu_steps.affine: 5 coefficient slots");
  if (out.numel() == 0) return;
  float vals[5];
  Coefs c;
  for (int k = 0; k < 5; ++k) {
    vals[k] = static_cast<float>(values[k]);
    const auto& tk = tensors[k];
    if (tk.has_value()) {
      c.p[k] = tk->data_ptr<float>();
      c.stride[k] = tk->dim() == 0 ? 0 : 1;
    } else {
      c.p[k] = &vals[k];
      c.stride[k] = 0;
    }
  }
  at::Tensor t[4];
  for (int k = 0; k < 4; ++k) t[k] = ts[k < static_cast<int>(ts.size()) ? k : 0];
  dispatch(out, t, z.has_value() ? &*z : nullptr, static_cast<int64_t>(ts.size()), noise, 0, c,
           static_cast<uint32_t>(seed), static_cast<uint32_t>(step));
}

// The Philox words of counters [c0, c0 + n) (tests: the SIMD path against the portable one and a
// reference implementation), as an (n, 4) int64 tensor.
at::Tensor philox_words(int64_t seed, int64_t step, int64_t c0, int64_t n, bool simd) {
  at::Tensor w = at::empty({n, 4}, at::kLong);
  int64_t* o = w.data_ptr<int64_t>();
  alignas(64) uint32_t u[4][R];
  for (int64_t j0 = 0; j0 < n; j0 += R) {
    int64_t m = std::min(R, n - j0);
    uint32_t c = static_cast<uint32_t>(c0 + j0);
    if (simd) philox_simd(static_cast<uint32_t>(seed), static_cast<uint32_t>(step), c, 0, m, u);
    else philox_portable(static_cast<uint32_t>(seed), static_cast<uint32_t>(step), c, 0, m, u);
    for (int64_t j = 0; j < m; ++j)
      for (int k = 0; k < 4; ++k) o[(j0 + j) * 4 + k] = u[k][j];
  }
  return w;
}

// z itself for elements [0, numel) before any rounding: the fp32 transform (b16 false) or the
// 16-bit states' (tests: statistics and the reference of kernels/noise.py on unrounded values).
at::Tensor noise(int64_t seed, int64_t step, int64_t numel, bool b16) {
  at::Tensor z = at::empty({numel}, at::kFloat);
  float* o = z.data_ptr<float>();
  alignas(64) uint32_t w[4][R];
  for (int64_t base = 0; base < numel; base += GROUP) {
    int64_t n = std::min(R, numel - base);
    uint32_t c = static_cast<uint32_t>(base / 4);
    if (b16) normals<true>(static_cast<uint32_t>(seed), static_cast<uint32_t>(step), c, n, w);
    else normals<false>(static_cast<uint32_t>(seed), static_cast<uint32_t>(step), c, n, w);
    std::memcpy(o + base, &w[0][0], sizeof(float) * std::min(GROUP, numel - base));
  }
  return z;
}

// Threads that one parallel step of n elements runs on (the tests check that torch.set_num_threads
// governs the kernels: they must share torch's OpenMP runtime).
int64_t threads_used(int64_t numel) {
  std::atomic<int64_t> chunks{0};
  at::parallel_for(0, (numel + GROUP - 1) / GROUP, 1, [&](int64_t, int64_t) { chunks += 1; });
  return chunks.load();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wgfcore fused sampler steps on the CPU (kernels/cpu_steps.py)";
  m.def("table_step", &table_step, "one sampling-loop step from a packed coefficient table");
  m.def("affine", &affine, "sum_k c_k t_k (+ c_z z) with validated arguments");
  m.def("philox_words", &philox_words, "Philox4x32-10 words of a range of counters (tests)");
  m.def("noise", &noise, "the noise of elements [0, numel) in fp32, before rounding (tests)");
  m.def("threads_used", &threads_used, "parallel chunks of one step of n elements");
  m.def("calibrate", &calibrate, "record a sole tensor's use count (a fresh temporary) for writable()");
  m.def("writable", &writable, "whether table_step would write its result into this tensor (tests)");
  m.attr("NOISE_R") = R;
  m.attr("SIMD_LANES") = LANES;
}
