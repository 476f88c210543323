"""Compile representative kernel variants for an H100 (sm_90) without a GPU.

Run by ``test_triton_compile.py`` in a subprocess *without* ``TRITON_INTERPRET`` (the interpreter
never lowers to PTX, so GPU-only errors such as layout or shared-memory limits would otherwise
first show up on the GPU). Triton's bundled LLVM and ptxas produce the cubin; nothing is run.
Prints one line per variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from logitkit.kernels.triton import ce as C  # noqa: E402
from logitkit.kernels.triton import linear_ce as L  # noqa: E402
from logitkit.kernels.triton import softmax as S  # noqa: E402

TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
      torch.int64: "i64", torch.int32: "i32", torch.int8: "i8"}
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90


def compile_sm90(kernel, args, constexprs, num_warps):
    """``triton.compile`` for sm_90 with the argument types a launch would specialize to."""
    sig, attrs, cons = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name], cons[name] = "constexpr", constexprs[name]
            continue
        v = args[name]
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + TY[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(kernel, sig, cons, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})
    assert "cubin" in k.asm, "no cubin"
    assert k.metadata.shared <= SMEM_LIMIT, f"shared memory {k.metadata.shared} > {SMEM_LIMIT}"
    return k


def t(dt, n=2):
    return torch.empty(n, dtype=dt)


def variants():
    V, N = 128256, 16384
    f32, i64, i32, i8 = torch.float32, torch.int64, torch.int32, torch.int8
    for dt, all_opts in ((torch.bfloat16, False), (torch.float32, True)):
        block, warps, single = C._config(V, t(dt).element_size(), "ce")
        sm_block, sm_warps, sm_single = C._config(V, t(dt).element_size(), "softmax")
        bw_block, bw_warps, bw_single = C._config(V, t(dt).element_size(), "softmax_bwd")
        x = t(dt)
        ce_args = dict(X=x, OUT=x, LABELS=t(i64), WEIGHT=t(f32), WSUM=t(f32), GCE=t(f32), GZ=t(f32),
                       M_IO=t(f32), R_IO=t(f32), CE=t(f32), FLAG=t(i32, 3), stride_x=V, stride_o=V,
                       stride_gce=0, stride_gz=0, N=N, V=V, ignore_index=-100, eps_hi=0.1, eps_lo=0.0,
                       zl_hi=0.1, zl_lo=0.0, cap_hi=30.0, cap_lo=0.0, it_hi=1.0, it_lo=0.0)
        opts = dict(HAS_WEIGHT=all_opts, HAS_SMOOTH=all_opts, HAS_ZLOSS=all_opts, HAS_SOFTCAP=all_opts,
                    HAS_TEMP=all_opts, IS_F64=False, SINGLE=single, BLOCK=block, PREFETCH=True,
                    EV_KEEP="evict_last", EV_DROP="evict_first")
        for fw, bw in ((True, True), (True, False), (False, True)):
            yield (f"ce {dt} fw={fw} bw={bw} options={all_opts}", C._ce_kernel, ce_args,
                   dict(FORWARD=fw, BACKWARD=bw, **opts), warps)
        yield (f"ce {dt} single-block row", C._ce_kernel, dict(ce_args, V=1000, stride_x=1008, stride_o=1008),
               dict(FORWARD=True, BACKWARD=True, **dict(opts, SINGLE=True, BLOCK=1024)), 4)
        sm_args = dict(X=x, OUT=x, LSE=t(f32), stride_x=V, stride_o=V, N=N, V=V, it_hi=1.0, it_lo=0.0)
        for mode in (0, 1, 2):
            yield (f"softmax fwd {dt} mode={mode}", S._softmax_fwd_kernel, sm_args,
                   dict(MODE=mode, HAS_TEMP=all_opts, IS_F64=False, SINGLE=sm_single, BLOCK=sm_block,
                        PREFETCH=True, EV_KEEP="evict_last", EV_DROP="evict_first"), sm_warps)
        for log in (False, True):
            yield (f"softmax bwd {dt} log={log}", S._softmax_bwd_kernel,
                   dict(Y=x, DY=x, OUT=x, stride_y=V, stride_dy=V, stride_o=V, N=N, V=V),
                   dict(LOG=log, IS_F64=False, SINGLE=bw_single, BLOCK=bw_block, PREFETCH=True,
                        EV_KEEP="evict_last", EV_DROP="evict_first"), bw_warps)
    # linear cross-entropy, the benchmark's bf16 tiles
    dt = torch.bfloat16
    tiles = L._tiles(dt)
    BM, BN, BK, BH = tiles["BM"], tiles["BN"], tiles["BK"], tiles["BH"]
    h, a = t(dt), t(f32)
    N, H, V = 8192, 4096, 128256
    common = dict(IEEE=False, UPCAST=False, IS_F64=False)
    yield ("linear_ce fwd bf16", L._lce_fwd_kernel,
           dict(Hd=h, Wt=h, Bias=a, CW=a, PM=a, PT=a, PS=a, PW=a, PY=a, LABELS=t(i64), N=N, V=V, H=H,
                stride_h=H, stride_w=H, cols_per_split=14336, ignore_index=-100, cap_hi=1.0, cap_lo=0.0,
                it_hi=1.0, it_lo=0.0),
           dict(HAS_BIAS=True, HAS_WEIGHT=True, HAS_SMOOTH=True, HAS_SOFTCAP=False, HAS_TEMP=False, BM=BM,
                BN=BN, BK=BK, **common), 8)
    yield ("linear_ce combine", L._lce_combine_kernel,
           dict(PM=a, PT=a, PS=a, PW=a, PY=a, LABELS=t(i64), CW=a, WSUM=a, CE=a, M_OUT=a, R_OUT=a,
                FLAG=t(i32, 3), N=N, V=V, n_splits=9, ignore_index=-100, eps_hi=0.1, eps_lo=0.0),
           dict(HAS_WEIGHT=True, HAS_SMOOTH=True, IS_F64=False, SP=16), 1)
    for filt in (False, True):
        yield (f"linear_ce dz bf16 filter={filt}", L._lce_dz_kernel,
               dict(Hd=h, Wt=h, Bias=a, CW=a, WSUM=a, LABELS=t(i64), M_IN=a, R_IN=a, GCE=a, GZ=a, DZ=h,
                    SKIP=t(i8), NSKIP=t(i32), N=N, V=V, H=H, c0=0, c1=4096, stride_h=H, stride_w=H,
                    stride_dz=4096, n_vblk=32, stride_gce=0, stride_gz=0, ignore_index=-100, eps_hi=0.0,
                    eps_lo=0.0, zl_hi=0.0, zl_lo=0.0, cap_hi=1.0, cap_lo=0.0, it_hi=1.0, it_lo=0.0,
                    fe_hi=1e-7, fe_lo=0.0),
               dict(HAS_BIAS=False, HAS_WEIGHT=False, HAS_SMOOTH=False, HAS_ZLOSS=False, HAS_SOFTCAP=False,
                    HAS_TEMP=False, FILTER=filt, BM=BM, BN=BN, BK=BK, **common), 8)
        yield (f"linear_ce dW bf16 filter={filt}", L._lce_dw_kernel,
               dict(DZ=h, Hd=h, DW=h, DB=a, SKIP=t(i8), N=N, H=H, vc=4096, c0=0, stride_dz=4096,
                    stride_h=H, stride_dw=H, n_vblk=32),
               dict(HAS_BIAS=True, FILTER=filt, BN=BN, BH=BH, BM=BM, **common), 8)
        yield (f"linear_ce dh bf16 filter={filt}", L._lce_dh_kernel,
               dict(DZ=h, Wt=h, DH_ACC=a, SKIP=t(i8), N=N, H=H, vc=4096, c0=0, stride_dz=4096,
                    stride_w=H, stride_acc=H, n_vblk=32),
               dict(FIRST=False, FILTER=filt, BM=BM, BH=BH, BN=BN, **common), 8)


def main() -> int:
    for name, kernel, args, constexprs, warps in variants():
        try:
            compile_sm90(kernel, args, constexprs, warps)
        except Exception as e:  # report which variant failed, then stop
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            return 1
        print(f"ok {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
