// Prefill, dispatch 1 of 3, on the matrix units: moe_gate_up_gemm with the staged tiles multiplied
// by simdgroup_matrix 8x8 multiply-accumulates instead of scalar FMAs (same inputs, grid, output).
// Per 32-input step the 256 threads stage the 32 x rows of the tile (zero outside the current
// expert segment, so the segment's weights add nothing to other rows) and dequantize 32 gate and
// 32 up rows (E2M1 bits x E8M0 scale, float32); SIMD group s then multiplies the 8 rows 8*(s/2)..
// by the 16 units 16*(s%2).. of gate and of up: 4 accumulators, 4 k-steps of 8. The sums go back
// through threadgroup memory for the biases and the clipped SwiGLU.
// Grid (256 * I / 32, ceil(P / 32), 1), threadgroup (256, 1, 1). Output act [P, I] float32 in
// sorted-row order. Template: T (x dtype), B (bias dtype), H, I, K.
threadgroup float xs[32][36];
threadgroup float gt[32][36];
threadgroup float ut[32][36];
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint n0 = threadgroup_position_in_grid.x * 32u;
const uint m0 = threadgroup_position_in_grid.y * 32u;
const uint P = uint(order_shape[0]);
const uint m_end = metal::min(m0 + 32u, P);
const uint NB = uint(H) / 32u;
const uint tm = tid / 8u;          // the row of x this thread stages (and finishes)
const uint tn = (tid % 8u) * 4u;   // its first column there
const uint wrow = (tid % 128u) / 4u;  // weight row it dequantizes (gate: tid < 128, up: the rest)
const uint wword = tid % 4u;          // which of the block's 4 words
const bool stage_up = tid >= 128u;
const uint r0 = (sg / 2u) * 8u;   // this SIMD group's rows of the tile
const uint c0 = (sg % 2u) * 16u;  // and its units

simdgroup_float8x8 acc[4];  // gate units c0.., c0 + 8.., then up units c0.., c0 + 8..
for (uint c = 0; c < 4u; ++c) {
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
  const uint token = mine ? order[m0 + tm] / uint(K) : 0u;
  const ulong wr = ulong(expert) * uint(I) + n0 + wrow;
  const device uint32_t* wsrc = (stage_up ? up_w : gate_w) + wr * (uint(H) / 8u);
  const device uint8_t* ssrc = (stage_up ? up_s : gate_s) + wr * NB;
  for (uint b = 0; b < NB; ++b) {
    for (uint i = 0; i < 4u; ++i) {
      xs[tm][tn + i] = mine ? float(x[ulong(token) * uint(H) + b * 32u + tn + i]) : 0.0f;
    }
    const uint word = wsrc[b * 4u + wword];
    const float scale = e8m0_to_float(ssrc[b]);
    for (uint p = 0; p < 4u; ++p) {
      const float2 v = fp4_pair(word, p) * scale;
      const uint col = wword * 8u + 2u * p;
      if (stage_up) {
        ut[wrow][col] = v.x;
        ut[wrow][col + 1u] = v.y;
      } else {
        gt[wrow][col] = v.x;
        gt[wrow][col + 1u] = v.y;
      }
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // tiles staged
    for (uint kk = 0; kk < 32u; kk += 8u) {
      simdgroup_float8x8 a;
      simdgroup_float8x8 w;
      simdgroup_load(a, &xs[r0][kk], 36);
      for (uint c = 0; c < 2u; ++c) {  // weights are [unit][input]: load them transposed
        simdgroup_load(w, &gt[c0 + 8u * c][kk], 36, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(acc[c], a, w, acc[c]);
        simdgroup_load(w, &ut[c0 + 8u * c][kk], 36, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(acc[2u + c], a, w, acc[2u + c]);
      }
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // tiles consumed
  }
  seg = seg_end;
}
for (uint c = 0; c < 2u; ++c) {  // the weight tiles are free now: gate sums to gt, up sums to ut
  simdgroup_store(acc[c], &gt[r0][c0 + 8u * c], 36);
  simdgroup_store(acc[2u + c], &ut[r0][c0 + 8u * c], 36);
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // sums stored
const uint m = m0 + tm;
if (m < P) {
  const uint expert = uint(sorted_experts[m]);
  const float limit = params[0];
  const float alpha = params[1];
  for (uint c = 0; c < 4u; ++c) {
    const uint unit = n0 + tn + c;
    const ulong bi = ulong(expert) * uint(I) + unit;
    act[ulong(m) * uint(I) + unit] =
        swiglu(gt[tm][tn + c] + float(gate_b[bi]), ut[tm][tn + c] + float(up_b[bi]), limit, alpha);
  }
}
