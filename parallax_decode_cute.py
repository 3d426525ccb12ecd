"""Parallax single-query decode over a KV cache: a CuTe DSL kernel for Hopper (SM90).

A leaf module (it imports only torch and the CuTe DSL); `parallax_decode.py` validates inputs and
dispatches here. One CTA works on one (batch row, KV head, KV split) with one or two
warpgroups, each an independent pipeline over its share (every other tile) of the split's 64-key
tiles:

- the warpgroup's warp 0 streams its K and V tiles into shared memory with TMA, through an
  mbarrier pipeline (two stages per warpgroup and one CTA per SM with two warpgroups; three
  stages and two CTAs per SM with one, for batches with more (row, KV head) pairs than SMs);
- the warpgroup runs both products as warpgroup MMAs (WGMMA m64nNk16) with the A operand in
  registers: [S; U] = [Q; R] K^T, then [O1; O2] += [P; P*U] V. The 64 tile rows are [q heads;
  r heads] of the KV head's query group (8 + 8 rows, so a thread holds the score s and the
  probe u = r.k of the same (head, key)): warp 0 feeds P and P*U rounded to bf16/fp16, warp 1
  holds the same rows and feeds the rounding remainders (o = (O1/d1)(1 + d2/d1) - O2/d1 cancels
  large terms, so one rounding of P*U alone costs ~1% at short cache lengths), warps 2 and 3
  feed zeros. The online softmax state m, d1 = sum e^(s-m), d2 = sum e^(s-m) u lives in
  registers, per row;
- the splits of a (row, KV head) form one thread-block cluster: every CTA leaves its warpgroups'
  partial states in shared memory, and after a cluster barrier each CTA merges a slice of the
  outputs from all of them through distributed shared memory. A decode step is one launch,
  with no workspace and no global atomics.

TMA reads whole tiles, so a tile that straddles the visible range [lo, hi) also brings in keys
past the cache length: their scores are masked to -inf and their probes to 0, and their V rows
are zeroed in shared memory before the second product, so not even NaN garbage there reaches
the output.

cache_seqlens is read on the device, so one compiled variant per (dtype, head dim, head ratio,
split count, warpgroups) serves every cache length, and the launch can be captured in a CUDA
graph and replayed with new lengths. The split count and warpgroups depend only on the batch
size, KV heads and cache capacity. The first call of a variant compiles it (about a second):
make it before capturing.
"""
import torch

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
import cuda.bindings.driver as cuda
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cute.runtime import make_ptr
from cutlass.tensor_utils import LayoutEnum

TILE_KEYS = 64  # keys per pipeline stage
MMA_ROWS = 64  # WGMMA M: rows 0..15 [q heads; r heads] (warp 0), 16..31 the same (warp 1)
MAX_GROUP = 8  # q heads per KV head that fit the 16-row band
WARPGROUP_THREADS = 128
# Shared memory for the stages by warpgroups per CTA. Two warpgroups: one CTA per SM (more
# stages measured no faster, and two CTAs per SM would let the scheduler pack a cluster onto half
# as many SMs, which then cannot pull their share of the bandwidth). One warpgroup, for batches
# with more (row, KV head) pairs than SMs: two CTAs per SM, so all CTAs are resident at once.
STAGE_BYTES = {1: 96 * 1024, 2: 128 * 1024}
MAX_SPLITS = 8  # the portable cluster size (16 measured slower: not every GPC holds 16 CTAs)
O_PAD = 8  # floats of padding per accumulator row in the epilogue, against bank conflicts
LOG2_E = 1.4426950408889634

_TORCH_TO_CUTE = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}


