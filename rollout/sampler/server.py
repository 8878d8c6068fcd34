"""One engine thread that serves many concurrent callers (agent trajectories) from one Sampler."""
from __future__ import annotations

import threading
from concurrent.futures import Future

import torch

from protege.rollout.sampler.sampling import SamplingParams
from protege.rollout.sampler.sequence import Completion


class SamplerStepError(RuntimeError):
    """A sampler step failed: the engine's failure, not a request's. Every request the step ran gets it."""


class SamplerServer:
    """submit() queues a prompt and returns a Future of its Completion. The engine thread admits queued
    prompts and steps the sampler while any request runs, so every caller waiting for a turn decodes in the
    same batch. A failing step fails the requests it was running and leaves the sampler idle and usable."""

    def __init__(self, sampler):
        self.sampler = sampler
        self._queue: list[tuple[list[int], SamplingParams, Future]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, prompt: list[int], params: SamplingParams) -> Future:
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("SamplerServer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="sampler-server", daemon=True)
                self._thread.start()
            self._queue.append((prompt, params, future))
            self._wake.notify()
        return future

    def generate(self, prompt: list[int], params: SamplingParams) -> Completion:
        return self.submit(prompt, params).result()

    def _serve(self) -> None:
        device = self.sampler.device
        if device.type == "cuda":   # a new thread starts on GPU 0: rank r must sample on its own GPU
            torch.cuda.set_device(device)
        waiting: dict[int, Future] = {}
        while True:
            with self._wake:
                while not self._queue and not waiting and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue and not waiting:
                    return
                queued, self._queue = self._queue, []
            for prompt, params, future in queued:
                try:
                    waiting[self.sampler.add_request(prompt, params)] = future
                except Exception as e:  # noqa: BLE001 -- a bad prompt fails its own caller only
                    future.set_exception(e)
            if not waiting:
                continue
            try:
                finished = self.sampler.step()
            except Exception as e:  # noqa: BLE001 -- fail everyone waiting, then start clean
                self.sampler.abort_all()
                error = SamplerStepError(f"sampler step failed: {type(e).__name__}: {e}")
                error.__cause__ = e
                for future in waiting.values():
                    future.set_exception(error)
                waiting.clear()
                continue
            for output in finished:
                waiting.pop(output.request_id).set_result(output.completions[0])

    def close(self) -> None:
        """Stop the engine thread once the running requests are done (the sampler can then be released)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
