// MSL-as-C++20 shim: just enough of the Metal Shading Language for kernel bodies written for
// `mx.fast.metal_kernel` to compile with g++ and run on the emulator's fibers (runtime.cpp).
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

// Address spaces and function qualifiers vanish on the CPU.
#define device
#define constant
#define thread
#define threadgroup
#define kernel

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef uint64_t ulong;
typedef _Float16 half;
typedef half float16_t;

// bfloat: 16 stored bits, conversions from float round to nearest even (as Metal does).
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  template <class U, class = std::enable_if_t<std::is_arithmetic_v<U> || std::is_same_v<U, half>>>
  bfloat(U v) { bits = from_float(static_cast<float>(v)); }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
};
typedef bfloat bfloat16_t;

// Vector types: .x .y .z .w, operator[], element-wise arithmetic, 16-byte alignment for 4 x 32 bit.
template <class T, int N> struct vec;
template <class T> struct alignas(2 * sizeof(T)) vec<T, 2> {
  T x, y;
  vec() = default;
  vec(T s) : x(s), y(s) {}
  vec(T a, T b) : x(a), y(b) {}
  template <class U> explicit vec(const vec<U, 2>& o) : x(T(o.x)), y(T(o.y)) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
template <class T> struct alignas(4 * sizeof(T)) vec<T, 3> {
  T x, y, z;
  vec() = default;
  vec(T s) : x(s), y(s), z(s) {}
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  template <class U> explicit vec(const vec<U, 3>& o) : x(T(o.x)), y(T(o.y)), z(T(o.z)) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
template <class T> struct alignas(4 * sizeof(T)) vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  vec(T s) : x(s), y(s), z(s), w(s) {}
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  template <class U> explicit vec(const vec<U, 4>& o)
      : x(T(o.x)), y(T(o.y)), z(T(o.z)), w(T(o.w)) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
#define EMU_VEC_OP(OP)                                                              \
  template <class T, int N> vec<T, N> operator OP(vec<T, N> a, const vec<T, N>& b) { \
    for (int i = 0; i < N; ++i) a[i] = a[i] OP b[i];                                \
    return a;                                                                       \
  }                                                                                 \
  template <class T, int N> vec<T, N> operator OP(vec<T, N> a, T b) {               \
    for (int i = 0; i < N; ++i) a[i] = a[i] OP b;                                   \
    return a;                                                                       \
  }                                                                                 \
  template <class T, int N> vec<T, N> operator OP(T a, vec<T, N> b) {               \
    for (int i = 0; i < N; ++i) b[i] = a OP b[i];                                   \
    return b;                                                                       \
  }                                                                                 \
  template <class T, int N> vec<T, N>& operator OP##=(vec<T, N>& a, const vec<T, N>& b) { \
    a = a OP b;                                                                     \
    return a;                                                                       \
  }
EMU_VEC_OP(+)
EMU_VEC_OP(-)
EMU_VEC_OP(*)
EMU_VEC_OP(/)
EMU_VEC_OP(&)
EMU_VEC_OP(|)
EMU_VEC_OP(^)
EMU_VEC_OP(>>)
EMU_VEC_OP(<<)
#undef EMU_VEC_OP

#define EMU_VEC_TYPES(T, NAME) \
  typedef vec<T, 2> NAME##2;   \
  typedef vec<T, 3> NAME##3;   \
  typedef vec<T, 4> NAME##4;
EMU_VEC_TYPES(float, float)
EMU_VEC_TYPES(half, half)
EMU_VEC_TYPES(bfloat, bfloat)
EMU_VEC_TYPES(int, int)
EMU_VEC_TYPES(uint, uint)
EMU_VEC_TYPES(short, short)
EMU_VEC_TYPES(ushort, ushort)
EMU_VEC_TYPES(char, char)
EMU_VEC_TYPES(uchar, uchar)
EMU_VEC_TYPES(bool, bool)
EMU_VEC_TYPES(ulong, ulong)
#undef EMU_VEC_TYPES

namespace emu {
// The builtin values MLX can declare in a kernel signature, per thread.
struct Builtins {
  uint dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup, grid_origin, grid_size;
  uint quadgroup_index_in_threadgroup, quadgroups_per_threadgroup;
  uint simdgroup_index_in_threadgroup, simdgroups_per_threadgroup, thread_execution_width;
  uint thread_index_in_quadgroup, thread_index_in_simdgroup, thread_index_in_threadgroup;
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threadgroups_per_grid, threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};
// Implemented by runtime.cpp: the yield points of the fiber scheduler and threadgroup memory.
void barrier(int line, bool simd_only);
void simd_exchange(const void* value, int size, int line, unsigned char (**all)[32][32],
                   uint32_t* active, uint32_t* lane);
void* tg_alloc(int slot, size_t bytes);
void report(int line, const char* what);  // a kernel error: the dispatch fails with it
void mat_note(int line, const void* data, int size);  // a simdgroup_matrix operation, per lane
uint lane_index();  // the calling GPU thread's index in its SIMD group
}  // namespace emu

namespace metal {
template <class To, class From> inline To as_type(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
inline void threadgroup_barrier(mem_flags, int line = __builtin_LINE()) { emu::barrier(line, false); }
inline void simdgroup_barrier(mem_flags, int line = __builtin_LINE()) { emu::barrier(line, true); }

// Scalar math (float and half; half computes in float and rounds back).
#define EMU_UNARY(NAME, EXPR)                                 \
  inline float NAME(float x) { return EXPR; }                 \
  inline half NAME(half hx) {                                 \
    float x = float(hx);                                      \
    return half(EXPR);                                        \
  }                                                           \
  template <class T, int N> vec<T, N> NAME(vec<T, N> v) {     \
    for (int i = 0; i < N; ++i) v[i] = NAME(v[i]);            \
    return v;                                                 \
  }
EMU_UNARY(exp, __builtin_expf(x))
EMU_UNARY(exp2, __builtin_exp2f(x))
EMU_UNARY(log, __builtin_logf(x))
EMU_UNARY(log2, __builtin_log2f(x))
EMU_UNARY(sqrt, __builtin_sqrtf(x))
EMU_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
EMU_UNARY(tanh, __builtin_tanhf(x))
EMU_UNARY(fabs, __builtin_fabsf(x))
EMU_UNARY(floor, __builtin_floorf(x))
EMU_UNARY(ceil, __builtin_ceilf(x))
EMU_UNARY(sin, __builtin_sinf(x))
EMU_UNARY(cos, __builtin_cosf(x))
#undef EMU_UNARY
inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return half(__builtin_fabsf(float(x))); }
inline float pow(float x, float y) { return __builtin_powf(x, y); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N> inline T dot(vec<T, N> a, vec<T, N> b) {
  T s = T(0);
  for (int i = 0; i < N; ++i) s += a[i] * b[i];
  return s;
}
namespace fast {
inline float exp(float x) { return metal::exp(x); }
inline float exp2(float x) { return metal::exp2(x); }
inline float log(float x) { return metal::log(x); }
inline float rsqrt(float x) { return metal::rsqrt(x); }
inline float sqrt(float x) { return metal::sqrt(x); }
inline float tanh(float x) { return metal::tanh(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return metal::exp(x); }
inline float log(float x) { return metal::log(x); }
inline float rsqrt(float x) { return metal::rsqrt(x); }
inline float sqrt(float x) { return metal::sqrt(x); }
inline float tanh(float x) { return metal::tanh(x); }
}  // namespace precise

// SIMD-group collectives: every active lane posts its value, the fiber scheduler switches until
// all lanes of the SIMD group stand at the same collective, then each lane reads every value.
template <class T, class F> inline T emu_collective(T v, int line, F reduce) {
  static_assert(sizeof(T) <= 32, "collective value too large");
  unsigned char (*all)[32][32];
  uint32_t active, lane;
  emu::simd_exchange(&v, int(sizeof(T)), line, &all, &active, &lane);
  T vals[32];
  for (int i = 0; i < 32; ++i) std::memcpy(&vals[i], (*all)[i], sizeof(T));
  return reduce(vals, active, lane);
}
template <class T> inline T simd_sum(T v, int line = __builtin_LINE()) {
  return emu_collective(v, line, [](const T* vals, uint32_t active, uint32_t) {
    T s = T(0);
    for (int i = 0; i < 32; ++i)
      if (active >> i & 1u) s = s + vals[i];
    return s;
  });
}
template <class T> inline T simd_max(T v, int line = __builtin_LINE()) {
  return emu_collective(v, line, [](const T* vals, uint32_t active, uint32_t lane) {
    T s = vals[lane];
    for (int i = 0; i < 32; ++i)
      if (active >> i & 1u) s = max(s, vals[i]);
    return s;
  });
}
template <class T> inline T simd_min(T v, int line = __builtin_LINE()) {
  return emu_collective(v, line, [](const T* vals, uint32_t active, uint32_t lane) {
    T s = vals[lane];
    for (int i = 0; i < 32; ++i)
      if (active >> i & 1u) s = min(s, vals[i]);
    return s;
  });
}
template <class T> inline T simd_shuffle(T v, ushort src, int line = __builtin_LINE()) {
  return emu_collective(v, line, [src](const T* vals, uint32_t, uint32_t) { return vals[src & 31]; });
}
template <class T> inline T simd_broadcast(T v, ushort src, int line = __builtin_LINE()) {
  return simd_shuffle(v, src, line);
}
template <class T> inline T simd_shuffle_down(T v, ushort delta, int line = __builtin_LINE()) {
  return emu_collective(v, line, [delta](const T* vals, uint32_t, uint32_t lane) {
    return lane + delta < 32 ? vals[lane + delta] : vals[lane];
  });
}
template <class T> inline T simd_shuffle_up(T v, ushort delta, int line = __builtin_LINE()) {
  return emu_collective(v, line, [delta](const T* vals, uint32_t, uint32_t lane) {
    return lane >= delta ? vals[lane - delta] : vals[lane];
  });
}
template <class T> inline T simd_shuffle_xor(T v, ushort mask, int line = __builtin_LINE()) {
  return emu_collective(v, line,
                        [mask](const T* vals, uint32_t, uint32_t lane) { return vals[(lane ^ mask) & 31]; });
}

// simdgroup_matrix (8x8): each lane holds two elements, row r and columns c, c + 1 of the matrix,
// at the coordinates Apple GPUs use (as MLX's steel MMA fragments document them): lane bits
// b4 b3 b2 b1 b0 hold r = 4 b4 + 2 b2 + b1, c = 4 b3 + 2 b0. Loads, stores and multiplies are
// SIMD-group collectives: every lane of a full SIMD group must reach the same one with the same
// arguments, else the dispatch fails naming the line. A matrix not yet written holds NaN poison.
// Each lane loads and stores its own elements without a switch point (the runtime compares the
// lanes' operations, lines and arguments, whenever they meet); a multiply exchanges elements.
inline void emu_mat_coord(uint lane, uint& r, uint& c) {
  r = (lane >> 4 & 1u) * 4u + (lane >> 2 & 1u) * 2u + (lane >> 1 & 1u);
  c = (lane >> 3 & 1u) * 4u + (lane & 1u) * 2u;
}
inline uint emu_mat_lane(uint r, uint c) {  // the lane holding element (r, c), at index c % 2
  return (r >> 2) << 4 | (c >> 2) << 3 | (r >> 1 & 1u) << 2 | (r & 1u) << 1 | (c >> 1 & 1u);
}
template <class T, int Cols, int Rows> struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "msl_emulator: only 8x8 simdgroup matrices");
  vec<T, 2> e;
  simdgroup_matrix() { std::memset(&e, 0xFF, sizeof e); }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int Cols, int Rows>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(const T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  m.e = vec<T, 2>(value);
  return m;
}

// One exchange among the SIMD group's lanes (a switch point); fails the dispatch unless all 32
// lanes take part. Returns the calling lane; `all` points at every lane's posted bytes.
template <class T>
inline uint emu_mat_exchange(const T& mine, const char* what, int line,
                             unsigned char (**all)[32][32]) {
  static_assert(sizeof(T) <= 32, "exchange value too large");
  uint32_t active, lane;
  emu::simd_exchange(&mine, int(sizeof(T)), line, all, &active, &lane);
  if (active != 0xFFFFFFFFu) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s with inactive lanes in the SIMD group", what);
    emu::report(line, msg);
  }
  return lane;
}

struct EmuMatArgs {
  const void* ptr;
  ulong elements_per_row;
  ulong origin_x, origin_y;
};
// A load or store: noted for the runtime's comparison of the lanes. Returns the calling lane.
inline uint emu_mat_note(const void* ptr, ulong elements_per_row, ulong2 origin, bool transpose,
                         const char* what, int line) {
  const EmuMatArgs args{ptr, elements_per_row * 2u + (transpose ? 1u : 0u), origin.x, origin.y};
  emu::mat_note(line, &args, sizeof args);
  if (origin.x || origin.y) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s with a matrix_origin: not emulated, offset the pointer", what);
    emu::report(line, msg);
  }
  return emu::lane_index();
}

template <class T, int Cols, int Rows>
inline void simdgroup_load(simdgroup_matrix<T, Cols, Rows>& d, const T* src,
                           ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                           bool transpose_matrix = false, int line = __builtin_LINE()) {
  const uint lane =
      emu_mat_note(src, elements_per_row, matrix_origin, transpose_matrix, "simdgroup_load", line);
  uint r, c;
  emu_mat_coord(lane, r, c);
  for (uint i = 0; i < 2u; ++i)
    d.e[i] = transpose_matrix ? src[(c + i) * elements_per_row + r] : src[r * elements_per_row + c + i];
}

template <class T, int Cols, int Rows>
inline void simdgroup_store(simdgroup_matrix<T, Cols, Rows> a, T* dst,
                            ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                            bool transpose_matrix = false, int line = __builtin_LINE()) {
  const uint lane =
      emu_mat_note(dst, elements_per_row, matrix_origin, transpose_matrix, "simdgroup_store", line);
  uint r, c;
  emu_mat_coord(lane, r, c);
  for (uint i = 0; i < 2u; ++i)
    (transpose_matrix ? dst[(c + i) * elements_per_row + r] : dst[r * elements_per_row + c + i]) =
        a.e[i];
}

// d = a * b + c: every lane posts its elements of a and b, then computes its two elements of d
// from row r of a and columns c, c + 1 of b (products summed in float32 over k = 0..7).
template <class T, int Cols, int Rows, int K>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, Cols, Rows>& d,
                                          const simdgroup_matrix<T, K, Rows>& a,
                                          const simdgroup_matrix<T, Cols, K>& b,
                                          const simdgroup_matrix<T, Cols, Rows>& c,
                                          int line = __builtin_LINE()) {
  struct Parts {
    vec<T, 2> a, b;
  };
  const Parts mine{a.e, b.e};
  const vec<T, 2> acc = c.e;
  emu::mat_note(line, nullptr, 0);
  unsigned char (*all)[32][32];
  const uint lane = emu_mat_exchange(mine, "simdgroup_multiply_accumulate", line, &all);
  auto part = [all](uint l) {
    Parts p;
    std::memcpy(&p, (*all)[l], sizeof p);
    return p;
  };
  uint r, c0;
  emu_mat_coord(lane, r, c0);
  float s[2] = {float(acc[0]), float(acc[1])};
  for (uint k = 0; k < 8u; ++k) {
    const float av = float(part(emu_mat_lane(r, k)).a[k & 1u]);
    for (uint i = 0; i < 2u; ++i) s[i] += av * float(part(emu_mat_lane(k, c0 + i)).b[(c0 + i) & 1u]);
  }
  d.e = vec<T, 2>(T(s[0]), T(s[1]));
}

template <class T, int Cols, int Rows, int K>
inline void simdgroup_multiply(simdgroup_matrix<T, Cols, Rows>& d,
                               const simdgroup_matrix<T, K, Rows>& a,
                               const simdgroup_matrix<T, Cols, K>& b, int line = __builtin_LINE()) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<T, Cols, Rows>(T(0)), line);
}
}  // namespace metal

using namespace metal;