class ParallaxDecodeSm90:
    """The decode kernel for one (dtype, head dim, head ratio, split count, warpgroups per CTA);
    call it through cute.compile."""

    def __init__(self, dtype, head_dim, group, num_splits, warpgroups):
        assert head_dim in (64, 128) and group in (1, 2, 4, 8) and 1 <= num_splits <= MAX_SPLITS
        assert warpgroups in STAGE_BYTES
        self.dtype = dtype
        self.head_dim = head_dim
        self.group = group
        self.num_splits = num_splits
        self.warpgroups = warpgroups
        # stages of all warpgroups together: warpgroup w owns the stages s with s % W == w
        stages = STAGE_BYTES[warpgroups] // (2 * TILE_KEYS * head_dim * (dtype.width // 8))
        self.num_stages = stages // warpgroups * warpgroups

    # ------------------------------------------------------------------------------------------
    # Host side: global tensors from raw pointers, TMA descriptors, layouts and the launch.

    @cute.jit
    def __call__(self, q_ptr: cute.Pointer, r_ptr: cute.Pointer, k_ptr: cute.Pointer,
                 v_ptr: cute.Pointer, lens_ptr: cute.Pointer, out_ptr: cute.Pointer,
                 batch: Int32, max_len: Int32, kv_heads: Int32,
                 k_stride_b: Int64, k_stride_l: Int32, k_stride_h: Int32,
                 v_stride_b: Int64, v_stride_l: Int32, v_stride_h: Int32,
                 window: Int32, scale_log2: Float32, stream: cuda.CUstream):
        D, G, S, T = self.head_dim, self.group, self.num_splits, TILE_KEYS
        q_heads = kv_heads * G
        # q, r and out are contiguous (B, Hq, D); the caches only need unit stride in D and
        # 16-byte strides (TMA), checked by the caller.
        qo_layout = cute.make_layout((batch, q_heads, D), stride=(q_heads * D, D, 1))
        mQ = cute.make_tensor(q_ptr, qo_layout)
        mR = cute.make_tensor(r_ptr, qo_layout)
        mOut = cute.make_tensor(out_ptr, qo_layout)
        # K as (keys, D, head, row) and V transposed as (D, keys, head, row): a K tile is the
        # K-major B operand of the first product, a V tile the D-major B operand of the second.
        mK = cute.make_tensor(k_ptr, cute.make_layout(
            (max_len, D, kv_heads, batch),
            stride=(cute.assume(k_stride_l, divby=8), 1, cute.assume(k_stride_h, divby=8),
                    cute.assume(k_stride_b, divby=8))))
        mVt = cute.make_tensor(v_ptr, cute.make_layout(
            (D, max_len, kv_heads, batch),
            stride=(1, cute.assume(v_stride_l, divby=8), cute.assume(v_stride_h, divby=8),
                    cute.assume(v_stride_b, divby=8))))
        mLens = cute.make_tensor(lens_ptr, cute.make_layout((batch,)))
        mma_qk = sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K,
            Float32, (1, 1, 1), (MMA_ROWS, T), warpgroup.OperandSource.RMEM)
        mma_pv = sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN,
            Float32, (1, 1, 1), (MMA_ROWS, D), warpgroup.OperandSource.RMEM)
        sK_layout = sm90_utils.make_smem_layout_b(
            LayoutEnum.ROW_MAJOR, (MMA_ROWS, T, D), self.dtype, self.num_stages)
        sV_layout = sm90_utils.make_smem_layout_b(
            LayoutEnum.COL_MAJOR, (MMA_ROWS, D, T), self.dtype, self.num_stages)
        tma_k, mK_tma = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mK, cute.slice_(sK_layout, (None, None, 0)), (T, D))
        tma_v, mV_tma = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mVt, cute.slice_(sV_layout, (None, None, 0)),
            (D, T))
        tile_bytes = 2 * T * D * (self.dtype.width // 8)  # K and V of one stage

        @cute.struct
        class SharedStorage:
            barriers: cute.struct.MemRange[Int64, 2 * self.num_stages]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sV_layout)], 1024]
            # (m, d1, d2) per warpgroup and head
            sStat: cute.struct.MemRange[Float32, self.warpgroups * 3 * MAX_GROUP]

        # the epilogue reuses the K stages (and the V stages, of the second warpgroup) for rows
        # 0..31 of the fp32 accumulator
        assert 32 * (D + O_PAD) * 4 <= cute.cosize(sK_layout) * (self.dtype.width // 8)

        self.kernel(mQ, mR, mK_tma, mV_tma, mLens, mOut, window, scale_log2, tma_k, tma_v,
                    sK_layout, sV_layout, mma_qk, mma_pv, tile_bytes, SharedStorage).launch(
            grid=(S, kv_heads, batch), block=(WARPGROUP_THREADS * self.warpgroups, 1, 1),
            cluster=(S, 1, 1), stream=stream)

    # ------------------------------------------------------------------------------------------
    # Device side.

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mR: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
               mLens: cute.Tensor, mOut: cute.Tensor, window: Int32, scale_log2: Float32,
               tma_k: cute.CopyAtom, tma_v: cute.CopyAtom,
               sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
               mma_qk: cute.TiledMma, mma_pv: cute.TiledMma, tile_bytes: cutlass.Constexpr,
               SharedStorage: cutlass.Constexpr):
        D, G, S, T, W = self.head_dim, self.group, self.num_splits, TILE_KEYS, self.warpgroups
        tidx, _, _ = cute.arch.thread_idx()
        split, kv_head, batch_idx = cute.arch.block_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = tidx % 32
        if warp_idx == 0:  # start fetching the descriptors and the length before anything else
            cpasync.prefetch_descriptor(tma_k)
            cpasync.prefetch_descriptor(tma_v)
        cache_len = mLens[batch_idx]

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)  # (T, D, stage)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)  # (D, T, stage)
        sStat = storage.sStat.get_tensor(cute.make_layout(
            (W, 3, MAX_GROUP), stride=(3 * MAX_GROUP, MAX_GROUP, 1)))
        # warpgroup w consumes tiles w, w + W, ... of the split from its own stages; its warp 0
        # arms each stage and issues the TMA loads, each of its 4 warps releases the stage
        kv_pipeline = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.barriers.data_ptr(), num_stages=self.num_stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 4),
            tx_count=tile_bytes)
        wg = warp_idx // 4
        wg_tidx = tidx % WARPGROUP_THREADS
        wg_warp = warp_idx % 4
        wg_barrier = 1 + wg  # named barrier of this warpgroup (0 is the CTA barrier)

        # ---- which keys this warpgroup reads ----------------------------------------------------
        # Visible keys are [lo, hi); the row's T-key tiles (aligned to multiples of T) are dealt
        # out to splits in contiguous runs, and inside a split round-robin to warpgroups.
        max_len = mK.shape[0]
        hi = cutlass.min(cache_len, max_len)
        lo = cutlass.max(hi - window, 0)
        first_tile = lo // T
        num_tiles = cutlass.max((hi + T - 1) // T - first_tile, 0)
        tiles_per_split = (num_tiles + S - 1) // S
        split_first = first_tile + split * tiles_per_split
        split_tiles = cutlass.max(
            cutlass.min(tiles_per_split, num_tiles - split * tiles_per_split), 0)
        wg_tiles = cutlass.max(split_tiles - wg + W - 1, 0) // W
        wg_stages = self.num_stages // W

        # ---- TMA partitions; the first stages are filled before anything else -----------------
        gK = cute.local_tile(mK[None, None, kv_head, batch_idx], (T, D), (None, 0))
        gV = cute.local_tile(mV[None, None, kv_head, batch_idx], (D, T), (0, None))
        tKsK, tKgK = cpasync.tma_partition(tma_k, 0, cute.make_layout(1),
                                           cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2))
        tVsV, tVgV = cpasync.tma_partition(tma_v, 0, cute.make_layout(1),
                                           cute.group_modes(sV, 0, 2), cute.group_modes(gV, 0, 2))
        write = pipeline.PipelineState(self.num_stages, wg, wg, Int32(1))
        if wg_warp == 0:
            for i in cutlass.range(cutlass.min(wg_tiles, wg_stages), unroll=1):
                self.load_tile(kv_pipeline, write, tma_k, tma_v, tKgK, tKsK, tVgV, tVsV,
                               split_first + wg + i * W)
                for _ in cutlass.range_constexpr(W):  # on to this warpgroup's next stage
                    write.advance()
        thr_qk = mma_qk.get_slice(wg_tidx)
        thr_pv = mma_pv.get_slice(wg_tidx)

        # [q heads; r heads] of this KV head in the A registers of warps 0 and 1; zeros elsewhere
        # (and for absent heads). Built in the accumulator layout of a (64, D) product, which
        # is also the A layout of D/16 k-steps.
        rQR = cute.make_rmem_tensor(thr_pv.partition_shape_C((MMA_ROWS, D)), self.dtype)
        cQR = thr_pv.partition_C(cute.make_identity_tensor((MMA_ROWS, D)))
        for i in cutlass.range_constexpr(cute.size(rQR)):
            row, col = cQR[i]
            head = row % MAX_GROUP
            q_head = kv_head * G + cutlass.min(head, G - 1)
            value = mQ[batch_idx, q_head, col] if row % 16 < MAX_GROUP else mR[batch_idx, q_head,
                                                                             col]
            rQR[i] = value if (row < 32) & (head < G) else self.dtype(0)
        tSrQR = _acc_as_operand_a(rQR, mma_qk)

        tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK))  # (MMA, N, K, stage)
        tOrV = thr_pv.make_fragment_B(thr_pv.partition_B(sV))
        acc_O = cute.make_rmem_tensor(thr_pv.partition_shape_C((MMA_ROWS, D)), Float32)
        acc_O.fill(0.0)
        acc_O_mn = _mn_view(acc_O)
        acc_S = cute.make_rmem_tensor(thr_qk.partition_shape_C((MMA_ROWS, T)), Float32)
        acc_S_mn = _mn_view(acc_S)
        tScS_mn = _mn_view(thr_qk.partition_C(cute.make_identity_tensor((MMA_ROWS, T))))
        rP = cute.make_rmem_tensor(acc_S.layout, self.dtype)
        tOrP = _acc_as_operand_a(rP, mma_pv)
        mma_pv.set(warpgroup.Field.ACCUMULATE, True)
        # this thread's softmax state for head lane // 4: running max (log2 units), d1, d2
        state = cute.make_rmem_tensor((3,), Float32)
        state[0] = -Float32.inf
        state[1] = 0.0
        state[2] = 0.0

        read = pipeline.PipelineState(self.num_stages, wg, wg, Int32(0))
        for i in cutlass.range(wg_tiles, unroll=1):
            kv_pipeline.consumer_wait(read)
            stage = read.index
            key0 = (split_first + wg + i * W) * T
            straddles = (key0 < lo) | (key0 + T > hi)
            if straddles:
                # zero the V rows of keys outside [lo, hi)
                for j in cutlass.range_constexpr(T * D // WARPGROUP_THREADS):
                    idx = j * WARPGROUP_THREADS + wg_tidx
                    key = key0 + idx // D
                    if (key < lo) | (key >= hi):
                        sV[idx % D, idx // D, stage] = self.dtype(0)
                cute.arch.fence_proxy("async.shared", space="cta")
                cute.arch.barrier(barrier_id=wg_barrier, number_of_threads=WARPGROUP_THREADS)

            # [S; U] = [Q; R] K^T
            warpgroup.fence()
            for k in cutlass.range_constexpr(cute.size(tSrQR, mode=[2])):
                mma_qk.set(warpgroup.Field.ACCUMULATE, k != 0)
                cute.gemm(mma_qk, acc_S, tSrQR[None, None, k], tSrK[None, None, k, stage], acc_S)
            warpgroup.commit_group()
            warpgroup.wait_group(0)

            # online softmax on row 0 (s of head lane // 4) weighting row 1 (u of that head)
            num_cols = cute.size(acc_S_mn, mode=[1])
            if straddles:
                for c in cutlass.range_constexpr(num_cols):
                    key = key0 + tScS_mn[0, c][1]
                    visible = (key >= lo) & (key < hi)
                    acc_S_mn[0, c] = acc_S_mn[0, c] if visible else -Float32.inf
                    acc_S_mn[1, c] = acc_S_mn[1, c] if visible else Float32(0.0)
            tile_max = -Float32.inf
            for c in cutlass.range_constexpr(num_cols):
                tile_max = cute.arch.fmax(tile_max, acc_S_mn[0, c])
            tile_max = _quad_allreduce(tile_max, cute.arch.fmax) * scale_log2
            m_new = cute.arch.fmax(state[0], tile_max)
            m_safe = Float32(0.0) if m_new == -Float32.inf else m_new
            alpha = cute.math.exp2(state[0] - m_safe, fastmath=True)
            d1 = Float32(0.0)
            d2 = Float32(0.0)
            for c in cutlass.range_constexpr(num_cols):
                p = cute.math.exp2(acc_S_mn[0, c] * scale_log2 - m_safe, fastmath=True)
                pu = p * acc_S_mn[1, c]
                d1 += p
                d2 += pu
                acc_S_mn[0, c] = p
                acc_S_mn[1, c] = pu
            state[0] = m_new
            state[1] = state[1] * alpha + d1
            state[2] = state[2] * alpha + d2
            if wg_warp < 2:  # warps 2 and 3 accumulate nothing worth rescaling
                for c in cutlass.range_constexpr(cute.size(acc_O_mn, mode=[1])):
                    acc_O_mn[0, c] = acc_O_mn[0, c] * alpha
                    acc_O_mn[1, c] = acc_O_mn[1, c] * alpha

            # [O1; O2] += [P; P*U] V: warp 0 feeds the 16-bit rounding, warp 1 the remainder
            p_all = acc_S.load()
            p_hi = p_all.to(self.dtype)
            if wg_warp == 0:
                rP.store(p_hi)
            elif wg_warp == 1:
                rP.store((p_all - p_hi.to(Float32)).to(self.dtype))
            else:
                rP.fill(0.0)
            warpgroup.fence()
            for k in cutlass.range_constexpr(cute.size(tOrP, mode=[2])):
                cute.gemm(mma_pv, acc_O, tOrP[None, None, k], tOrV[None, None, k, stage], acc_O)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            kv_pipeline.consumer_release(read)
            for _ in cutlass.range_constexpr(W):
                read.advance()
            if wg_warp == 0 and i + wg_stages < wg_tiles:
                self.load_tile(kv_pipeline, write, tma_k, tma_v, tKgK, tKsK, tVgV, tVsV,
                               split_first + wg + (i + wg_stages) * W)
                for _ in cutlass.range_constexpr(W):
                    write.advance()

        # ---- epilogue: each warpgroup's partial state -> shared memory --------------------------
        # rows 0..15 of the accumulator (warp 0) plus their remainders 16..31 (warp 1), padded by
        # O_PAD floats per row against bank conflicts; warpgroup 0's in the K stages, 1's in V's
        state[1] = _quad_allreduce(state[1], _add)
        state[2] = _quad_allreduce(state[2], _add)
        cute.arch.barrier()  # every warpgroup is done reading the stages
        o_layout = cute.make_layout((MMA_ROWS, D), stride=(D + O_PAD, 1))
        sO = (cute.make_tensor(cute.recast_ptr(sK.iterator, dtype=Float32), o_layout),
              cute.make_tensor(cute.recast_ptr(sV.iterator, dtype=Float32), o_layout))
        if wg_warp < 2:
            if wg == 0:
                thr_pv.partition_C(sO[0]).store(acc_O.load())
            else:
                thr_pv.partition_C(sO[1]).store(acc_O.load())
        if wg_warp == 0 and lane % 4 == 0:
            for j in cutlass.range_constexpr(3):
                sStat[wg, j, lane // 4] = state[j]
        cute.arch.barrier()

        # ---- merge the partial states of every warpgroup of every split ------------------------
        # The splits of a (row, KV head) form one cluster; with several, each CTA merges a slice
        # of the outputs, reading the other CTAs' shared memory (DSMEM).
        threads = WARPGROUP_THREADS * W
        slice_size = (G * D + S - 1) // S
        if cutlass.const_expr(S > 1):
            cute.arch.cluster_arrive()  # release: this CTA's partial states are complete
            cute.arch.cluster_wait()
        for j in cutlass.range_constexpr((slice_size + threads - 1) // threads):
            idx = split * slice_size + j * threads + tidx
            if (j * threads + tidx < slice_size) & (idx < G * D):
                head, col = idx // D, idx % D
                merged = (-Float32.inf, Float32(0.0), Float32(0.0), Float32(0.0), Float32(0.0))
                for peer in cutlass.range_constexpr(S):
                    for w in cutlass.range_constexpr(W):
                        o_ptr = sO[w].iterator
                        stat_ptr = sStat.iterator + w * 3 * MAX_GROUP
                        if cutlass.const_expr(S > 1):
                            o_ptr = cute.arch.map_dsmem_ptr(o_ptr, peer)
                            stat_ptr = cute.arch.map_dsmem_ptr(stat_ptr, peer)
                        merged = _merge(merged, _partial_state(o_ptr, stat_ptr, head, col,
                                                               D + O_PAD))
                _, d1, d2, o1, o2 = merged
                mOut[batch_idx, kv_head * G + head, col] = _finalize(d1, d2, o1, o2).to(
                    self.dtype)
        if cutlass.const_expr(S > 1):  # keep this CTA's shared memory alive until every peer has read it
            cute.arch.cluster_arrive_relaxed()
            cute.arch.cluster_wait()

    @cute.jit
    def load_tile(self, kv_pipeline: pipeline.PipelineTmaAsync, write: pipeline.PipelineState,
                  tma_k: cute.CopyAtom, tma_v: cute.CopyAtom, tKgK: cute.Tensor, tKsK: cute.Tensor,
                  tVgV: cute.Tensor, tVsV: cute.Tensor, tile: Int32):
        """A warpgroup's warp 0: wait until stage `write` is free, arm its barrier, TMA K and V
        tile `tile` into it."""
        kv_pipeline.producer_acquire(write)
        barrier = kv_pipeline.producer_get_barrier(write)
        cute.copy(tma_k, tKgK[None, tile], tKsK[None, write.index], tma_bar_ptr=barrier)
        cute.copy(tma_v, tVgV[None, tile], tVsV[None, write.index], tma_bar_ptr=barrier)


# ----------------------------------------------------------------------------------------------
# Device helpers (traced inline into the kernel)


def _add(a, b):
    return a + b


def _quad_allreduce(value, op):
    """Reduce over the 4 lanes that share an accumulator row (lanes 4r .. 4r + 3)."""
    value = op(value, cute.arch.shuffle_sync_bfly(value, offset=2))
    return op(value, cute.arch.shuffle_sync_bfly(value, offset=1))


def _mn_view(acc):
    """View an m64nN WGMMA accumulator fragment ((2 cols, 2 rows, N/8), 1, 1) as (rows, cols):
    row 0 is row lane // 4 of the warp's 16-row band, row 1 is row lane // 4 + 8."""
    shape, stride = acc.layout.shape[0], cute.make_layout(acc.layout.shape).stride[0]
    mn = cute.make_layout(((shape[1]), (shape[0], shape[2])),
                          stride=((stride[1]), (stride[0], stride[2])))
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))


def _acc_as_operand_a(frag, tiled_mma):
    """Reuse an m64nN accumulator fragment ((2, 2, N/8), 1, 1) as the register A operand of N/16
    k16 WGMMAs of `tiled_mma` (the register layouts coincide: FlashAttention-3's trick)."""
    (cols, rows, groups), (s_cols, s_rows, s_groups) = frag.layout.shape[0], frag.layout.stride[0]
    value_shape = tiled_mma.tv_layout_A.shape[1]
    assert cute.size(value_shape) == 2 * cols * rows
    layout = cute.make_layout(((cols, rows, 2), 1, groups // 2),
                              stride=((s_cols, s_rows, s_groups), 0, 2 * s_groups))
    return cute.make_tensor(frag.iterator, layout)


@cute.jit
def _partial_state(o_ptr: cute.Pointer, stat_ptr: cute.Pointer, head: Int32, col: Int32,
                   row_stride: cutlass.Constexpr):
    """One CTA's (m, d1, d2, O1, O2) of (head, column), read through pointers so that a peer's
    shared memory (DSMEM) reads the same way: the (32, D) fp32 accumulator rows hold the 16-bit
    part of P (and P*U) in rows 0..15 and the remainder's in rows 16..31; stat is (3, 8)."""
    def o(row):
        return (o_ptr + row * row_stride + col).load()
    o1 = o(head) + o(16 + head)
    o2 = o(MAX_GROUP + head) + o(16 + MAX_GROUP + head)
    return ((stat_ptr + head).load(), (stat_ptr + MAX_GROUP + head).load(),
            (stat_ptr + 2 * MAX_GROUP + head).load(), o1, o2)


@cute.jit
def _merge(a, b):
    """Combine two online-softmax partial states (m, d1, d2, O1, O2) of one (head, column): the
    sums are rescaled by 2^(m_i - m) to the larger maximum m."""
    m = cute.arch.fmax(a[0], b[0])
    m_safe = Float32(0.0) if m == -Float32.inf else m
    wa = cute.math.exp2(a[0] - m_safe, fastmath=True)
    wb = cute.math.exp2(b[0] - m_safe, fastmath=True)
    return (m, a[1] * wa + b[1] * wb, a[2] * wa + b[2] * wb, a[3] * wa + b[3] * wb,
            a[4] * wa + b[4] * wb)


@cute.jit
def _finalize(d1: Float32, d2: Float32, o1: Float32, o2: Float32):
    """o = (O1/d1)(1 + d2/d1) - O2/d1; a row with no visible key gives 0."""
    inv = Float32(1.0) / d1 if d1 > Float32(0.0) else Float32(0.0)
    return o1 * inv * (1.0 + d2 * inv) - o2 * inv


# ----------------------------------------------------------------------------------------------
# Python entry point


_compiled = {}


def num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch, kv_heads, max_len, device):
    """About one CTA per SM, no more splits than tiles of the cache and than a portable cluster
    holds: a function of the shape class only, never of the lengths."""
    tiles = -(-max_len // TILE_KEYS)
    return max(1, min(num_sms(device) // (batch * kv_heads), tiles, MAX_SPLITS))


def choose_warpgroups(batch, kv_heads, device):
    """Two warpgroups per CTA (one CTA per SM) unless there are more (row, KV head) pairs than
    SMs: then one, so that two CTAs share an SM and every CTA is resident from the start."""
    return 1 if batch * kv_heads > num_sms(device) else 2


def _ptr(t, dtype, align):
    return make_ptr(dtype, t.data_ptr(), cute.AddressSpace.gmem, assumed_align=align)


def parallax_decode_cute(q, r, k_cache, v_cache, cache_seqlens, window, scale, out, num_splits=None,
                         warpgroups=None):
    """Launch the SM90 kernel. The caller has validated the inputs: q, r and out contiguous
    (B, 1, Hq, D); caches (B, Lmax, Hkv, D) with unit stride in D, 16-byte aligned base
    pointers and strides; cache_seqlens int32 (B,). num_splits (1..8) and warpgroups (1, 2)
    override choose_num_splits and choose_warpgroups; each value compiles its own variant."""
    B, _, Hq, D = q.shape
    Lmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    device = q.device
    splits = num_splits or choose_num_splits(B, Hkv, Lmax, device)
    warpgroups = warpgroups or choose_warpgroups(B, Hkv, device)
    dtype = _TORCH_TO_CUTE[q.dtype]
    elem = q.element_size()
    args = (_ptr(q, dtype, elem), _ptr(r, dtype, elem), _ptr(k_cache, dtype, 16),
            _ptr(v_cache, dtype, 16), _ptr(cache_seqlens, Int32, 4), _ptr(out, dtype, elem),
            Int32(B), Int32(Lmax), Int32(Hkv),
            Int64(k_cache.stride(0)), Int32(k_cache.stride(1)), Int32(k_cache.stride(2)),
            Int64(v_cache.stride(0)), Int32(v_cache.stride(1)), Int32(v_cache.stride(2)),
            Int32(min(window or Lmax, Lmax)), Float32(scale * LOG2_E),
            cuda.CUstream(torch.cuda.current_stream(device).cuda_stream))
    key = (q.dtype, D, group, splits, warpgroups, device)
    fn = _compiled.get(key)
    if fn is None:
        kernel = ParallaxDecodeSm90(dtype, D, group, splits, warpgroups)
        fn = _compiled[key] = cute.compile(kernel, *args)
    fn(*args)
    return out
