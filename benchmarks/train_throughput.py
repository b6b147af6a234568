"""Training throughput: xailab's loop vs a seed-style PyTorch loop vs the limit, same model and data, one run.

- limit: the fastest bare forward + backward + optimiser step on preloaded, pre-normalised tensors
  (fp32 NCHW, fp32 channels_last, and bf16 autocast + channels_last where the processor runs bf16 natively),
  the fastest of three rounds.
- xailab: ``xailab.train`` (fast mode: the defaults, precision=auto and channels_last where it pays; exact
  mode: fp32 NCHW), images/s of
  its fastest epoch after the first, augmentation included.
- seed-style: a per-sample ``Dataset`` with per-sample transforms through a ``DataLoader``, fp32 NCHW,
  ``loss.item()`` every step — the loop of the seed projects.

Run:  python benchmarks/train_throughput.py --data-dir ../shared/datasets \
          --cifar10-root ../shared/datasets/cifar10-subset [--steps 30] [--models mnist_cnn resnet18]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time

import torch
from torch import nn

from xailab import TrainConfig, create_model, load_dataset, train
from xailab.data.transforms import to_model_input
from xailab.train.loop import bf16_is_fast

DATA = {
    "mnist_cnn": ("mnist", 28),
    "resnet18": ("cifar10", 32),
    "efficient_cnn": ("fashion_mnist", 32),
    "mobilenetv2": ("cifar10", 32),
}


def bare_steps(model_name, ds, batch, steps, channels_last, bf16) -> float:
    """Images/s of bare training steps on one preloaded, normalised batch (the unavoidable work)."""
    torch.manual_seed(0)
    model = create_model(model_name, in_channels=ds.channels, num_classes=ds.num_classes)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = to_model_input(ds["train"].images[:batch], torch.tensor(ds.mean), torch.tensor(ds.std))
    x = x.contiguous(memory_format=fmt)
    y = ds["train"].labels[:batch]
    loss_fn = nn.CrossEntropyLoss()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    return best_rate(step, steps, batch)


def best_rate(step, steps: int, batch: int, rounds: int = 3) -> float:
    """Images/s of the fastest of ``rounds`` rounds of ``steps`` calls (the machine is shared: take the best)."""
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        best = max(best, steps * batch / (time.perf_counter() - t))
    return best


class SeedStyleDataset(torch.utils.data.Dataset):
    """What the seeds do: one sample at a time, transforms per sample in Python."""

    def __init__(self, ds, padding: int, flip: bool):
        self.images, self.labels = ds["train"].images, ds["train"].labels
        self.mean = torch.tensor(ds.mean)[:, None, None]
        self.std = torch.tensor(ds.std)[:, None, None]
        self.padding, self.flip = padding, flip

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].permute(2, 0, 1).float() / 255
        if self.padding:
            p = self.padding
            x = nn.functional.pad(x, (p, p, p, p))
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[:, dy : dy + x.shape[1] - 2 * p, dx : dx + x.shape[2] - 2 * p]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(2)
        return (x - self.mean) / self.std, self.labels[i]


def seed_style(model_name, ds, batch, steps) -> float:
    torch.manual_seed(0)
    model = create_model(model_name, in_channels=ds.channels, num_classes=ds.num_classes).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        SeedStyleDataset(ds, ds.augment.crop_padding, ds.augment.hflip),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
    )
    loss_fn = nn.CrossEntropyLoss()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # reshuffles at each pass
    total = 0.0

    def step():
        nonlocal total
        x, y = next(batches)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()  # the per-step host synchronisation of the seeds

    for _ in range(3):
        step()
    return best_rate(step, steps, batch)


def xailab_loop(model_name, ds, batch, steps, precision) -> float:
    cfg = TrainConfig(
        model=model_name,
        dataset=ds.name,
        epochs=2,
        batch_size=batch,
        train_limit=steps * batch,
        val_fraction=0.0,
        precision=precision,
        channels_last=precision != "fp32",
    )
    # A small test split: the benchmark times training, not the final evaluation.
    small = dataclasses.replace(
        ds, splits={"train": ds["train"], "test": ds["test"].subset(torch.arange(512))}
    )
    with tempfile.TemporaryDirectory() as out:
        run = train(cfg, out_dir=out, dataset=small, progress=False)
    return max(r["images_per_s"] for r in run.history[1:])  # epoch 1 includes one-off warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir")
    p.add_argument("--models", nargs="+", default=["mnist_cnn", "resnet18"])
    p.add_argument("--cifar10-root", help="a CIFAR-10 batch folder (e.g. ../shared/datasets/cifar10-subset)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    bf16 = bf16_is_fast(torch.device("cpu"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {bf16}, batch {args.batch}, "
        f"{args.steps} timed steps"
    )
    for name in args.models:
        dataset, size = DATA.get(name, ("cifar10", 32))
        ds = load_dataset(
            dataset,
            data_dir=args.data_dir,
            root=args.cifar10_root if dataset == "cifar10" else None,
            image_size=size,
        )
        limits = {
            "fp32 NCHW": bare_steps(name, ds, args.batch, args.steps, False, False),
            "fp32 channels_last": bare_steps(name, ds, args.batch, args.steps, True, False),
        }
        if bf16:
            limits["bf16 channels_last"] = bare_steps(name, ds, args.batch, args.steps, True, True)
        limit_name, limit = max(limits.items(), key=lambda kv: kv[1])
        fast = xailab_loop(name, ds, args.batch, args.steps, "auto")
        exact = xailab_loop(name, ds, args.batch, args.steps, "fp32")
        seed = seed_style(name, ds, args.batch, args.steps)
        print(f"\n{name} on {dataset} ({size}x{size}), images/s:")
        for k, v in limits.items():
            print(f"  bare step {k:<20} {v:8.1f}")
        print(
            f"  xailab fast mode             {fast:8.1f}   {fast / limit:.2f}x the limit ({limit_name}), "
            f"{fast / seed:.2f}x the seed-style loop"
        )
        print(
            f"  xailab exact fp32            {exact:8.1f}   {exact / limits['fp32 NCHW']:.2f}x bare fp32 NCHW, "
            f"{exact / seed:.2f}x the seed-style loop"
        )
        print(f"  seed-style DataLoader loop   {seed:8.1f}")


if __name__ == "__main__":
    main()
