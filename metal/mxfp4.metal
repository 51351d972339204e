// MXFP4 helpers shared by the MoE kernels; moe.py passes this file as the `header` of every kernel.
// Layout (converted checkpoint): weight uint32 [E, out, in/8] (8 nibbles per word, element i of a
// word in bits 4i..4i+3, i.e. the low nibble of a byte first), scales uint8 E8M0 [E, out, in/32],
// one scale per block of 32 inputs (= 4 words = 16 bytes).

// E8M0 scale byte s -> 2^(s - 127): the byte is exactly a float32 exponent field.
inline float e8m0_to_float(uint s) {
  return s == 0u ? 5.877471754111438e-39f : as_type<float>(s << 23);
}

// FP4 (E2M1) values of elements 2j and 2j+1 (byte j) of a packed word, built in registers with bit
// operations (no table): a nibble s e1 e0 m moved to bits 15, 11..10 and 9 of a half is that half's
// sign, the low two bits of its exponent field and its top mantissa bit, so the half equals the
// E2M1 value times 2^-14 exactly (+-0.5 becomes the half subnormal +-2^-15). Both nibbles go
// through one 32-bit word as a half2; the 2^14 is an exact power-of-two product.
inline float2 fp4_pair(uint word, uint j) {
  const uint b = (word >> (8u * j)) & 0xFFu;
  const uint n = (b & 0xFu) | ((b & 0xF0u) << 12);  // element 2j in bits 0..3, 2j+1 in 16..19
  const uint h = ((n & 0x00070007u) << 9) | ((n & 0x00080008u) << 12);
  return float2(as_type<half2>(h)) * 16384.0f;
}

// Dot product of one MXFP4 block (a 16-byte load: 32 nibbles, unscaled) with xv[0..31].
inline float mxfp4_block_dot(uint4 block, thread const float* xv) {
  float acc = 0.0f;
  for (uint j = 0; j < 4u; ++j) {
    for (uint p = 0; p < 4u; ++p) {
      const float2 v = fp4_pair(block[j], p);
      acc += v.x * xv[8u * j + 2u * p] + v.y * xv[8u * j + 2u * p + 1u];
    }
  }
  return acc;
}

// gpt-oss clipped SwiGLU: g = min(g, limit), u = clamp(u, -limit, limit),
// out = g * sigmoid(alpha * g) * (u + 1).
inline float swiglu(float g, float u, float limit, float alpha) {
  g = metal::min(g, limit);
  u = metal::clamp(u, -limit, limit);
  return g / (1.0f + metal::precise::exp(-alpha * g)) * (u + 1.0f);
}
