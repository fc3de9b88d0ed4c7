"""Perf-case sizes: small on the CPU (CI's 2 cores), sizes that fill an H100/H200 on the GPU."""

import torch

GPU = torch.cuda.is_available()

# routers: DeepSeek-V3's router (E = 256, K = 8) over a large batch on GPU
ROUTER_TOKENS, ROUTER_EXPERTS, ROUTER_TOPK = (16384, 256, 8) if GPU else (2048, 64, 8)
# experts: Mixtral's shape on GPU (E = 8, K = 2, H = 4096, F = 14336), a small one on CPU
EXPERT_TOKENS, EXPERT_SHAPE = (
    (4096, dict(hidden_size=4096, ffn_size=14336, num_experts=8, top_k=2))
    if GPU
    else (256, dict(hidden_size=256, ffn_size=384, num_experts=8, top_k=2))
)
DTYPE = torch.bfloat16 if GPU else torch.float32
