"""Registers and spills of every Triton kernel configuration, compiled offline for sm_80 and
sm_90 (no GPU needed): `python benchmarks/kernel_resources.py` prints the markdown table kept in
benchmarks/README.md."""
import warnings

import triton

from fire_kernels.ptxas_report import compile_kernel, configurations


def main():
    warnings.simplefilter("ignore")
    print(f"Triton {triton.__version__}; clamp with centre, tau and scores (the most live values); fp32\n")
    print("| kernel | BLOCK_N | BLOCK_D | BLOCK_K | warps | sm_80 regs | sm_80 spill (B) | sm_90 regs "
          "| sm_90 spill (B) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, c, warps in configurations():
        r80, r90 = (compile_kernel(name, c, warps, arch) for arch in (80, 90))
        print(f"| {name.strip('_')} | {c.get('BLOCK_N', '-')} | {c['BLOCK_D']} | {c['BLOCK_K']} | {warps} | "
              f"{r80.registers} | {r80.spill_stores} | {r90.registers} | {r90.spill_stores} |")


if __name__ == "__main__":
    main()
