"""Compile the attention kernels for sm_90 (Hopper) on any machine, no GPU needed.

Also the Hopper backend's Gluon kernels (``gluon fwd_kernel`` / ``bwd_dkdv_kernel`` / ``bwd_dq_kernel``)
where Triton's Gluon dialect loads: dense, ACP and packed sequences at each head dim it covers.

    python benchmarks/compile_sm90.py --head-dims 64 128 [--stages 2]

For each head dim, kernel (forward, dK/dV, dQ, the GQA group sum), TMA on/off and ACP on/off it
prints registers, stack (spills), shared memory, or the compile failure (e.g. a ptxas crash). The
specialisation is that of a typical launch: bf16, strides and lengths divisible by 16, unit strides
and GQA group 1 as constants (plus the dK/dV kernel as a GQA backward launches it: group > 1,
float32 partials). Triton ships ptxas and cuobjdump, so only the ``triton`` package is needed.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from foxacp.ops import triton_kernels as K
from foxacp.ops.acp import LOCAL_WINDOW
from foxacp.ops.triton_attention import HEADS_PER_GROUP, _pad, _search_block, group_sum_block, tile_config

FLOAT32_POINTERS = {"C", "LSE", "DI", "DC", "ACC_PART", "ML_PART", "PART", "PK", "PV", "KMAX"}
FLOAT64_POINTERS = {"DG", "DKEYS"}
INT32_POINTERS = {"ACP_KV", "ACP_Q", "LO", "HI", "OUT"}
FLOAT_SCALARS = {"qk_scale", "sm_scale", "margin", "log_eps"}
INT_SCALARS = {"B", "H", "HKV", "GROUP", "OFF", "NUM_QT", "NUM_KT", "NUM_CHUNKS"}  # upper-case names that are not pointers
ONE = {"stride_ct", "stride_dct", "GROUP"}  # == 1 at a typical launch: Triton makes them constants
DIVISIBLE = {"Tq", "Tk", "H", "HKV", "NUM_QT", "NUM_KT"}


def signature(fn, constants: dict, dtype: str = "bf16", float32=()) -> dict:
    """Argument types of a typical launch; ``float32``: more pointers that are float32."""
    sig = {}
    for name in fn.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name.endswith("_DESC"):
            block = constants["BLOCK_N"] if name in ("K_DESC", "V_DESC") else constants["BLOCK_M"]
            sig[name] = f"tensordesc<{dtype}[1, 1, {block}, {constants['D_PAD']}]>" if constants["USE_TMA"] \
                else f"*{dtype}"
        elif name.isupper() and name not in INT_SCALARS:
            sig[name] = ("*fp32" if name in FLOAT32_POINTERS or name in float32 else
                         "*fp64" if name in FLOAT64_POINTERS else "*i32" if name in INT32_POINTERS else f"*{dtype}")
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def divisibility(fn, sig: dict) -> dict:
    """Pointers and the integer strides/lengths a launch would see as multiples of 16."""
    def divisible(name):
        kind = sig[name]
        if kind.startswith("*"):
            return True
        return kind == "i32" and (name in DIVISIBLE or name.startswith("stride") and name != "stride_lob")
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if divisible(name)}


def resource_usage(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not glob.glob(tool):
        return "(cuobjdump not found)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = [line.strip() for line in out.splitlines() if "REG:" in line]
    return " ".join(part for part in " ".join(fields).split() if part.startswith(("REG:", "STACK:")))


def ctas_per_sm(registers: int, warps: int, shared: int) -> int:
    """CTAs of a kernel one sm_90 SM holds at once: 64K registers (allocated per warp in units of
    256), 228 KB of shared memory (1 KB reserved per CTA), 64 warps."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = 65536 // (per_warp * warps) if registers else 64
    return min(by_registers, 233472 // (shared + 1024), 64 // warps)


def compile_one(fn, constants: dict, warps: int, stages: int, label: str, gqa: bool = False) -> None:
    """``gqa``: GROUP > 1 (not a constant) and float32 dK/dV partials, as in a GQA backward."""
    constants = dict(constants, **{name: 1 for name in fn.arg_names if name in ONE and not (gqa and name == "GROUP")})
    sig = signature(fn, constants, float32=("DK", "DV") if gqa else ())
    try:
        kernel = triton.compile(ASTSource(fn, sig, constants, divisibility(fn, sig)),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    except Exception as err:  # noqa: BLE001 - report any compile failure and go on
        first = next((line for line in str(err).splitlines() if "error" in line.lower()), type(err).__name__)
        print(f"FAIL {label}: {type(err).__name__}: {first[:120]}", flush=True)
        return
    print(f"ok   {label}: {resource_usage(kernel.asm['cubin'])} smem {kernel.metadata.shared}", flush=True)


def compile_gluon(head_dim: int) -> None:
    """The Gluon kernels of ``backend="hopper"`` at ``head_dim`` (forward, dK/dV, dQ): dense, ACP,
    ACP with packed sequences; the dK/dV kernel also as a GQA backward launches it (float32
    partials, the group size not a constant)."""
    from foxacp.ops import hopper_attention

    if hopper_attention.kernels is None or head_dim not in hopper_attention.HEAD_DIMS:
        print(f"skip gluon D={head_dim}: not covered here", flush=True)
        return
    import torch
    from triton.backends.compiler import BaseBackend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import native_specialize_impl

    HK = hopper_attention.kernels
    block_m, block_n = hopper_attention.tiles(head_dim)
    bwd = hopper_attention.BACKWARD_BLOCKS
    dq_launch, dkdv_launch = hopper_attention.backward_launch(head_dim)

    def descriptor_type(tensor, block):
        desc = hopper_attention._descriptor(tensor, block) if tensor.dim() == 4 else \
            hopper_attention._float_rows(tensor, block)[1]
        return native_specialize_impl(BaseBackend, desc, False, True, True)[0]

    x = torch.empty(2, 4, 256, head_dim, dtype=torch.bfloat16)
    c = torch.empty(2, 4, 256, dtype=torch.float32)
    kernels = [  # (kernel, constants, descriptor argument types)
        (HK.fwd_kernel, dict(BLOCK_M=block_m, BLOCK_N=block_n, HEADS_PER_GROUP=HEADS_PER_GROUP,
                             **hopper_attention.launch_config(head_dim)),
         {"q_desc": descriptor_type(x, block_m), "k_desc": descriptor_type(x, block_n),
          "v_desc": descriptor_type(x, block_n), "c_desc": descriptor_type(c, block_n)}),
        (HK.bwd_dkdv_kernel, dict(PLAN_M=block_m, PLAN_N=block_n, **bwd, **dkdv_launch),
         {"q_desc": descriptor_type(x, bwd["BLOCK_M"]), "do_desc": descriptor_type(x, bwd["BLOCK_M"]),
          "k_desc": descriptor_type(x, bwd["BLOCK_N"]), "v_desc": descriptor_type(x, bwd["BLOCK_N"]),
          **{name: descriptor_type(c, bwd["BLOCK_M"]) for name in ("lse_desc", "di_desc", "cq_desc")}}),
        (HK.bwd_dq_kernel, dict(PLAN_M=block_m, PLAN_N=block_n, **bwd, **dq_launch),
         {"q_desc": descriptor_type(x, bwd["BLOCK_M"]), "do_desc": descriptor_type(x, bwd["BLOCK_M"]),
          "k_desc": descriptor_type(x, bwd["BLOCK_N"]), "v_desc": descriptor_type(x, bwd["BLOCK_N"]),
          "c_desc": descriptor_type(c, bwd["BLOCK_N"])}),
    ]
    pointers = {"C": "*fp32", "LSE": "*fp32", "DC": "*fp32", "DI": "*fp32", "ACP_KV": "*i32", "ACP_Q": "*i32",
                "LO": "*i32", "HI": "*i32", "OUT": "*bf16", "DK": "*bf16", "DV": "*bf16", "DQ": "*bf16",
                "qk_scale": "fp32", "sm_scale": "fp32"}
    for fn, launch, descriptors in kernels:
        variants = [(False, False, False), (True, False, False), (True, True, False)]
        if fn is HK.bwd_dkdv_kernel:
            variants.append((False, False, True))
        for acp, varlen, gqa in variants:
            options = {name: launch[name] for name in ("num_warps", "maxnreg") if name in launch}
            constants = dict(HEAD_DIM=head_dim, IS_VARLEN=varlen, HAS_ACP=acp,
                             **{name: value for name, value in launch.items() if name != "maxnreg"})
            types = {**pointers, **descriptors, **({"DK": "*fp32", "DV": "*fp32"} if gqa else {})}
            sig = {name: "constexpr" if name in constants else types.get(name, "i32") for name in fn.arg_names}
            label = (f"D={head_dim} gluon {fn.__name__} {constants['BLOCK_M']}x{constants['BLOCK_N']} "
                     f"w{constants['num_warps']} acp={acp:d} varlen={varlen:d}{' gqa' if gqa else ''}")
            try:
                kernel = triton.compile(GluonASTSource(fn, sig, constants), target=GPUTarget("cuda", 90, 32),
                                        options=options)
            except Exception as err:  # noqa: BLE001 - report any compile failure and go on
                first = next((line for line in str(err).splitlines() if "error" in line.lower()), type(err).__name__)
                print(f"FAIL {label}: {type(err).__name__}: {first[:120]}", flush=True)
                continue
            usage = resource_usage(kernel.asm["cubin"])
            registers = int(usage.split("REG:")[1].split()[0]) if "REG:" in usage else 0
            print(f"ok   {label}: {usage} smem {kernel.metadata.shared} warps {kernel.metadata.num_warps} "
                  f"ctas/SM {ctas_per_sm(registers, kernel.metadata.num_warps, kernel.metadata.shared)}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--stages", type=int, default=None, help="override the table's stage counts")
    parser.add_argument("--gluon-only", action="store_true", help="only the Hopper backend's Gluon kernels")
    args = parser.parse_args(argv)
    for head_dim in args.head_dims:
        if args.gluon_only:
            compile_gluon(head_dim)
            continue
        cfg, d_pad = tile_config(head_dim), _pad(head_dim)
        forward = {"NUM_SPLITS": 1, "HEADS_PER_GROUP": HEADS_PER_GROUP}
        kernels = [(K.fwd_kernel, cfg.block_m, cfg.block_n, cfg.fwd_warps, cfg.fwd_stages, forward),
                   (K.bwd_dkdv_kernel, cfg.m1, cfg.n1, cfg.bwd_warps, cfg.bwd_stages, {}),
                   (K.bwd_dq_kernel, cfg.m2, cfg.n2, cfg.bwd_warps, cfg.bwd_stages, {})]
        for fn, block_m, block_n, warps, stages, extra in kernels:
            has_tma = "USE_TMA" in fn.arg_names
            for tma in (False, True) if has_tma else (False,):
                for acp in (False, True):
                    constants = dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n,
                                     PLAN_M=cfg.block_m, PLAN_N=cfg.block_n, IS_VARLEN=False, HAS_ACP=acp,
                                     EVEN_D=head_dim == d_pad, **extra, **({"USE_TMA": tma} if has_tma else {}))
                    label = (f"D={head_dim} {fn.fn.__name__} {block_m}x{block_n} w{warps} s{args.stages or stages}"
                             f" tma={tma:d} acp={acp:d}")
                    compile_one(fn, constants, warps, args.stages or stages, label)
                    if fn is K.bwd_dkdv_kernel and not acp:
                        compile_one(fn, constants, warps, args.stages or stages, label + " gqa", gqa=True)
        compile_one(K.group_sum_kernel, dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_T=group_sum_block(d_pad)), 4, 1,
                    f"D={head_dim} group_sum_kernel")
        for varlen in (False, True):
            compile_one(K.local_first_kernel, dict(HEAD_DIM=head_dim, D_PAD=d_pad, ROWS=LOCAL_WINDOW, PLAN_M=cfg.block_m,
                                                   PLAN_N=cfg.block_n, SEARCH=_search_block(), IS_VARLEN=varlen,
                                                   PRECISION="tf32"), 4, 1,
                        f"D={head_dim} local_first_kernel varlen={varlen:d}")
        compile_gluon(head_dim)


if __name__ == "__main__":
    main()
