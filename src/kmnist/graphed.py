"""The whole training step (forward, loss, backward, optimiser, running loss) as one CUDA graph.

On a GPU these small models are bound by kernel launches, not arithmetic: the report's model takes
4.5 ms per eager step on an H200 for microseconds of arithmetic, and compiling the model alone
(`--compile reduce-overhead`) leaves the loss, the optimiser and the bookkeeping launched one by one.
`--compile cuda-graph` records the step once into fixed buffers and replays it: one launch per step
plus copying the batch in. The batch is still made outside (gathering, augmentation); mixup and
cutmix, whose mixing weight changes per step on the host, are refused. Replayed, the step is bound by
how many kernels it holds (0.61 ms per step of the report's model on an H200, one small kernel per
op): `--compile cuda-graph-compiled` captures the model compiled by torch.compile instead, whose
fused kernels are fewer.

The step function runs the same way without capture, so its semantics are tested on a CPU; only the
capture and replay themselves need a GPU.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kmnist.train import Trainer

WARM_UP_STEPS = 3  # real steps before capture (cuDNN/cuBLAS handles, optimiser state), then undone


class GraphedStep:
    """One training step at a fixed batch size, on fixed buffers: `step(images, labels)` copies them in and runs it."""

    def __init__(self, trainer: Trainer, batch_size: int, capture: bool = True):
        self.trainer = trainer
        self.batch_size = batch_size
        device = trainer.device
        self.images = torch.zeros(batch_size, 1, 28, 28, device=device)
        self.labels = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        _lr_as_tensors(trainer.optimizer, device)
        self._warm_up()
        self.graph = None
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._run()
            # Capturing records the kernels without running them: nothing above has changed a weight.

    def _run(self) -> None:
        # The eager step itself, on the fixed buffers; captured, its zero_grad means each replay writes fresh
        # gradients, and no autocast cache, as cached casts of the weights would be stale on the next replay.
        self.trainer.train_step(self.images, self.labels, self.loss_sum, self.correct, autocast_cache=False)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images.copy_(images)
        self.labels.copy_(labels)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()

    def _warm_up(self) -> None:
        """A few real steps on real images (on a side stream on a GPU), all undone, so the captured run computes
        what an eager one does."""
        trainer = self.trainer
        cuda = trainer.device.type == "cuda"
        with trainer.undone():
            images, labels = trainer.first_batch(self.batch_size)
            self.images.copy_(images)
            self.labels.copy_(labels)
            trainer.model.train()
            stream = torch.cuda.Stream() if cuda else None
            if cuda:  # the side stream starts after the copies above
                stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream) if cuda else nullcontext(), warnings.catch_warnings():
                # Adam warns once that a capturable optimiser runs uncaptured: here and for the short batch, on purpose.
                warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
                for _ in range(WARM_UP_STEPS):
                    self._run()
            if cuda:
                torch.cuda.current_stream().wait_stream(stream)
        self.loss_sum.zero_()
        self.correct.zero_()


def _lr_as_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Learning rates as tensors on the device, so schedulers change them in place and a replayed step sees it."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        if "capturable" in group:  # Adam/AdamW: step counts on the device, no host synchronisation
            group["capturable"] = device.type == "cuda"

