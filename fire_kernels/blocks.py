"""Block-size heuristics shared by the repair kernels (no autotuning: launches stay
deterministic, capturable in CUDA graphs, and free of first-call tuning stalls)."""

MAX_K = 64  # directions per op call; BLOCK_K is the next power of two
FUSED_MAX_D = 16384  # longest row one program keeps in registers
ROW_BLOCK_N = 32  # rows per program in the row-block x D-chunk kernels (long rows)
ROW_BLOCK_D = 32  # D-chunk of one tl.dot there at BLOCK_K <= 16 (offline compile: 32 x 128 spills on sm_90)
ROW_SPAN = 4096  # columns per program there
TILE_ELEMS = 4096  # elements per program in the fused kernel (rows x columns)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def fused_max_d(rescale: bool = False) -> int:
    """The longest row the fused kernel takes. Mode invert's rescale (a second read of the
    centre and a per-row share) spilled 8 bytes at 16384 elements and 32 warps on sm_90 (the
    most warps a program has), so its longest rows go to the row-block kernels."""
    return FUSED_MAX_D // 2 if rescale else FUSED_MAX_D


def fused_blocks(D: int, rescale: bool = False):
    """(BLOCK_N, BLOCK_D, num_warps) for rows short enough to live in one program."""
    block_d = next_pow2(max(D, 16))
    # invert's rescale holds more values a row: half the rows (16 x 256 at 4 warps spilled 8 bytes
    # on sm_90 at K = 16, and 20 at 8 warps and K = 64)
    block_n = max(1, min(64, (TILE_ELEMS // 2 if rescale else TILE_ELEMS) // block_d))
    return block_n, block_d, _fused_warps(block_n, block_d)


def _fused_warps(block_n: int, block_d: int) -> int:
    """Warps per program, from what ptxas reports offline (tests/kernels/test_kernels_compile.py, Triton
    3.9): a 16384-element row at 16 warps (128 registers a thread) spilled 84-108 bytes on sm_90,
    at 32 warps (16 elements a thread, 64 registers) none; the 32 x 128 tile at 4 warps spilled
    12 bytes on sm_90 at BLOCK_K = 16, at 8 warps none."""
    tile = block_n * block_d
    if tile > 8192:
        return 32
    if tile > 4096 or (block_n, block_d) == (32, 128):
        return 8
    return 4


def row_block_blocks(D: int, K: int, one_chunk: bool = False, rescale: bool = False):
    """(BLOCK_N, BLOCK_D, BLOCK_K, SPAN, n_spans, num_warps) for rows longer than FUSED_MAX_D: a
    block of rows x one span of columns per program, walked in BLOCK_D chunks. tl.dot wants
    every dimension >= 16 (BLOCK_K padded up); the chunk narrows as K grows so that the x tile
    and the direction chunk stay in registers. The span keeps the per-span partial scores that
    every program re-reads small (n_spans x BLOCK_K per row against SPAN elements). `one_chunk`:
    the whole span as one chunk, for the Triton interpreter (which runs every loop iteration in
    Python: the same code at another block size, so the CPU tests stay fast). `rescale` (mode
    invert): half the rows at BLOCK_K 64, where its per-row share spilled 4 bytes on sm_90."""
    block_k = max(16, next_pow2(K))
    block_d = ROW_SPAN if one_chunk else max(16, ROW_BLOCK_D * 16 // block_k)
    block_n = ROW_BLOCK_N // 2 if rescale and block_k >= 64 else ROW_BLOCK_N
    return block_n, block_d, block_k, ROW_SPAN, -(-D // ROW_SPAN), 4
