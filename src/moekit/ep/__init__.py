"""Expert parallelism: dispatch tokens to the ranks that own their experts and combine the results.

Paths, registered by name in DISPATCHERS (registration order is table order):
  nccl      variable-size all_to_all_single (any torch.distributed backend: NCCL, gloo)
  nvshmem_triton  Triton kernels store rows into the peers' symmetric buffers and signal (CUDA; on the CPU
            only with every rank simulated in one process)
  padded    fixed-size messages: M slots per pair, zero-padded, M agreed per step or fixed
  padded_triton  padded's messages, put by a Triton kernel into the peers' symmetric buffers (CUDA)
  skip_a2a  one rank, no communication (the nccl path restricted to a group of one)
  symm_mem  torch symmetric memory's NVSHMEM all_to_all_vdev_2d / _2d_offset (CUDA, 2 ranks or more)
  symmetric the FlashMoE layout: one row per (token, expert) at a slot every rank computes, capacity per
            (source rank, expert), overflow raised or dropped and counted
  symmetric_triton  the symmetric layout, its rows stored by a Triton kernel into the peers' symmetric
            buffers (CUDA; on the CPU only with every rank simulated in one process)
"""

# registration order is the order of the tables (I001 would sort it)
from moekit.ep import nccl, nvshmem_triton, padded, padded_triton, skip_a2a, symm_mem, symmetric, symmetric_triton  # noqa: F401
from moekit.ep.base import Dispatcher
from moekit.ep.forward import ep_forward
from moekit.ep.handle import DispatchHandle, RecvMeta
from moekit.ep.registry import DISPATCHERS

__all__ = ["DISPATCHERS", "DispatchHandle", "Dispatcher", "RecvMeta", "ep_forward"]
