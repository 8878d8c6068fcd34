"""The host buffer a step's inputs are packed into, and their one copy to the device.

On CUDA the buffer is pinned and the copy non-blocking, so the host never waits for the GPU to take its
inputs; the buffer is reused every step, so before refilling it the host waits for the previous step's copy
(an event recorded after it: long done by then, since that step's sampled tokens were read after it). On the
CPU (no pinning there) the same code runs, and the "copy" is the buffer itself."""
from __future__ import annotations

import numpy as np
import torch


class Staging:
    def __init__(self, device: torch.device, size: int = 1 << 14):
        self.device = device
        self.pinned = device.type == "cuda"
        self._copied = torch.cuda.Event() if self.pinned else None
        self._allocate(size)

    def _allocate(self, size: int) -> None:
        self.host = torch.empty(size, dtype=torch.int64, pin_memory=self.pinned)
        self.array: np.ndarray = self.host.numpy()   # what the packer writes into

    def reserve(self, size: int) -> np.ndarray:
        """The buffer, free to be written and at least `size` long (grown by doubling)."""
        if self._copied is not None:
            self._copied.synchronize()
        if size > len(self.array):
            self._allocate(max(size, 2 * len(self.array)))
        return self.array

    def upload(self, size: int) -> torch.Tensor:
        """Its first `size` elements on the device (pinned + non_blocking on CUDA: no host wait)."""
        on_device = self.host[:size].to(self.device, non_blocking=True)   # (a no-op on the CPU)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device))   # the stream the copy went on
        return on_device
