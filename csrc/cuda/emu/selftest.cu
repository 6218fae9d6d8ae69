// Kernels that test the emulator itself (compiled, like the instantiation units, as instrumented host C++
// for the emulator only): three deliberately broken kernels and a deadlock, each of which the emulator
// must report, and the warp GEMM helpers of tile.h (ldmatrix, ldmatrix.trans, mma.sync through the
// swizzled tiles) against a plain matrix product. ops_emu.cpp exposes them as attnkern_emu ops.
#include "../tile.h"

namespace attnkern {
namespace cuda {

// Writes shared memory, then reads another warp's element without the __syncthreads between.
__global__ void emu_broken_missing_syncthreads(float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int tid = threadIdx.x;
  s[tid] = float(tid);
  // __syncthreads() belongs here
  out[tid] = s[(tid + 32) % blockDim.x];
}

// cp.async a row of 8 halves per thread and read it back with no cp.async.wait_group.
__global__ void emu_broken_read_before_wait(const __half* in, float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* s = reinterpret_cast<__half*>(smem_raw);
  const int tid = threadIdx.x;
  cp_async_16(s + tid * 8, in + tid * 8, true);
  cp_async_commit();
  // cp_async_wait<0>() and __syncthreads() belong here
  out[tid] = to_float(s[tid * 8]);
}

// Fills a 16 x 64 tile, one element too many: the last thread stores one past its end.
__global__ void emu_broken_store_past_tile(float* out) {
  using Tile = SmemTile<16, 64>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* s = reinterpret_cast<__half*>(smem_raw);
  const int tid = threadIdx.x;
  for (int i = tid; i <= Tile::kElems; i += blockDim.x) s[i] = __float2half_rn(1.f);  // `<=`: one too many
  __syncthreads();
  out[tid] = to_float(s[tid]);
}

// Stores one past the end of a global output.
__global__ void emu_broken_store_past_global(float* out, int n) {
  const int tid = threadIdx.x;
  if (tid <= n) out[tid] = 1.f;  // `<=`: one too many
}

// Only the first warp reaches the barrier.
__global__ void emu_broken_divergent_barrier(float* out) {
  const int tid = threadIdx.x;
  if (tid < 32) __syncthreads();
  out[tid] = 1.f;
}

// A shuffle that half of warp 0 skips: the other lanes wait for lanes that have exited.
__global__ void emu_broken_shuffle_missing_lanes(float* out) {
  const int tid = threadIdx.x;
  float x = float(tid);
  if (tid < 16) x = __shfl_xor_sync(0xffffffffu, x, 1);
  out[tid] = x;
}

// Lanes exchange values through shared memory inside one warp, with (correct) or without (a race
// under the CUDA memory model since Volta's independent thread scheduling) __syncwarp in between.
template <bool kSyncwarp>
__global__ void emu_warp_exchange(float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int tid = threadIdx.x;
  s[tid] = float(tid);
  if (kSyncwarp) __syncwarp();
  out[tid] = s[tid ^ 1];
}

// kBarriers clean barrier intervals on the first 512 bytes, then the region after them: with kRace, the
// race of emu_broken_missing_syncthreads (a launch that fails mid-block, after its barriers); without,
// the same exchange done right. A later launch must not see the failed one's shadow records.
template <int kBarriers, bool kRace>
__global__ void emu_race_after_barriers(float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  float* r = s + 128;
  const int tid = threadIdx.x;
  float acc = 0.f;
  for (int i = 0; i < kBarriers; ++i) {  // intervals that write only their own element or only read
    if (i % 2 == 0) {
      s[tid] = float(tid + i);
    } else {
      acc += s[(tid + 32) % blockDim.x];
    }
    __syncthreads();
  }
  r[tid] = acc;
  if (!kRace) __syncthreads();
  out[tid] = r[(tid + 32) % blockDim.x];
}

// Does nothing: for the launch-limit checks.
__global__ void emu_noop(float* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = 1.f;
}

// The same, never given the shared-memory opt-in (an attribute set once stays set for its kernel).
__global__ void emu_noop_without_optin(float* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = 1.f;
}

// S = Q K^T (warp_mma_abt: ldmatrix on both operands) and O = P V with P = S rounded to T
// (warp_mma_pb: ldmatrix.trans), the latter once over all columns and once in two column halves (the
// split dK/dV path), through the swizzled tiles of head dim kHD. 64 rows and 64 keys, 4 warps.
template <typename T, int kHD>
__global__ void emu_warp_gemm_check(const T* q, const T* k, const T* v, float* s_out, float* o_out,
                                    float* o_split_out) {
  constexpr int kRows = 64, kThreads = 128, kNT = kRows / 8, kOT = kHD / 8;
  using Tile = SmemTile<kRows, smem_width(kHD)>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Tile::kElems;
  T* sV = sK + Tile::kElems;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  load_tile_async<Tile, kThreads, kHD>(sQ, q, kHD, kRows, kHD, tid);
  load_tile_async<Tile, kThreads, kHD>(sK, k, kHD, kRows, kHD, tid);
  load_tile_async<Tile, kThreads, kHD>(sV, v, kHD, kRows, kHD, tid);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  float s[kNT][4], o[kOT][4], lo[kOT / 2][4], hi[kOT / 2][4];
  zero(s), zero(o), zero(lo), zero(hi);
  warp_mma_abt<T, Tile, Tile, kHD, kNT>(s, sQ, warp * 16, sK, lane);
  warp_mma_pb<T, Tile, kNT, kOT>(o, s, sV, 0, lane);
  warp_mma_pb<T, Tile, kNT, kOT / 2>(lo, s, sV, 0, lane);
  warp_mma_pb<T, Tile, kNT, kOT / 2>(hi, s, sV, kHD / 2, lane);
  for (int e = 0; e < 4; ++e) {
    const int row = warp * 16 + g + 8 * (e >> 1), c = 2 * t + (e & 1);
    for (int j = 0; j < kNT; ++j) s_out[row * kRows + j * 8 + c] = s[j][e];
    for (int j = 0; j < kOT; ++j) o_out[row * kHD + j * 8 + c] = o[j][e];
    for (int j = 0; j < kOT / 2; ++j) {
      o_split_out[row * kHD + j * 8 + c] = lo[j][e];
      o_split_out[row * kHD + kHD / 2 + j * 8 + c] = hi[j][e];
    }
  }
}

template <typename T, int kHD>
cudaError_t run_warp_gemm_check(const void* q, const void* k, const void* v, float* s, float* o, float* o_split) {
  constexpr int kBytes = 3 * 64 * smem_width(kHD) * int(sizeof(T));
  auto kernel = emu_warp_gemm_check<T, kHD>;
  if (kBytes > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    if (err != cudaSuccess) return err;
  }
  ATTNKERN_LAUNCH(kernel, dim3(1), dim3(128), kBytes, nullptr)
  (static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), s, o, o_split);
  return cudaGetLastError();
}

// The entry points ops_emu.cpp calls (declared there).
cudaError_t emu_warp_gemm_check(bool bf16, int hd, const void* q, const void* k, const void* v, float* s, float* o,
                                float* o_split) {
#define ATTNKERN_EMU_HD(HD)                                                                                      \
  case HD:                                                                                                       \
    return bf16 ? run_warp_gemm_check<__nv_bfloat16, HD>(q, k, v, s, o, o_split)                                 \
                : run_warp_gemm_check<__half, HD>(q, k, v, s, o, o_split);
  switch (hd) {
    ATTNKERN_EMU_HD(32)
    ATTNKERN_EMU_HD(64)
    ATTNKERN_EMU_HD(96)
    ATTNKERN_EMU_HD(128)
    ATTNKERN_EMU_HD(256)
    default: return cudaErrorInvalidValue;
  }
#undef ATTNKERN_EMU_HD
}

// Runs one broken kernel on buffers the caller registered (`in`: 128 x 8 halves, `out`: 128 floats, or
// 100 for the global one); 5-8 break the launch limits; 9: a shuffle with lanes missing; 10 and 11:
// a warp exchange through shared memory with and without __syncwarp; 12: a race after 16 barriers;
// 13: the same exchange done right, after 15.
void emu_run_broken(int which, const __half* in, float* out) {
  switch (which) {
    case 0: ATTNKERN_LAUNCH(emu_broken_missing_syncthreads, 1, 128, 128 * 4, nullptr)(out); break;
    case 1: ATTNKERN_LAUNCH(emu_broken_read_before_wait, 1, 128, 128 * 16, nullptr)(in, out); break;
    case 2: ATTNKERN_LAUNCH(emu_broken_store_past_tile, 1, 128, 16 * 64 * 2, nullptr)(out); break;
    case 3: ATTNKERN_LAUNCH(emu_broken_store_past_global, 1, 128, 0, nullptr)(out, 100); break;
    case 4: ATTNKERN_LAUNCH(emu_broken_divergent_barrier, 1, 128, 0, nullptr)(out); break;
    // Launch limits: 120 KB of shared memory after the opt-in (not on sm_86/sm_89), 64 KB without the
    // opt-in, a grid with z over 65535, a block of 2048 threads.
    case 5:
      cudaFuncSetAttribute(emu_noop, cudaFuncAttributeMaxDynamicSharedMemorySize, 120 * 1024);
      ATTNKERN_LAUNCH(emu_noop, 1, 128, 120 * 1024, nullptr)(out);
      break;
    case 6: ATTNKERN_LAUNCH(emu_noop_without_optin, 1, 128, 64 * 1024, nullptr)(out); break;
    case 7: ATTNKERN_LAUNCH(emu_noop, dim3(1, 1, 65536), 128, 0, nullptr)(out); break;
    case 8: ATTNKERN_LAUNCH(emu_noop, 1, 2048, 0, nullptr)(out); break;
    case 9: ATTNKERN_LAUNCH(emu_broken_shuffle_missing_lanes, 1, 128, 0, nullptr)(out); break;
    case 10: ATTNKERN_LAUNCH(emu_warp_exchange<true>, 1, 128, 128 * 4, nullptr)(out); break;
    case 11: ATTNKERN_LAUNCH(emu_warp_exchange<false>, 1, 128, 128 * 4, nullptr)(out); break;
    case 12: ATTNKERN_LAUNCH((emu_race_after_barriers<16, true>), 1, 128, 256 * 4, nullptr)(out); break;
    default: ATTNKERN_LAUNCH((emu_race_after_barriers<15, false>), 1, 128, 256 * 4, nullptr)(out); break;
  }
}

}  // namespace cuda
}  // namespace attnkern
