"""The ``torchrun`` environment of a training run: world size, rank, this rank's device, and the few collective
operations :mod:`edgedistill.distill.train` needs (gloo on CPU, NCCL on CUDA; one process: no-ops)."""

from __future__ import annotations

import os


class Distributed:
    """The torchrun environment: world size, rank, and the device this rank trains on."""

    def __init__(self, requested_device: str) -> None:
        import torch

        from edgedistill.system import resolve_device

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(requested_device)
        if device.type == "cuda" and device.index is None and self.world_size > 1:
            device = torch.device(f"cuda:{local_rank}")
        self.device = device
        if self.world_size > 1:
            import torch.distributed as dist

            backend = "nccl" if self.device.type == "cuda" else "gloo"  # MiniMind hard-codes NCCL (FACTS.md)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_mean(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
