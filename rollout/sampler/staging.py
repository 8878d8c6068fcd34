"""The host buffer a step's inputs are packed into, and their one copy to the device.

On CUDA the buffer is pinned and the copy non-blocking, so the host never waits for the GPU to take its
inputs. Two buffers take turns: before refilling one, the host waits for the copy made from it two steps ago
(an event recorded after that copy), which is long done (the previous step's sampled tokens were read after
it), even when the previous step sampled nothing and read nothing back. On the CPU (no pinning there) the
same code runs, and the "copy" is the buffer itself."""
from __future__ import annotations

import numpy as np
import torch


class Staging:
    def __init__(self, device: torch.device, size: int = 1 << 14):
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers = [self._allocate(size), self._allocate(size)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()] if self.pinned else None
        self._turn = 0

    def _allocate(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int64, pin_memory=self.pinned)

    def reserve(self, size: int) -> np.ndarray:
        """This step's buffer, free to be written and at least `size` long (grown by doubling), as the array
        the packer writes into."""
        if self._copied is not None:
            self._copied[self._turn].synchronize()
        if size > len(self._buffers[self._turn]):
            self._buffers[self._turn] = self._allocate(max(size, 2 * len(self._buffers[self._turn])))
        return self._buffers[self._turn].numpy()

    def upload(self, size: int) -> torch.Tensor:
        """The first `size` elements of this step's buffer on the device (pinned + non_blocking on CUDA: no
        host wait); the next step packs into the other buffer."""
        on_device = self._buffers[self._turn][:size].to(self.device, non_blocking=True)   # (a no-op on the CPU)
        if self._copied is not None:
            self._copied[self._turn].record(torch.cuda.current_stream(self.device))   # the copy's stream
        self._turn ^= 1
        return on_device
