"""Block-size heuristics shared by the repair kernels (no autotuning: launches stay
deterministic, capturable in CUDA graphs, and free of first-call tuning stalls)."""

MAX_K = 64  # directions per op call; BLOCK_K is the next power of two
FUSED_MAX_D = 16384  # longest row one program keeps in registers
SPLIT_BLOCK_D = 4096  # chunk of a long row handled by one program
TILE_ELEMS = 4096  # elements per program in the fused kernel (rows x columns)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def fused_blocks(D: int):
    """(BLOCK_N, BLOCK_D, num_warps) for rows short enough to live in one program."""
    block_d = next_pow2(max(D, 16))
    block_n = max(1, min(64, TILE_ELEMS // block_d))
    tile = block_n * block_d
    num_warps = 4 if tile <= 4096 else (8 if tile <= 8192 else 16)
    return block_n, block_d, num_warps


def split_blocks(D: int):
    """(BLOCK_D, n_chunks, num_warps) for rows split across programs."""
    n_chunks = -(-D // SPLIT_BLOCK_D)
    return SPLIT_BLOCK_D, n_chunks, 8
