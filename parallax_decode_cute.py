"""Parallax single-query decode over a KV cache: a CuTe DSL kernel for Hopper (SM90).

A leaf module (it imports only torch and the CuTe DSL); `parallax_decode.py` validates inputs and
dispatches here. One CTA of 4 warps works on one (batch row, KV head, KV split):

- rows of the tensor-core tile are [q heads; r heads] of the KV head's query group: q head g is
  row g and r head g is row 8 + g of one 16-row `mma.sync.m16n8k16` tile, so a thread holds the
  score s and the probe u = r.k of the same (head, key) in one register pair. (A 64-row WGMMA
  tile would be 75% padding here; with at most 16 live rows the warp-level MMA fits exactly.)
- each warp streams its own 16-key (D = 128) or 32-key (D = 64) tiles of K and V through a
  3-stage cp.async pipeline that keeps every stage in flight (128-bit loads, zero-filled past
  the visible keys; ~100 KiB of shared memory per CTA, so two CTAs share an SM), computes
  [S; U] = [Q; R] K^T and then [O1; O2] += [P; P*U] V on the tensor cores, keeping the online
  softmax state m, d1 = sum e^(s-m), d2 = sum e^(s-m) u per row;
- P and P*U are fed to the second product as a bf16/fp16 hi part plus a lo remainder (two MMAs),
  because o = (O1/d1)(1 + d2/d1) - O2/d1 cancels large terms and one rounding of P*U alone
  costs ~1% relative error at short cache lengths;
- the warps merge through shared memory; with split-KV each CTA writes its partial state and
  the last CTA of a (row, KV head) to arrive (an atomic counter that it resets) merges the splits
  and writes the output, so a decode step is a single launch.

cache_seqlens is read on the device and the split count is a launch argument, so one compiled
variant per (dtype, head dim, head ratio) serves every cache length and batch, and the launch can
be captured in a CUDA graph and replayed with new lengths. The first call of a variant compiles
it (about a second): make it before capturing.
"""
import torch

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warp
from cutlass.cute.runtime import make_ptr

NUM_WARPS = 4
NUM_STAGES = 3  # every stage in flight; ~100 KiB of shared memory lets 2 CTAs share an SM
TILE_ROWS = 16  # q heads in rows 0..7, r heads in rows 8..15
MAX_GROUP = TILE_ROWS // 2
LOG2_E = 1.4426950408889634

_TORCH_TO_CUTE = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}


def keys_per_warp_tile(head_dim):
    """16 keys at D = 128, 32 at D = 64: 4 KiB of K (and of V) per warp per stage."""
    return 2048 // head_dim


