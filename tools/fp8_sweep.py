"""Sweep grouped_gemm_fp8 tile configs per GEMM of the FP8 expert forward (one GPU), and profile the forward."""
import json, os, sys, itertools
import torch, triton
from triton.testing import do_bench
from moekit.kernels import grouped_gemm_fp8 as g8
from moekit.kernels.grouped_gemm import grouped_gemm
from moekit.quantize import FP8

out_dir = os.environ.get("OUT", "out")
dev = torch.device("cuda")
T = 8192
models = {"mixtral": (4096, 14336, 8, 2), "deepseek_v3": (7168, 2048, 256, 8)}
cfgs = [(64, 128, 4, 4), (64, 256, 8, 3), (64, 256, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (128, 128, 4, 4)]
results = []
def fp8(*shape):
    return (torch.randn(*shape, device=dev) * 0.5).to(FP8)
for name, (H, F, E, K) in models.items():
    M = T * K
    offsets = torch.linspace(0, M, E + 1, device=dev).round().to(torch.int32)
    for gemm in ("gate_up", "down"):
        Kd, N = (H, 2 * F) if gemm == "gate_up" else (F, H)
        a = fp8(M, Kd); b = fp8(E, N, Kd)
        flops = 2 * M * N * Kd
        for scheme in (("block", "row") if name == "mixtral" else ("block",)):
            a_blocked = scheme == "block" or gemm == "down"
            a_scale = torch.rand(M, triton.cdiv(Kd, 128) if a_blocked else 1, device=dev) + 0.5
            b_scale = torch.rand(E, *((triton.cdiv(N, 128), triton.cdiv(Kd, 128)) if scheme == "block" else (N, 1)), device=dev) + 0.5
            swiglu = gemm == "gate_up"; n_out = N // 2 if swiglu else N
            out = torch.empty(M, n_out, device=dev, dtype=FP8 if swiglu else torch.bfloat16)
            out_scale = torch.ones(M, triton.cdiv(n_out, 128), device=dev)
            row_scale = torch.rand(M, device=dev)
            for bm, bn, w, s in cfgs:
                if bm * bn * (2 if swiglu else 1) > 128 * 32 * w: continue
                def call():
                    g8._grouped_gemm_fp8_kernel.fn[(132,)](
                        a, a_scale, b, b_scale, offsets, row_scale, out, out_scale, E, N, Kd, n_out,
                        a.stride(0), a_scale.stride(0), b.stride(0), b.stride(1), b_scale.stride(0), b_scale.stride(1),
                        out.stride(0), out_scale.stride(0), 0, A_BLOCKED=a_blocked, B_BLOCKED=scheme == "block",
                        SWIGLU=swiglu, HAS_ROW_SCALE=not swiglu, QUANTIZE_OUT=swiglu, SCALE_BLOCK=128, FP8_MAX=448.0,
                        BLOCK_E=triton.next_power_of_2(E), GROUP_M=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128,
                        num_warps=w, num_stages=s)
                try:
                    ms = do_bench(call, warmup=10, rep=50)
                except Exception as exc:
                    print(name, gemm, scheme, (bm, bn, w, s), "failed", type(exc).__name__, str(exc)[:100]); continue
                r = dict(model=name, gemm=gemm, scheme=scheme, cfg=(bm, bn, w, s), ms=ms, tflops=flops / ms / 1e9)
                results.append(r)
            best = sorted([r for r in results if r["model"] == name and r["gemm"] == gemm and r["scheme"] == scheme], key=lambda r: r["ms"])[:4]
            print(name, gemm, scheme, [(r["cfg"], round(r["ms"], 3), round(r["tflops"])) for r in best], flush=True)
        ab = torch.randn(M, Kd, device=dev, dtype=torch.bfloat16); bb = torch.randn(E, N, Kd, device=dev, dtype=torch.bfloat16)
        ms = do_bench(lambda: grouped_gemm(ab, bb, offsets, swiglu=gemm == "gate_up"), warmup=10, rep=50)
        print(name, gemm, "bf16 grouped_gemm", round(ms, 3), round(flops / ms / 1e9), flush=True)
        results.append(dict(model=name, gemm=gemm, scheme="bf16", ms=ms, tflops=flops / ms / 1e9))
        del a, b, ab, bb
json.dump(results, open(f"{out_dir}/fp8_sweep.json", "w"), indent=1)

# where the whole forward's time goes
from torch.profiler import profile, ProfilerActivity
from moekit.experts.registry import FP8_EXPERT_BACKENDS
from moekit.problem import make_problem
from moekit.quantize import quantize_weights
from moekit.config import MoEConfig
for name in ("mixtral",):
    H, F, E, K = models[name]
    cfg = MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=K, dtype=torch.bfloat16)
    problem = make_problem(cfg, T, device=dev)
    q = quantize_weights(problem.weights, "block")
    ids = torch.argsort(torch.rand(T, E, device=dev), dim=1)[:, :K].to(torch.int32)
    w = torch.softmax(torch.randn(T, K, device=dev), -1)
    fn = FP8_EXPERT_BACKENDS.get("triton_grouped_fp8").fn
    for _ in range(3):
        fn(problem.x, ids, w, q)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn(problem.x, ids, w, q)
        torch.cuda.synchronize()
    print(name, prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)
    del q
