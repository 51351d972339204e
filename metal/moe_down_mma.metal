// Prefill, dispatch 2 of 3, on the matrix units: moe_down_gemm with simdgroup_matrix 8x8
// multiply-accumulates (same inputs, grid, output). Per 32-input step the activations of the
// tile's rows (zero outside the current expert segment) and 32 dequantized down rows are staged;
// SIMD group s multiplies rows 8*(s/2).. by the 16 outputs 16*(s%2)..: 2 accumulators. The sums
// go back through threadgroup memory; row m (pair p = order[m]) is written to
// y_pairs[p] = route_w[p] * (W_d a + b_d), in (token, slot) order.
// Grid (256 * H / 32, ceil(P / 32), 1), threadgroup (256, 1, 1). Output y_pairs [P, H] float32.
// Template: B (bias dtype), H, I, K.
threadgroup float at[32][36];
threadgroup float dt[32][36];
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint n0 = threadgroup_position_in_grid.x * 32u;
const uint m0 = threadgroup_position_in_grid.y * 32u;
const uint P = uint(order_shape[0]);
const uint m_end = metal::min(m0 + 32u, P);
const uint NB = uint(I) / 32u;
const uint tm = tid / 8u;          // the row of act this thread stages (and finishes)
const uint tn = (tid % 8u) * 4u;   // its first column there
const uint wrow = tid / 8u;        // weight row it dequantizes
const uint wword = (tid % 8u) / 2u;  // word of the block
const uint whalf = tid % 2u;         // which 4 of the word's 8 nibbles
const uint r0 = (sg / 2u) * 8u;   // this SIMD group's rows of the tile
const uint c0 = (sg % 2u) * 16u;  // and its outputs

simdgroup_float8x8 acc[2];
for (uint c = 0; c < 2u; ++c) {
  acc[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
uint seg = m0;
while (seg < m_end) {
  const uint expert = uint(sorted_experts[seg]);
  uint seg_end = seg + 1u;
  while (seg_end < m_end && uint(sorted_experts[seg_end]) == expert) {
    ++seg_end;
  }
  const bool mine = m0 + tm >= seg && m0 + tm < seg_end;
  const ulong wr = ulong(expert) * uint(H) + n0 + wrow;
  const device uint32_t* wsrc = down_w + wr * (uint(I) / 8u);
  const device uint8_t* ssrc = down_s + wr * NB;
  for (uint b = 0; b < NB; ++b) {
    for (uint i = 0; i < 4u; ++i) {
      at[tm][tn + i] = mine ? act[ulong(m0 + tm) * uint(I) + b * 32u + tn + i] : 0.0f;
    }
    const uint word = wsrc[b * 4u + wword];
    const float scale = e8m0_to_float(ssrc[b]);
    for (uint p = 0; p < 2u; ++p) {
      const float2 v = fp4_pair(word, whalf * 2u + p) * scale;
      const uint col = wword * 8u + whalf * 4u + 2u * p;
      dt[wrow][col] = v.x;
      dt[wrow][col + 1u] = v.y;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // tiles staged
    for (uint kk = 0; kk < 32u; kk += 8u) {
      simdgroup_float8x8 a;
      simdgroup_float8x8 w;
      simdgroup_load(a, &at[r0][kk], 36);
      for (uint c = 0; c < 2u; ++c) {  // weights are [output][input]: load them transposed
        simdgroup_load(w, &dt[c0 + 8u * c][kk], 36, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(acc[c], a, w, acc[c]);
      }
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // tiles consumed
  }
  seg = seg_end;
}
for (uint c = 0; c < 2u; ++c) {  // the activation tile is free now: the sums go there
  simdgroup_store(acc[c], &at[r0][c0 + 8u * c], 36);
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // sums stored
const uint m = m0 + tm;
if (m < P) {
  const uint pair = order[m];
  const uint expert = uint(sorted_experts[m]);
  const float w = route_w[pair];
  for (uint c = 0; c < 4u; ++c) {
    const uint col = n0 + tn + c;
    const float bias = float(down_b[ulong(expert) * uint(H) + col]);
    y_pairs[ulong(pair) * uint(H) + col] = w * (at[tm][tn + c] + bias);
  }
}
