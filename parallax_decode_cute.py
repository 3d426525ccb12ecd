"""Parallax single-query decode over a KV cache: a CuTe DSL kernel for Hopper (SM90).

It imports only torch, the CuTe DSL and parallax_reference.py; `parallax_decode.py` validates
inputs and dispatches here; ParallaxDecodeSm90.can_implement and check_inputs state what it
supports. One CTA works on one (batch row, KV head or pair of KV heads, KV split) with one or
two warpgroups, each an independent pipeline over its share (every other tile) of the split's
64-row tiles. `kernel` sets up and runs the mainloop, one tile per iteration: load_tile (TMA),
zero_invisible_values, mma_scores, mask_scores, exchange_tile_max, online_softmax, mma_output;
then epilogue, merge_in_cta and merge_splits:

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

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_GROUPS = (1, 2, 4, 8)  # q heads per KV head
TILE_ROWS = 64  # K/V rows per pipeline stage: 64 keys, or 32 keys of two paired KV heads
MAX_GROUP = max(SUPPORTED_GROUPS)
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

    @staticmethod
    def can_implement(dtype, head_dim, group, num_splits, warpgroups, paired) -> bool:
        """The configurations the kernel supports; check_inputs holds the inputs' side (head
        ratio, alignment)."""
        return (dtype in _TORCH_TO_CUTE.values() and head_dim in SUPPORTED_HEAD_DIMS
                and group in SUPPORTED_GROUPS and 1 <= num_splits <= MAX_SPLITS
                and warpgroups in STAGE_BYTES and not (paired and group > MAX_GROUP // 2))

    def __init__(self, dtype, head_dim, group, num_splits, warpgroups, paired):
        if not self.can_implement(dtype, head_dim, group, num_splits, warpgroups, paired):
            raise ValueError(f"unsupported decode kernel configuration: {dtype}, head dim "
                             f"{head_dim}, group {group}, {num_splits} splits, {warpgroups} "
                             f"warpgroups, paired={paired}")
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
        D, kv_per_cta, num_splits = self.head_dim, self.kv_per_cta, self.num_splits
        score_cols, out_cols = self.score_cols, self.out_cols
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
            if cutlass.const_expr(kv_per_cta == 1):
                return max_len, stride_l
            return (kv_per_cta, max_len), (cute.assume(stride_h, divby=8), stride_l)
        k_rows, k_row_stride = rows_of(k_stride_l, k_stride_h)
        v_rows, v_row_stride = rows_of(v_stride_l, v_stride_h)
        mK = cute.make_tensor(k_ptr, cute.make_layout(
            (k_rows, D, kv_heads // kv_per_cta, batch),
            stride=(k_row_stride, 1, cute.assume(k_stride_h * kv_per_cta, divby=8),
                    cute.assume(k_stride_b, divby=8))))
        mVt = cute.make_tensor(v_ptr, cute.make_layout(
            (D, v_rows, kv_heads // kv_per_cta, batch),
            stride=(1, v_row_stride, cute.assume(v_stride_h * kv_per_cta, divby=8),
                    cute.assume(v_stride_b, divby=8))))
        mLens = cute.make_tensor(lens_ptr, cute.make_layout((batch,)))
        K_MAJOR, MN_MAJOR = cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN
        # S^T = K [Q; R]^T: keys on the MMA's M, the (q, r) columns of the group on N
        mma_s = sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, K_MAJOR, K_MAJOR, Float32, (1, 1, 1), (TILE_ROWS, score_cols))
        # O^T += V^T P^T: head dimension on M (D / 64 m64 tiles), keys on K
        mma_o = sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, MN_MAJOR, K_MAJOR, Float32, (1, 1, 1), (64, out_cols))
        sK_layout = sm90_utils.make_smem_layout_a(
            LayoutEnum.ROW_MAJOR, (TILE_ROWS, score_cols, D), self.dtype, self.num_stages)
        sV_layout = sm90_utils.make_smem_layout_a(
            LayoutEnum.COL_MAJOR, (D, out_cols, TILE_ROWS), self.dtype, self.num_stages)
        sQR_layout = sm90_utils.make_smem_layout_b(
            LayoutEnum.ROW_MAJOR, (TILE_ROWS, score_cols, D), self.dtype, 1)
        sP_layout = sm90_utils.make_smem_layout_b(  # one P^T buffer per warpgroup
            LayoutEnum.ROW_MAJOR, (D, out_cols, TILE_ROWS), self.dtype, self.warpgroups)
        tma_k, mK_tma = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mK, cute.slice_(sK_layout, (None, None, 0)),
            (TILE_ROWS, D))
        tma_v, mV_tma = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mVt, cute.slice_(sV_layout, (None, None, 0)),
            (D, TILE_ROWS))
        tile_bytes = 2 * TILE_ROWS * D * (self.dtype.width // 8)  # K and V of one stage
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
            sMerge: cute.struct.MemRange[
                Float32, num_splits * 5 * slice_size if num_splits > 1 else 1]
            merge_barrier: cute.struct.MemRange[Int64, 1]

        # the epilogue reuses the K stages for the fp32 accumulators O^T of the warpgroups
        assert self.warpgroups * out_cols * (D + O_PAD) * 4 <= cute.cosize(sK_layout) * (
            self.dtype.width // 8)

        self.kernel(mQ, mR, mK_tma, mV_tma, mLens, mOut, window, scale_log2, tma_k, tma_v,
                    sK_layout, sV_layout, sQR_layout, sP_layout, mma_s, mma_o, tile_bytes,
                    SharedStorage).launch(
            grid=(num_splits, kv_heads // kv_per_cta, batch),
            block=(WARPGROUP_THREADS * self.warpgroups, 1, 1),
            cluster=(num_splits, 1, 1), stream=stream)

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
        """One CTA = one (split, KV head or pair, batch row): set up, then per tile load / score
        MMA / online softmax / output MMA, then the epilogue and the merge over warpgroups and
        splits."""
        D, num_splits, warpgroups = self.head_dim, self.num_splits, self.warpgroups
        keys_per_tile = TILE_ROWS // self.kv_per_cta
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
        # sK (tile rows, D, stage), sV (D, tile rows, stage), sQR (score cols, D, 1),
        # sP (out cols, tile rows, warpgroup)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sQR = storage.sQR.get_tensor(sQR_layout.outer, swizzle=sQR_layout.inner)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        sMax = storage.sMax.get_tensor(cute.make_layout(
            (warpgroups, 4, MAX_GROUP), stride=(4 * MAX_GROUP, MAX_GROUP, 1)))
        sStat = storage.sStat.get_tensor(cute.make_layout(
            (warpgroups, STAT_ROWS, MAX_GROUP), stride=(STAT_ROWS * MAX_GROUP, MAX_GROUP, 1)))
        # The merge barrier completes when every split has pushed its partial state of each
        # element of this split's slice: one arrival, here, that expects all their bytes.
        merge_barrier = storage.merge_barrier.data_ptr()
        if cutlass.const_expr(num_splits > 1):
            if tidx == 0:
                slice_elements = cutlass.min(self.slice_size,
                                             self.group * D - split * self.slice_size)
                cute.arch.mbarrier_init(merge_barrier, 1)
                cute.arch.mbarrier_arrive_and_expect_tx(  # 5 fp32 per element and split
                    merge_barrier, num_splits * slice_elements * 5 * (Float32.width // 8))
        # warpgroup w consumes tiles w, w + W, ... of the split from its own stages; its warp 0
        # arms each stage and issues the TMA loads, each of its 4 warps releases the stage
        kv_pipeline = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.barriers.data_ptr(), num_stages=self.num_stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 4),
            tx_count=tile_bytes)
        if cutlass.const_expr(num_splits > 1):  # the merge barriers are initialized cluster-wide
            cute.arch.cluster_arrive_relaxed()  # before the first push (cluster_wait in the merge)
        wg = warp_idx // 4
        wg_tidx = tidx % WARPGROUP_THREADS
        wg_warp = warp_idx % 4
        wg_barrier = 1 + wg  # named barrier of this warpgroup (0 is the CTA barrier)
        # In both accumulators this thread holds the column pairs (2t, 2t + 1) of every block
        # of 8: the (s, u) of heads t, t + 4 and the (O1, O2) columns of the same heads.
        col_pair = lane % 4

        # ---- which keys this warpgroup reads ----------------------------------------------------
        # Visible keys are [lo, hi); the row's tiles (aligned to multiples of keys_per_tile) are
        # dealt out to splits in contiguous runs, and inside a split round-robin to warpgroups.
        max_len = mK.shape[0][1] if cutlass.const_expr(self.kv_per_cta > 1) else mK.shape[0]
        hi = cutlass.min(cache_len, max_len)
        lo = cutlass.max(hi - window, 0)
        first_tile = lo // keys_per_tile
        num_tiles = cutlass.max((hi + keys_per_tile - 1) // keys_per_tile - first_tile, 0)
        tiles_per_split = (num_tiles + num_splits - 1) // num_splits
        split_first = first_tile + split * tiles_per_split
        split_tiles = cutlass.max(
            cutlass.min(tiles_per_split, num_tiles - split * tiles_per_split), 0)
        wg_tiles = cutlass.max(split_tiles - wg + warpgroups - 1, 0) // warpgroups
        wg_stages = self.num_stages // warpgroups

        # ---- TMA partitions; the first stages are filled before anything else -----------------
        gK = cute.local_tile(mK[None, None, cta_head, batch_idx], (TILE_ROWS, D), (None, 0))
        gV = cute.local_tile(mV[None, None, cta_head, batch_idx], (D, TILE_ROWS), (0, None))
        tKsK, tKgK = cpasync.tma_partition(tma_k, 0, cute.make_layout(1),
                                           cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2))
        tVsV, tVgV = cpasync.tma_partition(tma_v, 0, cute.make_layout(1),
                                           cute.group_modes(sV, 0, 2), cute.group_modes(gV, 0, 2))
        write = pipeline.PipelineState(self.num_stages, wg, wg, Int32(1))
        if wg_warp == 0:
            for i in cutlass.range(cutlass.min(wg_tiles, wg_stages), unroll=1):
                self.load_tile(kv_pipeline, write, tma_k, tma_v, tKgK, tKsK, tVgV, tVsV,
                               split_first + wg + i * warpgroups)
                for _ in cutlass.range_constexpr(warpgroups):  # on to this warpgroup's next stage
                    write.advance()
        self.load_query(mQ, mR, sQR, cta_head, batch_idx, tidx)

        thr_s = mma_s.get_slice(wg_tidx)
        thr_o = mma_o.get_slice(wg_tidx)
        tSrK = thr_s.make_fragment_A(thr_s.partition_A(sK))  # (MMA, M, K, stage)
        tSrQR = thr_s.make_fragment_B(thr_s.partition_B(sQR))
        tOrV = thr_o.make_fragment_A(thr_o.partition_A(sV))
        tOrP = thr_o.make_fragment_B(thr_o.partition_B(sP))
        score_tile = (TILE_ROWS, self.score_cols)
        acc_S = cute.make_rmem_tensor(thr_s.partition_shape_C(score_tile), Float32)
        acc_S_mn = _mn_view(acc_S)  # (2 keys, (s, u) x head block)
        tScS_mn = _mn_view(thr_s.partition_C(cute.make_identity_tensor(score_tile)))
        acc_O = cute.make_rmem_tensor(thr_o.partition_shape_C((D, self.out_cols)), Float32)
        acc_O.fill(0.0)
        mma_o.set(warpgroup.Field.ACCUMULATE, True)
        # this thread's softmax state for heads 4j + col_pair: running max (log2 units, the same
        # in every warp), and its own keys' shares of d1 = sum e^(s-m) and d2 = sum e^(s-m) u
        state = cute.make_rmem_tensor((3, self.head_blocks), Float32)
        for j in cutlass.range_constexpr(self.head_blocks):
            state[0, j] = -Float32.inf
            state[1, j] = 0.0
            state[2, j] = 0.0
        alpha = cute.make_rmem_tensor((self.head_blocks,), Float32)

        # ---- mainloop: one tile per iteration, from this warpgroup's stages ---------------------
        read = pipeline.PipelineState(self.num_stages, wg, wg, Int32(0))
        for i in cutlass.range(wg_tiles, unroll=1):
            kv_pipeline.consumer_wait(read)
            stage = read.index
            first_key = (split_first + wg + i * warpgroups) * keys_per_tile
            straddles = (first_key < lo) | (first_key + keys_per_tile > hi)
            if straddles:
                self.zero_invisible_values(sV, stage, first_key, lo, hi, wg_tidx)
            self.mma_scores(mma_s, acc_S, tSrK, tSrQR, stage)
            self.mask_scores(acc_S_mn, tScS_mn, first_key, lo, hi, straddles, col_pair)
            self.exchange_tile_max(acc_S_mn, sMax, wg, wg_warp, wg_barrier, lane, col_pair)
            self.online_softmax(acc_S_mn, tScS_mn, sMax, sP, state, alpha, wg, wg_barrier, col_pair,
                                scale_log2)
            self.mma_output(mma_o, acc_O, alpha, tOrV, tOrP, stage, wg)
            kv_pipeline.consumer_release(read)
            for _ in cutlass.range_constexpr(warpgroups):
                read.advance()
            if wg_warp == 0 and i + wg_stages < wg_tiles:
                self.load_tile(kv_pipeline, write, tma_k, tma_v, tKgK, tKsK, tVgV, tVsV,
                               split_first + wg + (i + wg_stages) * warpgroups)
                for _ in cutlass.range_constexpr(warpgroups):
                    write.advance()

        # ---- epilogue and merge ---------------------------------------------------------------
        # O^T as (D, out cols, warpgroup) fp32 over the K stages, padded by O_PAD floats per
        # column against bank conflicts
        sO = cute.make_tensor(cute.recast_ptr(sK.iterator, dtype=Float32), cute.make_layout(
            (D, self.out_cols, warpgroups), stride=(1, D + O_PAD, self.out_cols * (D + O_PAD))))
        self.epilogue(state, acc_O, thr_o, sO, sStat, wg, wg_warp, lane, col_pair)
        sMerge = None
        if cutlass.const_expr(num_splits > 1):
            sMerge = storage.sMerge.get_tensor(cute.make_layout(
                (num_splits, 5, self.slice_size), stride=(5 * self.slice_size, self.slice_size, 1)))
            cute.arch.cluster_wait()
        self.merge_in_cta(sO, sStat, sMerge, merge_barrier, mOut, split, cta_head, batch_idx, tidx)
        if cutlass.const_expr(num_splits > 1):
            self.merge_splits(sMerge, merge_barrier, mOut, split, cta_head, batch_idx, tidx)

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

    @cute.jit
    def load_query(self, mQ: cute.Tensor, mR: cute.Tensor, sQR: cute.Tensor, cta_head: Int32,
                   batch_idx: Int32, tidx: Int32):
        """[Q; R] of the CTA's heads into shared memory: column 8j + 2t is q of head 4j + t,
        column 8j + 2t + 1 its r (zeros for heads past the group)."""
        D, group = self.head_dim, self.group
        threads = WARPGROUP_THREADS * self.warpgroups
        for i in cutlass.range_constexpr((self.score_cols * D + threads - 1) // threads):
            idx = i * threads + tidx
            if idx < self.score_cols * D:
                col, d = idx // D, idx % D
                head = 4 * (col // 8) + (col % 8) // 2
                q_head = cta_head * group + cutlass.min(head, group - 1)
                value = mR[batch_idx, q_head, d] if col % 2 == 1 else mQ[batch_idx, q_head, d]
                sQR[col, d, 0] = value if head < group else self.dtype(0)
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.barrier()

    @cute.jit
    def zero_invisible_values(self, sV: cute.Tensor, stage: Int32, first_key: Int32, lo: Int32,
                              hi: Int32, wg_tidx: Int32):
        """Zero the V rows of keys outside [lo, hi) in a tile that straddles the range: TMA brought
        them in, and not even NaN garbage there may reach the output."""
        D = self.head_dim
        for j in cutlass.range_constexpr(TILE_ROWS * D // WARPGROUP_THREADS):
            idx = j * WARPGROUP_THREADS + wg_tidx
            key = first_key + idx // D // self.kv_per_cta
            if (key < lo) | (key >= hi):
                sV[idx % D, idx // D, stage] = self.dtype(0)
        cute.arch.fence_proxy("async.shared", space="cta")

    @cute.jit
    def mma_scores(self, mma_s: cute.TiledMma, acc_S: cute.Tensor, tSrK: cute.Tensor,
                   tSrQR: cute.Tensor, stage: Int32):
        """S^T = K [Q; R]^T: the score s and the probe u of every (key, head) of the tile."""
        warpgroup.fence()
        for k in cutlass.range_constexpr(cute.size(tSrK, mode=[2])):
            mma_s.set(warpgroup.Field.ACCUMULATE, k != 0)
            cute.gemm(mma_s, acc_S, tSrK[None, None, k, stage], tSrQR[None, None, k, 0], acc_S)
        warpgroup.commit_group()
        warpgroup.wait_group(0)

    @cute.jit
    def mask_scores(self, acc_S_mn: cute.Tensor, tScS_mn: cute.Tensor, first_key: Int32, lo: Int32,
                    hi: Int32, straddles, col_pair: Int32):
        """Scores of keys outside [lo, hi) to -inf and their probes to 0; with paired KV heads, the
        same for a row's scores against the other head's q."""
        if straddles:
            for row in cutlass.range_constexpr(2):
                key = first_key + tScS_mn[row, 0][0] // self.kv_per_cta
                if (key < lo) | (key >= hi):
                    for c in cutlass.range_constexpr(2 * self.head_blocks):
                        acc_S_mn[row, c] = -Float32.inf if c % 2 == 0 else Float32(0.0)
        if cutlass.const_expr(self.kv_per_cta > 1):
            for row in cutlass.range_constexpr(2):
                for j in cutlass.range_constexpr(self.head_blocks):
                    if (4 * j + col_pair) // self.kv_group != tScS_mn[row, 0][0] % self.kv_per_cta:
                        acc_S_mn[row, 2 * j] = -Float32.inf
                        acc_S_mn[row, 2 * j + 1] = Float32(0.0)

    @cute.jit
    def exchange_tile_max(self, acc_S_mn: cute.Tensor, sMax: cute.Tensor, wg: Int32, wg_warp: Int32,
                          wg_barrier: Int32, lane: Int32, col_pair: Int32):
        """Each warp's maximum score per head (over its threads' 2 keys and its lanes) into shared
        memory, for the 4 warps of the warpgroup to read."""
        for j in cutlass.range_constexpr(self.head_blocks):
            warp_max = _rows_allreduce(
                cute.arch.fmax(acc_S_mn[0, 2 * j], acc_S_mn[1, 2 * j]), cute.arch.fmax)
            if lane < 4:
                sMax[wg, wg_warp, 4 * j + col_pair] = warp_max
        cute.arch.barrier(barrier_id=wg_barrier, number_of_threads=WARPGROUP_THREADS)

    @cute.jit
    def online_softmax(self, acc_S_mn: cute.Tensor, tScS_mn: cute.Tensor, sMax: cute.Tensor,
                       sP: cute.Tensor, state: cute.Tensor, alpha: cute.Tensor, wg: Int32,
                       wg_barrier: Int32, col_pair: Int32, scale_log2: Float32):
        """Update the running max, d1 and d2, and write P and P*U of this thread's 2 keys into the
        P^T buffer as 16-bit values and their rounding remainders; alpha rescales the output."""
        for j in cutlass.range_constexpr(self.head_blocks):
            tile_max = cute.arch.fmax(cute.arch.fmax(sMax[wg, 0, 4 * j + col_pair],
                                                     sMax[wg, 1, 4 * j + col_pair]),
                                      cute.arch.fmax(sMax[wg, 2, 4 * j + col_pair],
                                                     sMax[wg, 3, 4 * j + col_pair]))
            m_new = cute.arch.fmax(state[0, j], tile_max * scale_log2)
            m_safe = Float32(0.0) if m_new == -Float32.inf else m_new
            alpha[j] = cute.math.exp2(state[0, j] - m_safe, fastmath=True)
            state[0, j] = m_new
            valid_head = 4 * j + col_pair < self.group
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
                sP[col + self.score_cols, key, wg] = (p - p_hi.to(Float32)).to(self.dtype)
                sP[col + self.score_cols + 1, key, wg] = (pu - pu_hi.to(Float32)).to(self.dtype)
            state[1, j] = state[1, j] * alpha[j] + d1
            state[2, j] = state[2, j] * alpha[j] + d2
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.barrier(barrier_id=wg_barrier, number_of_threads=WARPGROUP_THREADS)

    @cute.jit
    def mma_output(self, mma_o: cute.TiledMma, acc_O: cute.Tensor, alpha: cute.Tensor,
                   tOrV: cute.Tensor, tOrP: cute.Tensor, stage: Int32, wg: Int32):
        """O^T = O^T alpha + V^T P^T."""
        for idx in cutlass.range_constexpr(cute.size(acc_O)):
            acc_O[idx] = acc_O[idx] * alpha[(idx // 4) % self.head_blocks]
        warpgroup.fence()
        for k in cutlass.range_constexpr(cute.size(tOrV, mode=[2])):
            cute.gemm(mma_o, acc_O, tOrV[None, None, k, stage], tOrP[None, None, k, wg], acc_O)
        warpgroup.commit_group()
        warpgroup.wait_group(0)

    @cute.jit
    def epilogue(self, state: cute.Tensor, acc_O: cute.Tensor, thr_o, sO: cute.Tensor,
                 sStat: cute.Tensor, wg: Int32, wg_warp: Int32, lane: Int32, col_pair: Int32):
        """Each warpgroup's partial state into shared memory: m per head, d1 and d2 per warp and
        head, O^T into sO over the K stages once every warpgroup is done reading them."""
        for j in cutlass.range_constexpr(self.head_blocks):
            d1 = _rows_allreduce(state[1, j], _add)
            d2 = _rows_allreduce(state[2, j], _add)
            if lane < 4:
                head = 4 * j + col_pair
                sStat[wg, 1 + wg_warp, head] = d1
                sStat[wg, 5 + wg_warp, head] = d2
                if wg_warp == 0:
                    sStat[wg, 0, head] = state[0, j]
        cute.arch.barrier()
        thr_o.partition_C(sO[None, None, wg]).store(acc_O.load())
        cute.arch.barrier()

    @cute.jit
    def merge_in_cta(self, sO: cute.Tensor, sStat: cute.Tensor, sMerge, merge_barrier,
                     mOut: cute.Tensor, split: Int32, cta_head: Int32, batch_idx: Int32,
                     tidx: Int32):
        """This CTA's partial state, its warpgroups and 16-bit parts merged, per element. With one
        split it is the output. Otherwise the elements are dealt out to the splits of the cluster
        in slices, and each CTA pushes its state of every element into the shared memory of the
        split that merges it (st.async stores counted by that CTA's merge barrier): no
        cluster-wide barrier at the end."""
        D, group, slice_size = self.head_dim, self.group, self.slice_size
        threads = WARPGROUP_THREADS * self.warpgroups
        o_stride = self.out_cols * (D + O_PAD)  # floats per warpgroup
        for j in cutlass.range_constexpr((group * D + threads - 1) // threads):
            idx = j * threads + tidx
            if idx < group * D:
                merged = _EMPTY_STATE
                for w in cutlass.range_constexpr(self.warpgroups):
                    merged = _merge(merged, _warpgroup_state(
                        sO.iterator + w * o_stride, sStat.iterator + w * STAT_ROWS * MAX_GROUP,
                        idx // D, idx % D, D + O_PAD, self.score_cols))
                if cutlass.const_expr(self.num_splits == 1):
                    _, d1, d2, o1, o2 = merged
                    mOut[batch_idx, cta_head * group + idx // D, idx % D] = _finalize(
                        d1, d2, o1, o2).to(self.dtype)
                else:
                    owner = idx // slice_size
                    slot = sMerge.iterator + split * 5 * slice_size + idx % slice_size
                    for f in cutlass.range_constexpr(5):
                        cute.arch.store_async_dsmem(slot + f * slice_size,
                                                    merged[f].bitcast(Int32), merge_barrier, owner)

    @cute.jit
    def merge_splits(self, sMerge: cute.Tensor, merge_barrier, mOut: cute.Tensor, split: Int32,
                     cta_head: Int32, batch_idx: Int32, tidx: Int32):
        """Merge this split's slice over the splits once their pushes have landed: `lanes` lanes
        per element, a lane per split, combined by butterfly shuffles."""
        D, group, slice_size = self.head_dim, self.group, self.slice_size
        num_splits = self.num_splits
        lanes = 1 << (num_splits - 1).bit_length()  # splits, to a power of 2
        per_pass = WARPGROUP_THREADS * self.warpgroups // lanes
        source = tidx % lanes
        cute.arch.mbarrier_wait(merge_barrier, 0)
        for j in cutlass.range_constexpr((slice_size + per_pass - 1) // per_pass):
            position = j * per_pass + tidx // lanes
            offset = cutlass.min(position, slice_size - 1)  # in bounds for the idle lanes
            idx = split * slice_size + offset
            m, d1, d2, o1, o2 = _EMPTY_STATE
            if source < num_splits:
                m, d1, d2, o1, o2 = (sMerge[source, f, offset] for f in range(5))
            merged = (m, d1, d2, o1, o2)
            for k in cutlass.range_constexpr(lanes.bit_length() - 1):
                merged = _merge(merged, tuple(cute.arch.shuffle_sync_bfly(x, offset=1 << k)
                                              for x in merged))
            if (position < slice_size) & (idx < group * D) & (source == 0):
                _, d1, d2, o1, o2 = merged
                mOut[batch_idx, cta_head * group + idx // D, idx % D] = _finalize(
                    d1, d2, o1, o2).to(self.dtype)


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
    """One warpgroup's (m, d1, d2, O1, O2) of (head, column) from shared memory: O^T is
    (D, out cols) fp32 with column stride `row_stride`, P's 16-bit part of head h in column
    8 (h // 4) + 2 (h % 4) (P*U's next to it) and the remainders `lo_offset` columns on; stat is
    (STAT_ROWS, MAX_GROUP)."""
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


def check_inputs(q, k_cache, v_cache):
    """What the kernel needs of inputs that passed parallax_decode's checks: a supported head
    ratio and TMA-ready caches (16-byte aligned, strides multiples of 8 elements); ValueError
    naming the argument."""
    group = q.shape[2] // k_cache.shape[2]
    if group not in SUPPORTED_GROUPS:
        raise ValueError(f"head ratio Hq/Hkv = {group} is not supported by the CuTe DSL decode "
                         f"kernel; supported: {SUPPORTED_GROUPS}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.data_ptr() % 16 or any(s % 8 for s in x.stride()[:-1]):
            raise ValueError(f"{name} must be 16-byte aligned with strides that are multiples of 8 "
                             f"elements for the CuTe DSL kernel, got strides {x.stride()}")


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
