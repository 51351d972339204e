// Prefill, dispatch 2 of 3: tiled grouped GEMM for down with fused bias and router weighting.
// Same tiling as moe_gate_up_gemm: a threadgroup owns 32 sorted rows (activations from dispatch
// 1) and 32 output columns; per expert segment of the tile it stages the activations and the
// dequantized down weights in threadgroup memory, 32 inputs at a time. Row m (pair p = order[m])
// is written to y_pairs[p] = route_w[p] * (W_d a + b_d), i.e. back in (token, slot) order.
// Grid (256 * H / 32, ceil(P / 32), 1), threadgroup (256, 1, 1). Output y_pairs [P, H] float32.
// Template: B (bias dtype), H, I, K.
threadgroup float at[32][33];
threadgroup float dt[32][33];
const uint tid = thread_index_in_threadgroup;
const uint n0 = threadgroup_position_in_grid.x * 32u;
const uint m0 = threadgroup_position_in_grid.y * 32u;
const uint P = uint(order_shape[0]);
const uint m_end = metal::min(m0 + 32u, P);
const uint NB = uint(I) / 32u;
const uint tm = tid / 8u;          // this thread's row in the tile (the row of act it stages)
const uint tn = (tid % 8u) * 4u;   // its first column in the tile (first column of act it stages)
const uint wrow = tid / 8u;        // weight row it dequantizes
const uint wword = (tid % 8u) / 2u;  // word of the block
const uint whalf = tid % 2u;         // which 4 of the word's 8 nibbles

float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
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
    if (mine) {
      for (uint kk = 0; kk < 32u; ++kk) {
        const float av = at[tm][kk];
        for (uint c = 0; c < 4u; ++c) {
          acc[c] += av * dt[tn + c][kk];
        }
      }
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // tiles consumed
  }
  seg = seg_end;
}
const uint m = m0 + tm;
if (m < P) {
  const uint pair = order[m];
  const uint expert = uint(sorted_experts[m]);
  const float w = route_w[pair];
  for (uint c = 0; c < 4u; ++c) {
    const uint col = n0 + tn + c;
    const float bias = float(down_b[ulong(expert) * uint(H) + col]);
    y_pairs[ulong(pair) * uint(H) + col] = w * (acc[c] + bias);
  }
}
