"""Training of the MNIST study: the data as tensors, accuracy, distillation, augmentation and the training loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...data.mnist import MNIST
from ...layers import model_kl
from .config import PIXEL_MEAN, PIXEL_STD, TrainConfig


@dataclass(frozen=True)
class Tensors:
    """The data in memory: normalised ``(N, 784)`` float images and ``(N,)`` labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def to_tensors(data: MNIST, train_limit: int | None = None, test_limit: int | None = None) -> Tensors:
    train, test = data.train.subset(train_limit), data.test.subset(test_limit)
    return Tensors(
        (train.flat_float() - PIXEL_MEAN) / PIXEL_STD,
        train.labels,
        (test.flat_float() - PIXEL_MEAN) / PIXEL_STD,
        test.labels,
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 10000) -> float:
    """Top-1 accuracy in eval mode (Sparse VD layers deterministic, their dropped weights zero)."""
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        correct += int((model(x[start : start + batch_size]).argmax(-1) == y[start : start + batch_size]).sum())
    return correct / max(x.shape[0], 1)


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 KL(softmax(teacher / T) || softmax(logits / T))``, averaged over the batch."""
    student = F.log_softmax(logits / temperature, dim=-1)
    target = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean") * temperature**2


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each flattened 28x28 image by a random whole number of pixels in ``[-shift, shift]`` per axis.

    Args:
        images: ``(B, 784)`` normalised images.
        shift: largest translation in pixels.
        generator: source of the offsets.

    Returns:
        ``(B, 784)`` shifted images, uncovered pixels set to the background value.
    """
    batch = images.shape[0]
    background = -PIXEL_MEAN / PIXEL_STD
    padded = F.pad(images.reshape(batch, 28, 28), (shift, shift, shift, shift), value=background)  # (B, 28+2s, 28+2s)
    rows = torch.randint(0, 2 * shift + 1, (batch, 1), generator=generator) + torch.arange(28)  # (B, 28)
    cols = torch.randint(0, 2 * shift + 1, (batch, 1), generator=generator) + torch.arange(28)  # (B, 28)
    crops = padded[torch.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, 28, 28)
    return crops.reshape(batch, 784)


def fit(
    model: nn.Module,
    data: Tensors,
    train: TrainConfig,
    *,
    seed: int,
    desc: str,
    progress: bool = True,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 4.0,
    kl_weight: Callable[[int], float] | None = None,
) -> None:
    """Train ``model`` in place: Adam, cosine learning-rate decay to zero, shuffled mini-batches.

    The loss is the cross-entropy, mixed with distillation when a ``teacher`` is given:
    ``(1 - kd_alpha) CE + kd_alpha KD`` on the same (possibly shifted) batch. With ``kl_weight`` (step -> weight)
    the Sparse VD term ``kl_weight(step) * KL / N`` is added, which makes the loss the negative ELBO per example.

    Args:
        model: the network (any layers).
        data: the training tensors.
        train: epochs, learning rate, batch size, augmentation.
        seed: seeds the shuffling, the shifts and the layers' noise.
        desc: label of the progress bar.
        progress: show a tqdm progress bar.
        teacher: the original network, for distillation (kept in eval mode, not trained).
        kd_alpha: weight of the distillation term.
        kd_temperature: softmax temperature of the distillation term.
        kl_weight: the KL weight at each step, for Sparse VD.
    """
    n = data.x_train.shape[0]
    steps_per_epoch = math.ceil(n / train.batch_size)
    total = train.epochs * steps_per_epoch
    if total == 0:
        return
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    if teacher is not None:
        teacher.eval()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step", dynamic_ncols=True)
    step = 0
    model.train()
    for _ in range(train.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, train.batch_size):
            index = order[start : start + train.batch_size]
            x = data.x_train[index]  # (B, 784)
            if train.shift:
                x = random_shift(x, train.shift, generator)
            logits = model(x)  # (B, classes)
            loss = F.cross_entropy(logits, data.y_train[index])
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
                loss = (1.0 - kd_alpha) * loss + kd_alpha * distillation_loss(logits, target, kd_temperature)
            if kl_weight is not None:
                loss = loss + kl_weight(step) * model_kl(model) / n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0 or step == total:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
    bar.close()
    model.eval()
