"""Parallax single-query decode over a KV cache: a CuTe DSL kernel for Hopper (SM90).

It imports only torch, the CuTe DSL and parallax_reference.py; `parallax_decode.py` validates
inputs and dispatches here. One CTA works on one (batch row, KV head or pair of KV heads, KV split) with
one or two warpgroups, each an independent pipeline over its share (every other tile) of the
split's 64-row tiles:

- a tile holds 64 keys of one KV head or, with paired heads, 32 keys of two adjacent KV heads
  with their rows interleaved: a tile's TMA loads then read a key's rows of both heads
  together, 512 contiguous bytes of the (B, L, H, D) cache instead of 256, which pays where
  decode streams from DRAM. The pair's q heads take the columns of one group
  of twice the size, and a row's scores against the other head's q are masked;
- the warpgroup's warp 0 streams its K and V tiles into shared memory with TMA, through an
  mbarrier pipeline (at D = 128: two stages per warpgroup, and one CTA per SM with two
  warpgroups or up to three with one, when a split's CTAs outnumber the SMs);
- the warpgroup runs both products as warpgroup MMAs (WGMMA) with the keys on the MMA's M and
  the query group on its narrow N, both operands from shared memory: S^T = K [Q; R]^T gives
  the score s = q.k and the probe u = r.k of every (key, head) in one m64n8 (up to 4 heads) or
  m64n16 accumulator: 5x (up to 4 heads) to 2.7x (8 heads) less tensor work per tile than
  with the group on M, where a decode fills a few of the 64 rows. The tile maximum of each
  head is exchanged between the 4 warps through shared memory;
  each thread then writes P and P*U of its keys into a P^T buffer, rounded to bf16/fp16 and
  again as the rounding remainders (o = (O1/d1)(1 + d2/d1) - O2/d1 cancels large terms, so one
  rounding of P*U alone costs ~1% at short cache lengths), and O^T += V^T P^T accumulates
  [O1 O2] of every head on the head dimension (M) in a few registers per thread. The online
  softmax state m, d1 = sum e^(s-m), d2 = sum e^(s-m) u lives in registers;
- the splits of a (row, KV head or pair) form one thread-block cluster, and each split merges
  a slice of the outputs: every CTA merges its warpgroups' partial states per output element
  and pushes them into the shared memory of the split that owns the element (asynchronous
  distributed shared memory stores, st.async, whose bytes complete a transaction count on that
  CTA's mbarrier: no fence on either side, cheaper than plain stores with a cluster-scope
  release arrival and acquire fence), so a CTA waits only for the pushes it
  needs and the kernel ends without a cluster-wide barrier. A decode step is one launch, with
  no workspace and no global atomics.

TMA reads whole tiles, so a tile that straddles the visible range [lo, hi) also brings in keys
past the cache length: their scores are masked to -inf and their probes to 0, and their V rows
are zeroed in shared memory before the second product, so not even NaN garbage there reaches
the output.

cache_seqlens is read on the device, so one compiled variant per (dtype, head dim, head ratio,
split count, warpgroups, pairing) serves every cache length, and the launch can be captured in
a CUDA graph and replayed with new lengths. The split count, warpgroups and pairing depend only
on the batch size, heads and cache capacity. The first call of a variant compiles it (about a
second): make it before capturing.
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

from parallax_reference import choose_num_splits, num_sms

TILE_ROWS = 64  # K/V rows per pipeline stage: 64 keys, or 32 keys of two paired KV heads
MAX_GROUP = 8  # q heads per KV head
WARPGROUP_THREADS = 128
# Shared memory for the stages by warpgroups per CTA. Two warpgroups: one CTA per SM (two CTAs
# per SM would let the scheduler pack a cluster onto half as many SMs, which then cannot pull
# their share of the bandwidth). One warpgroup, when a split's CTAs outnumber the SMs: up to
# three CTAs per SM, so all CTAs are resident at once and every SM gets some (two stages of 64
# rows at D = 128). Stage counts were chosen by timing (README).
STAGE_BYTES = {1: 64 * 1024, 2: 128 * 1024}
# The portable cluster size. 16 CTAs per (row, KV head) were slower both as one cluster (not
# every GPC holds 16) and as two clusters joined through global memory (README).
MAX_SPLITS = 8
O_PAD = 4  # floats of padding per accumulator column in the epilogue, against bank conflicts
STAT_ROWS = 9  # per warpgroup and head: m, then d1 of each of the 4 warps, then d2 of each
LOG2_E = 1.4426950408889634

_TORCH_TO_CUTE = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}


class ParallaxDecodeSm90:
    """The decode kernel for one (dtype, head dim, head ratio, split count, warpgroups per CTA,
    paired KV heads); call it through cute.compile."""

    def __init__(self, dtype, head_dim, group, num_splits, warpgroups, paired):
        assert head_dim in (64, 128) and group in (1, 2, 4, 8) and 1 <= num_splits <= MAX_SPLITS
        assert warpgroups in STAGE_BYTES and not (paired and group > MAX_GROUP // 2)
        self.dtype = dtype
        self.head_dim = head_dim
        self.kv_per_cta = 2 if paired else 1
        self.kv_group = group  # q heads per KV head
        self.group = group * self.kv_per_cta  # q heads per CTA
        self.num_splits = num_splits
        self.warpgroups = warpgroups
        # column blocks of 8: a score block holds (q, r) of 4 heads; the output holds the
        # blocks of P and P*U rounded to 16 bits, then those of the rounding remainders
        self.head_blocks = (self.group + 3) // 4
        self.score_cols = 8 * self.head_blocks
        self.out_cols = 2 * self.score_cols
        self.slice_size = (self.group * head_dim + num_splits - 1) // num_splits  # per split
        # stages of all warpgroups together: warpgroup w owns the stages s with s % W == w
        stages = STAGE_BYTES[warpgroups] // (2 * TILE_ROWS * head_dim * (dtype.width // 8))
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
        D, S, T, HP = self.head_dim, self.num_splits, TILE_ROWS, self.kv_per_cta
        NS, NO = self.score_cols, self.out_cols
        q_heads = kv_heads * self.kv_group
        # q, r and out are contiguous (B, Hq, D); the caches only need unit stride in D and
        # 16-byte strides (TMA), checked by the caller.
        qo_layout = cute.make_layout((batch, q_heads, D), stride=(q_heads * D, D, 1))
        mQ = cute.make_tensor(q_ptr, qo_layout)
        mR = cute.make_tensor(r_ptr, qo_layout)
        mOut = cute.make_tensor(out_ptr, qo_layout)
        # K as (rows, D, CTA head, row) and V transposed as (D, rows, CTA head, row): a K tile is
        # the K-major A operand of the first product, a V tile the D-major A operand of the
        # second. Rows are keys, or (head of the pair, key) with the head inner.
        def rows_of(stride_l, stride_h):
            stride_l = cute.assume(stride_l, divby=8)
            if cutlass.const_expr(HP == 1):
                return max_len, stride_l
            return (HP, max_len), (cute.assume(stride_h, divby=8), stride_l)
        k_rows, k_row_stride = rows_of(k_stride_l, k_stride_h)
        v_rows, v_row_stride = rows_of(v_stride_l, v_stride_h)
        mK = cute.make_tensor(k_ptr, cute.make_layout(
            (k_rows, D, kv_heads // HP, batch),
            stride=(k_row_stride, 1, cute.assume(k_stride_h * HP, divby=8),
                    cute.assume(k_stride_b, divby=8))))
        mVt = cute.make_tensor(v_ptr, cute.make_layout(
            (D, v_rows, kv_heads // HP, batch),
            stride=(1, v_row_stride, cute.assume(v_stride_h * HP, divby=8),
                    cute.assume(v_stride_b, divby=8))))
        mLens = cute.make_tensor(lens_ptr, cute.make_layout((batch,)))
        K_MAJOR, MN_MAJOR = cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN
        # S^T = K [Q; R]^T: keys on the MMA's M, the (q, r) columns of the group on N
        mma_s = sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, K_MAJOR, K_MAJOR, Float32, (1, 1, 1), (T, NS))
        # O^T += V^T P^T: head dimension on M (D / 64 m64 tiles), keys on K
        mma_o = sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, MN_MAJOR, K_MAJOR, Float32, (1, 1, 1), (64, NO))
        sK_layout = sm90_utils.make_smem_layout_a(
            LayoutEnum.ROW_MAJOR, (T, NS, D), self.dtype, self.num_stages)
        sV_layout = sm90_utils.make_smem_layout_a(
            LayoutEnum.COL_MAJOR, (D, NO, T), self.dtype, self.num_stages)
        sQR_layout = sm90_utils.make_smem_layout_b(
            LayoutEnum.ROW_MAJOR, (T, NS, D), self.dtype, 1)
        sP_layout = sm90_utils.make_smem_layout_b(  # one P^T buffer per warpgroup
            LayoutEnum.ROW_MAJOR, (D, NO, T), self.dtype, self.warpgroups)
        tma_k, mK_tma = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mK, cute.slice_(sK_layout, (None, None, 0)), (T, D))
        tma_v, mV_tma = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mVt, cute.slice_(sV_layout, (None, None, 0)),
            (D, T))
        tile_bytes = 2 * T * D * (self.dtype.width // 8)  # K and V of one stage
        slice_size = self.slice_size

        @cute.struct
        class SharedStorage:
            barriers: cute.struct.MemRange[Int64, 2 * self.num_stages]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sV_layout)], 1024]
            sQR: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sQR_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sP_layout)], 1024]
            # per warpgroup: the tile maximum of each warp and head; m, and d1 and d2 of each
            # warp, of each head
            sMax: cute.struct.MemRange[Float32, self.warpgroups * 4 * MAX_GROUP]
            sStat: cute.struct.MemRange[Float32, self.warpgroups * STAT_ROWS * MAX_GROUP]
            # the split's slice of the outputs as every split's partial state (m, d1, d2, O1, O2)
            # per element, pushed by the CTAs of the cluster, and the barrier counting its bytes
            sMerge: cute.struct.MemRange[Float32, S * 5 * slice_size if S > 1 else 1]
            merge_barrier: cute.struct.MemRange[Int64, 1]

        # the epilogue reuses the K stages for the fp32 accumulators O^T of the warpgroups
        assert self.warpgroups * NO * (D + O_PAD) * 4 <= cute.cosize(sK_layout) * (
            self.dtype.width // 8)

        self.kernel(mQ, mR, mK_tma, mV_tma, mLens, mOut, window, scale_log2, tma_k, tma_v,
                    sK_layout, sV_layout, sQR_layout, sP_layout, mma_s, mma_o, tile_bytes,
                    SharedStorage).launch(
            grid=(S, kv_heads // HP, batch), block=(WARPGROUP_THREADS * self.warpgroups, 1, 1),
            cluster=(S, 1, 1), stream=stream)

    # ------------------------------------------------------------------------------------------
    # Device side.

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mR: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
               mLens: cute.Tensor, mOut: cute.Tensor, window: Int32, scale_log2: Float32,
               tma_k: cute.CopyAtom, tma_v: cute.CopyAtom,
               sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
               sQR_layout: cute.ComposedLayout, sP_layout: cute.ComposedLayout,
               mma_s: cute.TiledMma, mma_o: cute.TiledMma, tile_bytes: cutlass.Constexpr,
               SharedStorage: cutlass.Constexpr):
        D, G, S, T, W = self.head_dim, self.group, self.num_splits, TILE_ROWS, self.warpgroups
        HP = self.kv_per_cta
        TK = T // HP  # keys per tile
        HB, NS, NO = self.head_blocks, self.score_cols, self.out_cols
        threads = WARPGROUP_THREADS * W
        tidx, _, _ = cute.arch.thread_idx()
        split, cta_head, batch_idx = cute.arch.block_idx()  # cta_head: KV head, or pair
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
        sQR = storage.sQR.get_tensor(sQR_layout.outer, swizzle=sQR_layout.inner)  # (NS, D, 1)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)  # (NO, T, W)
        sMax = storage.sMax.get_tensor(cute.make_layout(
            (W, 4, MAX_GROUP), stride=(4 * MAX_GROUP, MAX_GROUP, 1)))
        sStat = storage.sStat.get_tensor(cute.make_layout(
            (W, STAT_ROWS, MAX_GROUP), stride=(STAT_ROWS * MAX_GROUP, MAX_GROUP, 1)))
        # The merge barrier completes when every split has pushed its partial state of each
        # element of this split's slice: one arrival, here, that expects all their bytes.
        slice_size = self.slice_size
        merge_barrier = storage.merge_barrier.data_ptr()
        if cutlass.const_expr(S > 1):
            if tidx == 0:
                slice_elements = cutlass.min(slice_size, G * D - split * slice_size)
                cute.arch.mbarrier_init(merge_barrier, 1)
                cute.arch.mbarrier_arrive_and_expect_tx(  # 5 fp32 per element and split
                    merge_barrier, S * slice_elements * 5 * (Float32.width // 8))
        # warpgroup w consumes tiles w, w + W, ... of the split from its own stages; its warp 0
        # arms each stage and issues the TMA loads, each of its 4 warps releases the stage
        kv_pipeline = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.barriers.data_ptr(), num_stages=self.num_stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 4),
            tx_count=tile_bytes)
        if cutlass.const_expr(S > 1):  # the merge barriers are initialized cluster-wide before
            cute.arch.cluster_arrive_relaxed()  # the first push (cluster_wait in the epilogue)
        wg = warp_idx // 4
        wg_tidx = tidx % WARPGROUP_THREADS
        wg_warp = warp_idx % 4
        wg_barrier = 1 + wg  # named barrier of this warpgroup (0 is the CTA barrier)
        # In both accumulators this thread holds the column pairs (2t, 2t + 1) of every block
        # of 8: the (s, u) of heads t, t + 4 and the (O1, O2) columns of the same heads.
        col_pair = lane % 4

        # ---- which keys this warpgroup reads ----------------------------------------------------
        # Visible keys are [lo, hi); the row's TK-key tiles (aligned to multiples of TK) are
        # dealt out to splits in contiguous runs, and inside a split round-robin to warpgroups.
        max_len = mK.shape[0][1] if cutlass.const_expr(HP > 1) else mK.shape[0]
        hi = cutlass.min(cache_len, max_len)
        lo = cutlass.max(hi - window, 0)
        first_tile = lo // TK
        num_tiles = cutlass.max((hi + TK - 1) // TK - first_tile, 0)
        tiles_per_split = (num_tiles + S - 1) // S
        split_first = first_tile + split * tiles_per_split
        split_tiles = cutlass.max(
            cutlass.min(tiles_per_split, num_tiles - split * tiles_per_split), 0)
        wg_tiles = cutlass.max(split_tiles - wg + W - 1, 0) // W
        wg_stages = self.num_stages // W

        # ---- TMA partitions; the first stages are filled before anything else -----------------
        gK = cute.local_tile(mK[None, None, cta_head, batch_idx], (T, D), (None, 0))
        gV = cute.local_tile(mV[None, None, cta_head, batch_idx], (D, T), (0, None))
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

        # [Q; R]: column 8j + 2t is q of head 4j + t, column 8j + 2t + 1 its r (zeros for
        # heads past the group)
        for i in cutlass.range_constexpr((NS * D + threads - 1) // threads):
            idx = i * threads + tidx
            if idx < NS * D:
                col, d = idx // D, idx % D
                head = 4 * (col // 8) + (col % 8) // 2
                q_head = cta_head * G + cutlass.min(head, G - 1)
                value = mR[batch_idx, q_head, d] if col % 2 == 1 else mQ[batch_idx, q_head, d]
                sQR[col, d, 0] = value if head < G else self.dtype(0)
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.barrier()

        thr_s = mma_s.get_slice(wg_tidx)
        thr_o = mma_o.get_slice(wg_tidx)
        tSrK = thr_s.make_fragment_A(thr_s.partition_A(sK))  # (MMA, M, K, stage)
        tSrQR = thr_s.make_fragment_B(thr_s.partition_B(sQR))
        tOrV = thr_o.make_fragment_A(thr_o.partition_A(sV))
        tOrP = thr_o.make_fragment_B(thr_o.partition_B(sP))
        acc_S = cute.make_rmem_tensor(thr_s.partition_shape_C((T, NS)), Float32)
        acc_S_mn = _mn_view(acc_S)  # (2 keys, (s, u) x head block)
        tScS_mn = _mn_view(thr_s.partition_C(cute.make_identity_tensor((T, NS))))
        acc_O = cute.make_rmem_tensor(thr_o.partition_shape_C((D, NO)), Float32)
        acc_O.fill(0.0)
        mma_o.set(warpgroup.Field.ACCUMULATE, True)
        # this thread's softmax state for heads 4j + col_pair: running max (log2 units, the same
        # in every warp), and its own keys' shares of d1 = sum e^(s-m) and d2 = sum e^(s-m) u
        state = cute.make_rmem_tensor((3, HB), Float32)
        for j in cutlass.range_constexpr(HB):
            state[0, j] = -Float32.inf
            state[1, j] = 0.0
            state[2, j] = 0.0
        alpha = cute.make_rmem_tensor((HB,), Float32)

        read = pipeline.PipelineState(self.num_stages, wg, wg, Int32(0))
        for i in cutlass.range(wg_tiles, unroll=1):
            kv_pipeline.consumer_wait(read)
            stage = read.index
            key0 = (split_first + wg + i * W) * TK
            straddles = (key0 < lo) | (key0 + TK > hi)
            if straddles:
                # zero the V rows of keys outside [lo, hi)
                for j in cutlass.range_constexpr(T * D // WARPGROUP_THREADS):
                    idx = j * WARPGROUP_THREADS + wg_tidx
                    key = key0 + idx // D // HP
                    if (key < lo) | (key >= hi):
                        sV[idx % D, idx // D, stage] = self.dtype(0)
                cute.arch.fence_proxy("async.shared", space="cta")

            # S^T = K [Q; R]^T
            warpgroup.fence()
            for k in cutlass.range_constexpr(cute.size(tSrK, mode=[2])):
                mma_s.set(warpgroup.Field.ACCUMULATE, k != 0)
                cute.gemm(mma_s, acc_S, tSrK[None, None, k, stage], tSrQR[None, None, k, 0],
                          acc_S)
            warpgroup.commit_group()
            warpgroup.wait_group(0)

            # tile maximum of each head: over this thread's 2 keys, the warp, then the 4 warps
            if straddles:
                for row in cutlass.range_constexpr(2):
                    key = key0 + tScS_mn[row, 0][0] // HP
                    if (key < lo) | (key >= hi):
                        for c in cutlass.range_constexpr(2 * HB):
                            acc_S_mn[row, c] = -Float32.inf if c % 2 == 0 else Float32(0.0)
            if cutlass.const_expr(HP > 1):  # the scores of a row against the other head's q
                for row in cutlass.range_constexpr(2):
                    for j in cutlass.range_constexpr(HB):
                        if (4 * j + col_pair) // self.kv_group != tScS_mn[row, 0][0] % HP:
                            acc_S_mn[row, 2 * j] = -Float32.inf
                            acc_S_mn[row, 2 * j + 1] = Float32(0.0)
            for j in cutlass.range_constexpr(HB):
                warp_max = _rows_allreduce(
                    cute.arch.fmax(acc_S_mn[0, 2 * j], acc_S_mn[1, 2 * j]), cute.arch.fmax)
                if lane < 4:
                    sMax[wg, wg_warp, 4 * j + col_pair] = warp_max
            cute.arch.barrier(barrier_id=wg_barrier, number_of_threads=WARPGROUP_THREADS)

            # online softmax: P and P*U of this thread's 2 keys into the P^T buffer, as 16-bit
            # values and their rounding remainders
            for j in cutlass.range_constexpr(HB):
                tile_max = cute.arch.fmax(cute.arch.fmax(sMax[wg, 0, 4 * j + col_pair],
                                                         sMax[wg, 1, 4 * j + col_pair]),
                                          cute.arch.fmax(sMax[wg, 2, 4 * j + col_pair],
                                                         sMax[wg, 3, 4 * j + col_pair]))
                m_new = cute.arch.fmax(state[0, j], tile_max * scale_log2)
                m_safe = Float32(0.0) if m_new == -Float32.inf else m_new
                alpha[j] = cute.math.exp2(state[0, j] - m_safe, fastmath=True)
                state[0, j] = m_new
                valid_head = 4 * j + col_pair < G
                d1 = Float32(0.0)
                d2 = Float32(0.0)
                for row in cutlass.range_constexpr(2):
                    key = tScS_mn[row, 0][0]
                    p = cute.math.exp2(acc_S_mn[row, 2 * j] * scale_log2 - m_safe, fastmath=True)
                    p = p if valid_head else Float32(0.0)
                    pu = p * acc_S_mn[row, 2 * j + 1]
                    d1 += p
                    d2 += pu
                    p_hi = p.to(self.dtype)
                    pu_hi = pu.to(self.dtype)
                    col = 8 * j + 2 * col_pair
                    sP[col, key, wg] = p_hi
                    sP[col + 1, key, wg] = pu_hi
                    sP[col + NS, key, wg] = (p - p_hi.to(Float32)).to(self.dtype)
                    sP[col + NS + 1, key, wg] = (pu - pu_hi.to(Float32)).to(self.dtype)
                state[1, j] = state[1, j] * alpha[j] + d1
                state[2, j] = state[2, j] * alpha[j] + d2
            cute.arch.fence_proxy("async.shared", space="cta")
            cute.arch.barrier(barrier_id=wg_barrier, number_of_threads=WARPGROUP_THREADS)

            # O^T = O^T alpha + V^T P^T
            for idx in cutlass.range_constexpr(cute.size(acc_O)):
                acc_O[idx] = acc_O[idx] * alpha[(idx // 4) % HB]
            warpgroup.fence()
            for k in cutlass.range_constexpr(cute.size(tOrV, mode=[2])):
                cute.gemm(mma_o, acc_O, tOrV[None, None, k, stage], tOrP[None, None, k, wg], acc_O)
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
        # O^T as (D, NO, warpgroup) fp32 over the K stages, padded by O_PAD floats per column
        # against bank conflicts; m per head, d1 and d2 per warp and head.
        for j in cutlass.range_constexpr(HB):
            d1 = _rows_allreduce(state[1, j], _add)
            d2 = _rows_allreduce(state[2, j], _add)
            if lane < 4:
                head = 4 * j + col_pair
                sStat[wg, 1 + wg_warp, head] = d1
                sStat[wg, 5 + wg_warp, head] = d2
                if wg_warp == 0:
                    sStat[wg, 0, head] = state[0, j]
        cute.arch.barrier()  # every warpgroup is done reading the stages
        o_stride = NO * (D + O_PAD)  # floats per warpgroup
        sO = cute.make_tensor(cute.recast_ptr(sK.iterator, dtype=Float32), cute.make_layout(
            (D, NO, W), stride=(1, D + O_PAD, o_stride)))
        thr_o.partition_C(sO[None, None, wg]).store(acc_O.load())
        cute.arch.barrier()

        # ---- this CTA's partial state, its warpgroups and 16-bit parts merged, per element -----
        # With one split it is the output. Otherwise the elements are dealt out to the splits of
        # the cluster in slices, and each CTA pushes its state of every element into the shared
        # memory of the split that merges it (st.async stores counted by that CTA's merge
        # barrier): no cluster-wide barrier at the end.
        if cutlass.const_expr(S > 1):
            sMerge = storage.sMerge.get_tensor(cute.make_layout(
                (S, 5, slice_size), stride=(5 * slice_size, slice_size, 1)))
            cute.arch.cluster_wait()
        for j in cutlass.range_constexpr((G * D + threads - 1) // threads):
            idx = j * threads + tidx
            if idx < G * D:
                merged = _EMPTY_STATE
                for w in cutlass.range_constexpr(W):
                    merged = _merge(merged, _warpgroup_state(
                        sO.iterator + w * o_stride, sStat.iterator + w * STAT_ROWS * MAX_GROUP,
                        idx // D, idx % D, D + O_PAD, NS))
                if cutlass.const_expr(S == 1):
                    _, d1, d2, o1, o2 = merged
                    mOut[batch_idx, cta_head * G + idx // D, idx % D] = _finalize(
                        d1, d2, o1, o2).to(self.dtype)
                else:
                    owner = idx // slice_size
                    slot = sMerge.iterator + split * 5 * slice_size + idx % slice_size
                    for f in cutlass.range_constexpr(5):
                        cute.arch.store_async_dsmem(slot + f * slice_size,
                                                    merged[f].bitcast(Int32), merge_barrier, owner)

        # ---- merge this split's slice over the splits: `lanes` lanes per element, a lane per
        # split, combined by butterfly shuffles --------------------------------------------------
        if cutlass.const_expr(S > 1):
            lanes = 1 << (S - 1).bit_length()  # splits, to a power of 2
            per_pass = threads // lanes
            source = tidx % lanes
            cute.arch.mbarrier_wait(merge_barrier, 0)
            for j in cutlass.range_constexpr((slice_size + per_pass - 1) // per_pass):
                position = j * per_pass + tidx // lanes
                offset = cutlass.min(position, slice_size - 1)  # in bounds for the idle lanes
                idx = split * slice_size + offset
                m, d1, d2, o1, o2 = _EMPTY_STATE
                if source < S:
                    m, d1, d2, o1, o2 = (sMerge[source, f, offset] for f in range(5))
                merged = (m, d1, d2, o1, o2)
                for k in cutlass.range_constexpr(lanes.bit_length() - 1):
                    merged = _merge(merged, tuple(cute.arch.shuffle_sync_bfly(x, offset=1 << k)
                                                  for x in merged))
                if (position < slice_size) & (idx < G * D) & (source == 0):
                    _, d1, d2, o1, o2 = merged
                    mOut[batch_idx, cta_head * G + idx // D, idx % D] = _finalize(
                        d1, d2, o1, o2).to(self.dtype)

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


def _rows_allreduce(value, op):
    """Reduce over the 8 lanes that hold the same accumulator columns (lanes t, t + 4, ...)."""
    for offset in (4, 8, 16):
        value = op(value, cute.arch.shuffle_sync_bfly(value, offset=offset))
    return value


def _mn_view(acc):
    """View an m64nN WGMMA accumulator fragment ((2 cols, 2 rows, N/8), 1, 1) as (rows, cols):
    row 0 is row lane // 4 of the warp's 16-row band, row 1 is row lane // 4 + 8; column 2j + c
    is column 8j + 2 (lane % 4) + c."""
    shape, stride = acc.layout.shape[0], cute.make_layout(acc.layout.shape).stride[0]
    if cutlass.const_expr(len(shape) == 2):  # N = 8: the block mode is absent
        shape, stride = (*shape, 1), (*stride, 0)
    mn = cute.make_layout(((shape[1]), (shape[0], shape[2])),
                          stride=((stride[1]), (stride[0], stride[2])))
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))


@cute.jit
def _warpgroup_state(o_ptr: cute.Pointer, stat_ptr: cute.Pointer, head: Int32, col: Int32,
                   row_stride: cutlass.Constexpr, lo_offset: cutlass.Constexpr):
    """One warpgroup's (m, d1, d2, O1, O2) of (head, column) from shared memory: O^T is (D, NO)
    fp32 with column stride
    `row_stride`, P's 16-bit part of head h in column 8 (h // 4) + 2 (h % 4) (P*U's next to it)
    and the remainders `lo_offset` columns on; stat is (STAT_ROWS, 8)."""
    def o(c):
        return (o_ptr + c * row_stride + col).load()

    def stat(row):
        return (stat_ptr + row * MAX_GROUP + head).load()
    c = 8 * (head // 4) + 2 * (head % 4)
    o1 = o(c) + o(c + lo_offset)
    o2 = o(c + 1) + o(c + lo_offset + 1)
    d1 = stat(1) + stat(2) + stat(3) + stat(4)
    d2 = stat(5) + stat(6) + stat(7) + stat(8)
    return (stat(0), d1, d2, o1, o2)


_EMPTY_STATE = (-Float32.inf, Float32(0.0), Float32(0.0), Float32(0.0), Float32(0.0))


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


def choose_warpgroups(ctas, device):
    """Two warpgroups per CTA (one CTA per SM) unless the `ctas` CTAs of a split outnumber the
    SMs: then one, so that several CTAs share an SM and every CTA is resident from the start."""
    return 1 if ctas > num_sms(device) else 2


def choose_pairing(batch, kv_heads, group, device):
    """Pair adjacent KV heads in one CTA where decode streams the cache from DRAM: one q head per
    KV head, with more (row, KV head) pairs than SMs, and enough that the pairs' CTAs still
    cover two thirds of the SMs (the thresholds and their timings: README). With grouped
    queries pairing did not pay, so it is left to the `paired` override (even KV head count,
    at most 4 q heads per KV head)."""
    return group == 1 and kv_heads % 2 == 0 and 3 * batch * kv_heads >= 4 * num_sms(device)


def _ptr(t, dtype, align):
    return make_ptr(dtype, t.data_ptr(), cute.AddressSpace.gmem, assumed_align=align)


def parallax_decode_cute(q, r, k_cache, v_cache, cache_seqlens, window, scale, out, num_splits=None,
                         warpgroups=None, paired=None):
    """Launch the SM90 kernel. The caller has validated the inputs: q, r and out contiguous
    (B, 1, Hq, D); caches (B, Lmax, Hkv, D) with unit stride in D, 16-byte aligned base
    pointers and strides; cache_seqlens int32 (B,). num_splits (1..8), warpgroups (1, 2) and
    paired override choose_num_splits, choose_warpgroups and choose_pairing; each value
    compiles its own variant."""
    B, _, Hq, D = q.shape
    Lmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    device = q.device
    if paired is None:
        paired = choose_pairing(B, Hkv, group, device)
    elif paired and (Hkv % 2 or group > MAX_GROUP // 2):
        raise ValueError(f"paired KV heads need an even KV head count and at most "
                         f"{MAX_GROUP // 2} q heads per KV head, got {Hkv} and {group}")
    kv_per_cta = 2 if paired else 1
    ctas = B * Hkv // kv_per_cta  # of one split
    splits = num_splits or choose_num_splits(ctas, Lmax * kv_per_cta, TILE_ROWS, device, MAX_SPLITS)
    warpgroups = warpgroups or choose_warpgroups(ctas, device)
    dtype = _TORCH_TO_CUTE[q.dtype]
    elem = q.element_size()
    args = (_ptr(q, dtype, elem), _ptr(r, dtype, elem), _ptr(k_cache, dtype, 16),
            _ptr(v_cache, dtype, 16), _ptr(cache_seqlens, Int32, 4), _ptr(out, dtype, elem),
            Int32(B), Int32(Lmax), Int32(Hkv),
            Int64(k_cache.stride(0)), Int32(k_cache.stride(1)), Int32(k_cache.stride(2)),
            Int64(v_cache.stride(0)), Int32(v_cache.stride(1)), Int32(v_cache.stride(2)),
            Int32(min(window or Lmax, Lmax)), Float32(scale * LOG2_E),
            cuda.CUstream(torch.cuda.current_stream(device).cuda_stream))
    key = (q.dtype, D, group, splits, warpgroups, paired, device)
    fn = _compiled.get(key)
    if fn is None:
        kernel = ParallaxDecodeSm90(dtype, D, group, splits, warpgroups, paired)
        fn = _compiled[key] = cute.compile(kernel, *args)
    fn(*args)
    return out