class ParallaxDecodeSm90:
    """The decode kernel for one (dtype, head dim, head ratio); call it through cute.compile."""

    def __init__(self, dtype, head_dim, group, num_warps=NUM_WARPS, num_stages=NUM_STAGES):
        assert head_dim in (64, 128) and group in (1, 2, 4, 8)
        self.dtype = dtype
        self.head_dim = head_dim
        self.group = group
        self.tile_n = keys_per_warp_tile(head_dim)
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.num_threads = 32 * num_warps

    # ------------------------------------------------------------------------------------------
    # Host side: build the global tensors from raw pointers, the layouts and the launch.

    @cute.jit
    def __call__(self, q_ptr: cute.Pointer, r_ptr: cute.Pointer, k_ptr: cute.Pointer,
                 v_ptr: cute.Pointer, lens_ptr: cute.Pointer, out_ptr: cute.Pointer,
                 ws_o_ptr: cute.Pointer, ws_stat_ptr: cute.Pointer, counter_ptr: cute.Pointer,
                 batch: Int32, max_len: Int32, kv_heads: Int32,
                 k_stride_b: Int64, k_stride_l: Int32, k_stride_h: Int32,
                 v_stride_b: Int64, v_stride_l: Int32, v_stride_h: Int32,
                 num_splits: Int32, window: Int32, scale_log2: Float32, stream: cuda.CUstream):
        D, G, S = self.head_dim, self.group, num_splits
        q_heads = kv_heads * G
        # q, r and out are contiguous (B, Hq, D); the caches only need unit stride in D and
        # strides that are multiples of 8 elements (16-byte cp.async), checked by the caller.
        qo_layout = cute.make_layout((batch, q_heads, D), stride=(q_heads * D, D, 1))
        mQ = cute.make_tensor(q_ptr, qo_layout)
        mR = cute.make_tensor(r_ptr, qo_layout)
        mOut = cute.make_tensor(out_ptr, qo_layout)
        mK = cute.make_tensor(k_ptr, cute.make_layout(
            (batch, max_len, kv_heads, D),
            stride=(cute.assume(k_stride_b, divby=8), cute.assume(k_stride_l, divby=8),
                    cute.assume(k_stride_h, divby=8), 1)))
        mV = cute.make_tensor(v_ptr, cute.make_layout(
            (batch, max_len, kv_heads, D),
            stride=(cute.assume(v_stride_b, divby=8), cute.assume(v_stride_l, divby=8),
                    cute.assume(v_stride_h, divby=8), 1)))
        mLens = cute.make_tensor(lens_ptr, cute.make_layout((batch,)))
        # split-KV partials: per (row * KV head, split) the unnormalized O1 (rows 0..G-1) and
        # O2 (rows G..2G-1), and (m, d1, d2) per head; one arrival counter per (row, KV head)
        pairs = batch * kv_heads
        mWsO = cute.make_tensor(ws_o_ptr, cute.make_layout(
            (pairs, S, 2 * G, D), stride=(S * 2 * G * D, 2 * G * D, D, 1)))
        mWsStat = cute.make_tensor(ws_stat_ptr, cute.make_layout(
            (pairs, S, 3, G), stride=(S * 3 * G, 3 * G, G, 1)))
        mCounter = cute.make_tensor(counter_ptr, cute.make_layout((pairs,)))

        # Shared memory: swizzled (8 x 64) atoms so both cp.async writes and ldmatrix reads
        # are free of bank conflicts.
        smem_atom = cute.make_composed_layout(
            cute.make_swizzle(3, 3, 3), 0, cute.make_layout((8, 64), stride=(64, 1)))
        sQR_layout = cute.tile_to_shape(smem_atom, (TILE_ROWS, D), (0, 1))
        # (keys, D, stage + warp * self.num_stages): every warp owns self.num_stages private tiles
        sKV_layout = cute.tile_to_shape(
            smem_atom, (self.tile_n, D, self.num_stages * self.num_warps), (0, 1, 2))
        merge_o_elems = self.num_warps * TILE_ROWS * D
        kv_elems = cute.cosize(sKV_layout)

        @cute.struct
        class SharedStorage:
            sQR: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sQR_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, kv_elems], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, kv_elems], 1024]
            # per-warp softmax state (m, d1, d2) for the 8 heads, then the split's arrival order
            sStat: cute.struct.MemRange[Float32, self.num_warps * 3 * MAX_GROUP]
            sArrival: cute.struct.MemRange[Int32, 4]

        assert merge_o_elems * 4 <= kv_elems * (self.dtype.width // 8)

        # A warp loads its (keys, D) tile with 128-bit cp.async: D / 8 threads per key row.
        threads_per_row = D // 8
        gmem_copy = cute.make_tiled_copy_tv(
            cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL),
                                self.dtype, num_bits_per_copy=128),
            cute.make_layout((32 // threads_per_row, threads_per_row), stride=(threads_per_row, 1)),
            cute.make_layout((1, 8)))
        # One warp per MMA: a 16-row tile; N permuted to 16 so ldmatrix.x4 feeds B.
        tiled_mma = cute.make_tiled_mma(
            warp.MmaF16BF16Op(self.dtype, Float32, (16, 8, 16)), (1, 1, 1),
            permutation_mnk=(16, 16, 16))

        self.kernel(mQ, mR, mK, mV, mLens, mOut, mWsO, mWsStat, mCounter, window, scale_log2,
                    sQR_layout, sKV_layout, gmem_copy, tiled_mma, SharedStorage).launch(
            grid=(S, kv_heads, batch), block=(self.num_threads, 1, 1), stream=stream)

    # ------------------------------------------------------------------------------------------
    # Device side.

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mR: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
               mLens: cute.Tensor, mOut: cute.Tensor, mWsO: cute.Tensor, mWsStat: cute.Tensor,
               mCounter: cute.Tensor, window: Int32, scale_log2: Float32,
               sQR_layout: cute.ComposedLayout, sKV_layout: cute.ComposedLayout,
               gmem_copy: cute.TiledCopy, tiled_mma: cute.TiledMma,
               SharedStorage: cutlass.Constexpr):
        D, G, T = self.head_dim, self.group, self.tile_n
        tidx, _, _ = cute.arch.thread_idx()
        split, kv_head, batch_idx = cute.arch.block_idx()
        num_splits = mWsO.shape[1]
        warp_idx = tidx // 32
        lane = tidx % 32
        kv_heads = mK.shape[2]
        pair = batch_idx * kv_heads + kv_head

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQR = storage.sQR.get_tensor(sQR_layout)
        sK = storage.sK.get_tensor(sKV_layout)
        sV = storage.sV.get_tensor(sKV_layout)
        sStat = storage.sStat.get_tensor(cute.make_layout((self.num_warps, 3, MAX_GROUP),
                                                          stride=(3 * MAX_GROUP, MAX_GROUP, 1)))
        sArrival = storage.sArrival.get_tensor(cute.make_layout((4,)))
        # V^T view for the second product's B operand: (D, keys, stage)
        sVt = cute.composition(sV, cute.make_layout(
            (D, T, self.num_stages * self.num_warps), stride=(T, 1, T * D)))

        # ---- which keys this warp reads ------------------------------------------------------
        # Visible keys are [lo, hi); the row's warp tiles (T keys, aligned to multiples of T)
        # are dealt out to splits in contiguous runs and, inside a split, round-robin to warps.
        max_len = mK.shape[1]
        hi = cutlass.min(mLens[batch_idx], max_len)
        lo = cutlass.max(hi - window, 0)
        first_tile = lo // T
        num_tiles = cutlass.max((hi + T - 1) // T - first_tile, 0)
        tiles_per_split = (num_tiles + num_splits - 1) // num_splits
        split_first = first_tile + split * tiles_per_split
        split_tiles = cutlass.max(
            cutlass.min(tiles_per_split, num_tiles - split * tiles_per_split), 0)
        warp_tiles = cutlass.max(split_tiles - warp_idx + self.num_warps - 1, 0) // self.num_warps

        gK = cute.local_tile(mK[batch_idx, None, kv_head, None], (T, D), (None, 0))
        gV = cute.local_tile(mV[batch_idx, None, kv_head, None], (T, D), (None, 0))
        thr_copy = gmem_copy.get_slice(lane)
        tKgK = thr_copy.partition_S(gK)  # (CPY, CPY_N, CPY_K, tiles)
        tVgV = thr_copy.partition_S(gV)
        tKsK = thr_copy.partition_D(sK)  # (CPY, CPY_N, CPY_K, stage + warp * self.num_stages)
        tVsV = thr_copy.partition_D(sV)
        tKcK = thr_copy.partition_S(cute.make_identity_tensor((T, D)))
        key_pred = cute.make_rmem_tensor(
            cute.make_layout((1, cute.size(tKsK, mode=[1]), cute.size(tKsK, mode=[2])),
                             stride=(0, 1, 0)), cutlass.Boolean)

        # Fill every stage before anything else so the loads overlap the setup below.
        for i in cutlass.range_constexpr(self.num_stages):
            if i < warp_tiles:
                self.load_kv_tile(gmem_copy, tKgK, tVgV, tKsK, tVsV, tKcK, key_pred,
                                  split_first + warp_idx + i * self.num_warps,
                                  warp_idx * self.num_stages + i, lo, hi)
            cute.arch.cp_async_commit_group()

        # ---- [q heads; r heads] -> shared memory, zero rows for absent heads -----------------
        for i in cutlass.range_constexpr(TILE_ROWS * D // self.num_threads):
            idx = i * self.num_threads + tidx
            row = idx // D
            col = idx % D
            head = row % MAX_GROUP
            q_head = kv_head * G + cutlass.min(head, G - 1)
            value = mQ[batch_idx, q_head, col] if row < MAX_GROUP else mR[batch_idx, q_head, col]
            sQR[row, col] = value if head < G else self.dtype(0)
        cute.arch.barrier()

        # ---- MMA partitions ------------------------------------------------------------------
        thr_mma = tiled_mma.get_slice(lane)
        tSrQR = thr_mma.make_fragment_A(thr_mma.partition_A(sQR))
        tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(sK[None, None, 0]))
        tOrVt = thr_mma.make_fragment_B(thr_mma.partition_B(sVt[None, None, 0]))
        acc_O = cute.make_rmem_tensor(thr_mma.partition_shape_C((TILE_ROWS, D)), Float32)
        acc_O.fill(0.0)
        acc_shape_S = thr_mma.partition_shape_C((TILE_ROWS, T))

        ldsm = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4),
                                   self.dtype)
        ldsm_t = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4),
                                     self.dtype)
        smem_copy_QR = cute.make_tiled_copy_A(ldsm, tiled_mma).get_slice(lane)
        smem_copy_K = cute.make_tiled_copy_B(ldsm, tiled_mma).get_slice(lane)
        smem_copy_V = cute.make_tiled_copy_B(ldsm_t, tiled_mma).get_slice(lane)
        tSsK = smem_copy_K.partition_S(sK)
        tSrK_view = smem_copy_K.retile(tSrK)
        tOsVt = smem_copy_V.partition_S(sVt)
        tOrVt_view = smem_copy_V.retile(tOrVt)
        cute.copy(smem_copy_QR, smem_copy_QR.partition_S(sQR), smem_copy_QR.retile(tSrQR))

        # key offset (inside the warp tile) of every score this thread holds
        tScS_mn = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((TILE_ROWS, T))))
        acc_O_mn = _mn_view(acc_O)
        # this thread's softmax state for head lane // 4: running max (log2 units), d1, d2
        state = cute.make_rmem_tensor((3,), Float32)
        state[0] = -Float32.inf
        state[1] = 0.0
        state[2] = 0.0

        # ---- main loop: one warp tile per iteration ------------------------------------------
        for i in cutlass.range(warp_tiles, unroll=1):
            cute.arch.cp_async_wait_group(self.num_stages - 1)
            cute.arch.sync_warp()  # tile i landed, for every lane of the warp
            buf = warp_idx * self.num_stages + i % self.num_stages
            key0 = (split_first + warp_idx + i * self.num_warps) * T

            # [S; U] = [Q; R] K^T, even and odd k-steps in two accumulators (shorter chains)
            acc_S = cute.make_rmem_tensor(acc_shape_S, Float32)
            acc_S_odd = cute.make_rmem_tensor(acc_shape_S, Float32)
            acc_S.fill(0.0)
            acc_S_odd.fill(0.0)
            tSsK_buf = tSsK[None, None, None, buf]
            for k in cutlass.range_constexpr(cute.size(tSsK_buf.shape[2])):
                cute.copy(smem_copy_K, tSsK_buf[None, None, k], tSrK_view[None, None, k])
                acc = acc_S if k % 2 == 0 else acc_S_odd
                cute.gemm(tiled_mma, acc, tSrQR[None, None, k], tSrK[None, None, k], acc)
            acc_S.store(acc_S.load() + acc_S_odd.load())

            # online softmax on row 0 (s of head lane // 4) weighting row 1 (u of that head)
            acc_S_mn = _mn_view(acc_S)
            num_cols = cute.size(acc_S_mn, mode=[1])
            tile_max = -Float32.inf
            for c in cutlass.range_constexpr(num_cols):
                key = key0 + tScS_mn[0, c][1]
                visible = (key >= lo) & (key < hi)
                acc_S_mn[0, c] = acc_S_mn[0, c] * scale_log2 if visible else -Float32.inf
                acc_S_mn[1, c] = acc_S_mn[1, c] if visible else Float32(0.0)
                tile_max = cute.arch.fmax(tile_max, acc_S_mn[0, c])
            tile_max = _quad_allreduce(tile_max, cute.arch.fmax)
            m_new = cute.arch.fmax(state[0], tile_max)
            m_safe = Float32(0.0) if m_new == -Float32.inf else m_new
            alpha = cute.math.exp2(state[0] - m_safe, fastmath=True)
            d1 = Float32(0.0)
            d2 = Float32(0.0)
            for c in cutlass.range_constexpr(num_cols):
                p = cute.math.exp2(acc_S_mn[0, c] - m_safe, fastmath=True)
                pu = p * acc_S_mn[1, c]
                d1 += p
                d2 += pu
                acc_S_mn[0, c] = p
                acc_S_mn[1, c] = pu
            state[0] = m_new
            state[1] = state[1] * alpha + d1
            state[2] = state[2] * alpha + d2
            for c in cutlass.range_constexpr(cute.size(acc_O_mn, mode=[1])):
                acc_O_mn[0, c] = acc_O_mn[0, c] * alpha
                acc_O_mn[1, c] = acc_O_mn[1, c] * alpha

            # [O1; O2] += [P; P*U] V, with P split into a 16-bit hi part and its remainder
            p_all = acc_S.load()
            rP_hi = cute.make_rmem_tensor_like(acc_S, self.dtype)
            rP_lo = cute.make_rmem_tensor_like(acc_S, self.dtype)
            p_hi = p_all.to(self.dtype)
            rP_hi.store(p_hi)
            rP_lo.store((p_all - p_hi.to(Float32)).to(self.dtype))
            tOrP_hi = _acc_as_operand_a(rP_hi)
            tOrP_lo = _acc_as_operand_a(rP_lo)
            tOsVt_buf = tOsVt[None, None, None, buf]
            for k in cutlass.range_constexpr(cute.size(tOrP_hi.shape[2])):
                cute.copy(smem_copy_V, tOsVt_buf[None, None, k], tOrVt_view[None, None, k])
                cute.gemm(tiled_mma, acc_O, tOrP_hi[None, None, k], tOrVt[None, None, k], acc_O)
                cute.gemm(tiled_mma, acc_O, tOrP_lo[None, None, k], tOrVt[None, None, k], acc_O)

            cute.arch.sync_warp()  # every lane is done reading buffer `buf`: refill it
            if i + self.num_stages < warp_tiles:
                ahead = split_first + warp_idx + (i + self.num_stages) * self.num_warps
                self.load_kv_tile(gmem_copy, tKgK, tVgV, tKsK, tVsV, tKcK, key_pred, ahead, buf,
                                  lo, hi)
            cute.arch.cp_async_commit_group()

        # ---- merge the warps through shared memory (reusing the K buffers) -------------------
        cute.arch.cp_async_wait_group(0)
        state[1] = _quad_allreduce(state[1], _add)
        state[2] = _quad_allreduce(state[2], _add)
        cute.arch.barrier()  # every warp is done reading sK
        sMergeO = cute.make_tensor(
            cute.recast_ptr(sK.iterator, dtype=Float32),
            cute.make_layout((self.num_warps, TILE_ROWS, D), stride=(TILE_ROWS * D, D, 1)))
        tOsO = thr_mma.partition_C(sMergeO[warp_idx, None, None])
        tOsO.store(acc_O.load())
        if lane % 4 == 0:
            for j in cutlass.range_constexpr(3):
                sStat[warp_idx, j, lane // 4] = state[j]
        cute.arch.barrier()

        for j in cutlass.range_constexpr((G * D + self.num_threads - 1) // self.num_threads):
            idx = j * self.num_threads + tidx
            if idx < G * D:
                head = idx // D
                col = idx % D
                m, d1, d2, o1, o2 = _merge_partials(sStat, sMergeO, self.num_warps, head, col,
                                                    MAX_GROUP)
                if num_splits == 1:
                    mOut[batch_idx, kv_head * G + head, col] = _finalize(d1, d2, o1, o2).to(
                        self.dtype)
                else:
                    mWsO[pair, split, head, col] = o1
                    mWsO[pair, split, G + head, col] = o2
                    if col == 0:
                        mWsStat[pair, split, 0, head] = m
                        mWsStat[pair, split, 1, head] = d1
                        mWsStat[pair, split, 2, head] = d2

        # ---- split-KV: the last split to arrive merges all partials ---------------------------
        if num_splits > 1:
            # Publish the partials and count arrivals (the grid-sync pattern: the CTA barrier
            # orders every thread's stores before thread 0's cumulative fence and atomic).
            cute.arch.barrier()
            if tidx == 0:
                cute.arch.fence_acq_rel_gpu()
                sArrival[0] = cute.arch.atomic_add(mCounter.iterator + pair, Int32(1),
                                                   sem="relaxed", scope="gpu")
                cute.arch.fence_acq_rel_gpu()
            cute.arch.barrier()
            if sArrival[0] == num_splits - 1:
                for j in cutlass.range_constexpr(
                        (G * D + self.num_threads - 1) // self.num_threads):
                    idx = j * self.num_threads + tidx
                    if idx < G * D:
                        head = idx // D
                        col = idx % D
                        m, d1, d2, o1, o2 = _merge_partials(
                            mWsStat[pair, None, None, None], mWsO[pair, None, None, None],
                            num_splits, head, col, G)
                        mOut[batch_idx, kv_head * G + head, col] = _finalize(
                            d1, d2, o1, o2).to(self.dtype)
                if tidx == 0:
                    mCounter[pair] = Int32(0)  # ready for the next launch (or graph replay)

    @cute.jit
    def load_kv_tile(self, gmem_copy: cute.TiledCopy, tKgK: cute.Tensor, tVgV: cute.Tensor,
                     tKsK: cute.Tensor, tVsV: cute.Tensor, tKcK: cute.Tensor,
                     key_pred: cute.Tensor, tile: Int32, buf: Int32, lo: Int32, hi: Int32):
        """cp.async warp tile `tile` of K and V into buffer `buf`; keys outside [lo, hi) read
        as zeros (so neither garbage nor NaN past the cache length reaches the MMAs)."""
        for n in cutlass.range_constexpr(cute.size(tKsK, mode=[1])):
            key = tile * self.tile_n + tKcK[0, n, 0][0]
            key_pred[0, n, 0] = (key >= lo) & (key < hi)
        cute.copy(gmem_copy, tKgK[None, None, None, tile], tKsK[None, None, None, buf],
                  pred=key_pred)
        cute.copy(gmem_copy, tVgV[None, None, None, tile], tVsV[None, None, None, buf],
                  pred=key_pred)


# ----------------------------------------------------------------------------------------------
# Device helpers (traced inline into the kernel)


def _add(a, b):
    return a + b


def _quad_allreduce(value, op):
    """Reduce over the 4 lanes that share an MMA row (lanes 4r .. 4r + 3)."""
    value = op(value, cute.arch.shuffle_sync_bfly(value, offset=2))
    return op(value, cute.arch.shuffle_sync_bfly(value, offset=1))


def _mn_view(acc):
    """View an m16n8 accumulator fragment ((2 cols, 2 rows), M, N) as (rows, cols)."""
    layout = cute.make_layout(acc.layout.shape)
    mn = cute.make_layout(
        ((layout.shape[0][1], layout.shape[1]), (layout.shape[0][0], layout.shape[2])),
        stride=((layout.stride[0][1], layout.stride[1]), (layout.stride[0][0], layout.stride[2])))
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))


def _acc_as_operand_a(frag):
    """Reuse two n8 accumulator tiles as the A operand of one k16 MMA (the FA2 register trick)."""
    divided = cute.logical_divide(frag.layout, (None, None, 2))
    layout = cute.make_layout(
        ((divided.shape[0], divided.shape[2][0]), divided.shape[1], divided.shape[2][1]),
        stride=((divided.stride[0], divided.stride[2][0]), divided.stride[1],
                divided.stride[2][1]))
    return cute.make_tensor(frag.iterator, layout)


@cute.jit
def _merge_partials(stat: cute.Tensor, o: cute.Tensor, n: Int32, head: Int32, col: Int32,
                    o2_row: cutlass.Constexpr):
    """Combine n online-softmax partial states of one (head, column) in one pass: stat is
    (n, 3, heads) holding (m, d1, d2), o is (n, rows, D) holding O1 at row head and O2 at row
    o2_row + head. The running sums are rescaled by 2^(m_old - m_new) as larger maxima arrive;
    the loop is unrolled so the loads of 16 partials are in flight together."""
    m = -Float32.inf
    d1 = Float32(0.0)
    d2 = Float32(0.0)
    o1 = Float32(0.0)
    o2 = Float32(0.0)
    for i in cutlass.range(n, unroll=16):
        m_i = stat[i, 0, head]
        m_new = cute.arch.fmax(m, m_i)
        m_safe = Float32(0.0) if m_new == -Float32.inf else m_new
        old_weight = cute.math.exp2(m - m_safe, fastmath=True)
        weight = cute.math.exp2(m_i - m_safe, fastmath=True)
        d1 = d1 * old_weight + weight * stat[i, 1, head]
        d2 = d2 * old_weight + weight * stat[i, 2, head]
        o1 = o1 * old_weight + weight * o[i, head, col]
        o2 = o2 * old_weight + weight * o[i, o2_row + head, col]
        m = m_new
    return m, d1, d2, o1, o2


@cute.jit
def _finalize(d1: Float32, d2: Float32, o1: Float32, o2: Float32):
    """o = (O1/d1)(1 + d2/d1) - O2/d1; a row with no visible key gives 0."""
    inv = Float32(1.0) / d1 if d1 > Float32(0.0) else Float32(0.0)
    return o1 * inv * (1.0 + d2 * inv) - o2 * inv


# ----------------------------------------------------------------------------------------------
# Python entry point


_compiled = {}
_counters = {}


def num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch, kv_heads, max_len, head_dim, device):
    """About one CTA per SM, and no more splits than 64-key runs of the cache: a function of the
    shape class only, never of the lengths. (More splits measured slower: the merge costs more
    than the extra parallelism gives.)"""
    tiles = -(-max_len // (keys_per_warp_tile(head_dim) * NUM_WARPS))
    return max(1, min(num_sms(device) // (batch * kv_heads), tiles))


def _arrival_counters(device, size):
    """Zeroed int32 counters, one per (row, KV head); the kernel leaves them at zero again, so one
    buffer per device serves every launch and graph replay (launches on concurrent streams must
    not share it). A first use inside a graph capture gets a buffer owned by that graph."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
        if torch.cuda.is_current_stream_capturing():
            return buf
        _counters[device] = buf
    return buf


def _ptr(t, dtype, align):
    return make_ptr(dtype, t.data_ptr(), cute.AddressSpace.gmem, assumed_align=align)


def parallax_decode_cute(q, r, k_cache, v_cache, cache_seqlens, window, scale, out, num_splits=None,
                         num_warps=NUM_WARPS, num_stages=NUM_STAGES):
    """Launch the SM90 kernel. The caller has validated the inputs: q, r and out contiguous
    (B, 1, Hq, D); caches (B, Lmax, Hkv, D) with unit stride in D, 16-byte aligned base
    pointers and strides; cache_seqlens int32 (B,). num_splits overrides the split count (a
    launch argument: no recompile); num_warps and num_stages are compile-time tuning knobs."""
    B, _, Hq, D = q.shape
    Lmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    device = q.device
    splits = num_splits or choose_num_splits(B, Hkv, Lmax, D, device)
    dtype = _TORCH_TO_CUTE[q.dtype]
    elem = q.element_size()
    if splits > 1:
        ws_o = torch.empty(B * Hkv * splits * 2 * group * D, dtype=torch.float32, device=device)
        ws_stat = torch.empty(B * Hq * splits * 3, dtype=torch.float32, device=device)
        counters = _arrival_counters(device, B * Hkv)
    else:  # one split writes the output directly and never touches the workspace
        ws_o = ws_stat = counters = cache_seqlens
    args = (_ptr(q, dtype, elem), _ptr(r, dtype, elem), _ptr(k_cache, dtype, 16),
            _ptr(v_cache, dtype, 16), _ptr(cache_seqlens, Int32, 4), _ptr(out, dtype, elem),
            _ptr(ws_o, Float32, 4), _ptr(ws_stat, Float32, 4), _ptr(counters, Int32, 4),
            Int32(B), Int32(Lmax), Int32(Hkv),
            Int64(k_cache.stride(0)), Int32(k_cache.stride(1)), Int32(k_cache.stride(2)),
            Int64(v_cache.stride(0)), Int32(v_cache.stride(1)), Int32(v_cache.stride(2)),
            Int32(splits), Int32(min(window or Lmax, Lmax)), Float32(scale * LOG2_E),
            cuda.CUstream(torch.cuda.current_stream(device).cuda_stream))
    key = (q.dtype, D, group, num_warps, num_stages, device)
    fn = _compiled.get(key)
    if fn is None:
        kernel = ParallaxDecodeSm90(dtype, D, group, num_warps, num_stages)
        fn = _compiled[key] = cute.compile(kernel, *args)
    fn(*args)
    return out
