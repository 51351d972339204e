// Prefill, dispatch 1 of 3: tiled grouped GEMM for gate+up with fused biases and clipped SwiGLU.
// The host sorts the N * K (token, slot) pairs by expert (`order` = pair ids in expert order,
// `sorted_experts` = their experts). A threadgroup owns a 32-row tile of that sorted list and 32
// intermediate units; for each expert segment inside the tile it walks the input in 32-wide
// MXFP4 blocks: x rows and the gate/up weights, dequantized (E2M1 bits x E8M0 scale), are staged
// in threadgroup memory, then every thread accumulates 4 units x (gate, up) of one row in float32.
// Grid (256 * I / 32, ceil(P / 32), 1), threadgroup (256, 1, 1). Output act [P, I] float32 in
// sorted-row order. Template: T (x dtype), B (bias dtype), H, I, K.
threadgroup float xs[32][33];
threadgroup float gt[32][33];
threadgroup float ut[32][33];
const uint tid = thread_index_in_threadgroup;
const uint n0 = threadgroup_position_in_grid.x * 32u;
const uint m0 = threadgroup_position_in_grid.y * 32u;
const uint P = uint(order_shape[0]);
const uint m_end = metal::min(m0 + 32u, P);
const uint NB = uint(H) / 32u;
const uint tm = tid / 8u;          // this thread's row in the tile (the row of x it stages)
const uint tn = (tid % 8u) * 4u;   // its first unit in the tile (first column of x it stages)
const uint wrow = (tid % 128u) / 4u;  // weight row it dequantizes (gate: tid < 128, up: the rest)
const uint wword = tid % 4u;          // which of the block's 4 words
const bool stage_up = tid >= 128u;

float acc_g[4] = {0.0f, 0.0f, 0.0f, 0.0f};
float acc_u[4] = {0.0f, 0.0f, 0.0f, 0.0f};
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
    if (mine) {
      for (uint kk = 0; kk < 32u; ++kk) {
        const float xv = xs[tm][kk];
        for (uint c = 0; c < 4u; ++c) {
          acc_g[c] += xv * gt[tn + c][kk];
          acc_u[c] += xv * ut[tn + c][kk];
        }
      }
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // tiles consumed
  }
  seg = seg_end;
}
const uint m = m0 + tm;
if (m < P) {
  const uint expert = uint(sorted_experts[m]);
  const float limit = params[0];
  const float alpha = params[1];
  for (uint c = 0; c < 4u; ++c) {
    const uint unit = n0 + tn + c;
    const ulong bi = ulong(expert) * uint(I) + unit;
    act[ulong(m) * uint(I) + unit] =
        swiglu(acc_g[c] + float(gate_b[bi]), acc_u[c] + float(up_b[bi]), limit, alpha);
  }
}
