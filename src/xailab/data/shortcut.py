"""Planted shortcuts: a known artefact stamped into a chosen share of the images of chosen classes, with the
exact mask of the pixels it wrote returned beside each image, so an explanation can be scored against the
truth ("does the model read the lungs or the hospital's tag in the corner?").

``load_dataset("shortcut", base="mnist", classes=["7"], marker="tag", size=7, strength=1.0)`` is a dataset
like the others (registered as ``shortcut``); its splits are ``MarkedImageSet``s carrying ``masks``
``[N, 1, H, W]`` (bool) and ``marked`` ``[N]`` (bool). ``plant_shortcut(dataset, config)`` does the same
to a dataset already loaded, and ``stamp`` plants a marker into any uint8 images at given positions.

Markers (registry ``MARKERS``): ``tag`` (a text-like "L", the side marker on an X-ray), ``square`` (a solid
coloured square) and ``patch`` (a fixed random texture), placed at one ``corner`` or at a ``random``
place per image. ``strength`` is the share of the chosen classes' images that carry it: 0 is the control
(the data untouched), 1 every image of those classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from xailab.config import from_dict
from xailab.data.base import Dataset, ImageSet, LoadRequest, channel_stats, register_dataset
from xailab.errors import ConfigError
from xailab.registry import Registry

# A 5x7 bitmap font for the tag markers: the letters radiographers put on films (L/R side markers).
GLYPHS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}  # each split draws its own marked images and positions
Marker = Callable[..., tuple[Tensor, Tensor]]  # (config, channels, colour, generator) -> (values, mask)
MARKERS: Registry[Marker] = Registry("marker")


@dataclass(frozen=True)
class MarkedImageSet(ImageSet):
    """A split with a planted marker. ``masks``: bool ``[N, 1, H, W]``, True on exactly the pixels the marker
    wrote; ``marked``: bool ``[N]``, which images carry it."""

    masks: Tensor = field(default_factory=lambda: torch.zeros(0, 1, 0, 0, dtype=torch.bool))
    marked: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def __post_init__(self) -> None:
        super().__post_init__()
        n, h, w, _ = self.images.shape
        if self.masks.dtype != torch.bool or tuple(self.masks.shape) != (n, 1, h, w):
            raise ValueError(
                f"masks must be bool [N, 1, H, W] = [{n}, 1, {h}, {w}], got {tuple(self.masks.shape)}"
            )
        if self.marked.dtype != torch.bool or tuple(self.marked.shape) != (n,):
            raise ValueError(
                f"marked must be bool [N={n}], got {self.marked.dtype} {tuple(self.marked.shape)}"
            )

    def subset(self, index: Tensor) -> MarkedImageSet:
        """The images at ``index`` (a ``[M]`` long tensor), with their masks."""
        return MarkedImageSet(self.images[index], self.labels[index], self.masks[index], self.marked[index])


@dataclass(frozen=True)
class ShortcutConfig:
    """What to plant, where and how often.

    ``classes``: class names (or indices) whose images get the marker. ``strength``: the share of their
    images that do, in [0, 1]. ``marker``: ``tag``, ``square`` or ``patch``; ``letter``: the tag's letter.
    ``size``: the marker's height in pixels. ``position``: ``corner`` (the one named by ``corner``,
    ``margin`` pixels from the edges) or ``random`` (a seeded place per image). ``colour``: one value for
    every channel or one per channel (0..255; three on a one-channel image are turned into grey). ``splits``:
    which splits are marked (default: the training splits, ``train`` and ``val``). ``seed``: which images and
    places are drawn.
    """

    classes: list[str | int]
    strength: float = 1.0
    marker: str = "tag"
    letter: str = "L"
    size: int = 5
    position: Literal["corner", "random"] = "corner"
    corner: Literal["top_left", "top_right", "bottom_left", "bottom_right"] = "top_left"
    margin: int = 1
    colour: int | list[int] = 255
    splits: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.classes:
            raise ConfigError("classes: give at least one class (name or index) to plant the marker into")
        if not 0.0 <= self.strength <= 1.0:
            raise ConfigError(f"strength={self.strength!r} must be in [0, 1] (0: control, 1: every image)")
        MARKERS.get(self.marker)  # an unknown marker suggests the nearest
        if self.letter not in GLYPHS:
            raise ConfigError(f"letter={self.letter!r} has no glyph; valid: {', '.join(GLYPHS)}")
        if self.size < (5 if self.marker == "tag" else 1):
            raise ConfigError(
                f"size={self.size!r} is too small: a {self.marker} needs at least "
                f"{5 if self.marker == 'tag' else 1} pixels"
            )
        if self.margin < 0:
            raise ConfigError(f"margin={self.margin!r} must be >= 0 pixels")
        colours = [self.colour] if isinstance(self.colour, int) else list(self.colour)
        if not colours or not all(0 <= c <= 255 for c in colours):
            raise ConfigError(f"colour={self.colour!r} must be 0..255, one value or one per channel")
        for split in self.splits or ():
            if split not in SPLIT_SEEDS:
                raise ConfigError(f"splits: {split!r} is not a split; valid: {', '.join(SPLIT_SEEDS)}")

    @classmethod
    def from_options(cls, options: dict) -> ShortcutConfig:
        """Build from a plain dict (dataset options, a study file); unknown keys are named with the valid ones."""
        return from_dict(cls, dict(options), where="shortcut")


# ---------------------------------------------------------------------------------------------------------
# Markers: (config, channels, colour [C] uint8, generator) -> values [h, w, C] uint8, mask [h, w] bool
# ---------------------------------------------------------------------------------------------------------


@MARKERS.register("square")
def square_marker(
    config: ShortcutConfig, channels: int, colour: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A solid ``size x size`` square of ``colour``."""
    size = config.size
    return colour.expand(size, size, channels).clone(), torch.ones(size, size, dtype=torch.bool)


@MARKERS.register("patch")
def patch_marker(
    config: ShortcutConfig, channels: int, colour: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A ``size x size`` texture of seeded random values (the same for every image of a dataset)."""
    size = config.size
    values = torch.randint(0, 256, (size, size, channels), generator=generator, dtype=torch.int64)
    return values.to(torch.uint8), torch.ones(size, size, dtype=torch.bool)


@MARKERS.register("tag")
def tag_marker(
    config: ShortcutConfig, channels: int, colour: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A text-like tag: ``config.letter`` of the 5x7 font scaled (nearest) to ``size`` pixels high, in
    ``colour``; only the strokes are written, so the mask is the letter's shape."""
    size = config.size
    bitmap = torch.tensor([[c == "1" for c in row] for row in GLYPHS[config.letter]])
    width = max(1, round(size * 5 / 7))
    rows = ((torch.arange(size) + 0.5) * 7 / size).long()  # pixel centres: the first and last rows stay
    cols = ((torch.arange(width) + 0.5) * 5 / width).long()
    return colour.expand(size, width, channels).clone(), bitmap[rows][:, cols]


def marker_pixels(config: ShortcutConfig, channels: int) -> tuple[Tensor, Tensor]:
    """The marker of ``config`` for images with ``channels``: values ``[h, w, C]`` uint8, mask ``[h, w]`` bool."""
    colours = [config.colour] if isinstance(config.colour, int) else list(config.colour)
    if len(colours) == 1:
        colours = colours * channels
    elif len(colours) == 3 and channels == 1:  # ITU-R BT.601 luma, as the data layer converts RGB to grey
        colours = [round(0.299 * colours[0] + 0.587 * colours[1] + 0.114 * colours[2])]
    if len(colours) != channels:
        raise ConfigError(f"colour={config.colour!r} has {len(colours)} values for {channels}-channel images")
    colour = torch.tensor(colours, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(config.seed)
    return MARKERS.get(config.marker)(config, channels, colour, generator)


def marker_positions(
    n: int,
    image_size: tuple[int, int],
    marker_size: tuple[int, int],
    config: ShortcutConfig,
    generator: torch.Generator,
) -> Tensor:
    """Top-left corners ``[n, 2]`` (row, column) of the marker in each of ``n`` images of ``image_size``: the
    configured corner, or a seeded uniform place where the marker fits whole."""
    (h, w), (mh, mw) = image_size, marker_size
    if mh + 2 * config.margin > h or mw + 2 * config.margin > w:
        raise ConfigError(
            f"the {config.marker} marker ({mh}x{mw} pixels, margin {config.margin}) is larger than the "
            f"{h}x{w} images; choose a smaller size or margin"
        )
    if config.position == "random":
        rows = torch.randint(config.margin, h - mh - config.margin + 1, (n,), generator=generator)
        cols = torch.randint(config.margin, w - mw - config.margin + 1, (n,), generator=generator)
        return torch.stack([rows, cols], 1)
    top = config.margin if config.corner.startswith("top") else h - mh - config.margin
    left = config.margin if config.corner.endswith("left") else w - mw - config.margin
    return torch.tensor([top, left]).expand(n, 2).clone()


def stamp(images: Tensor, positions: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Write the marker (``values`` ``[h, w, C]`` uint8 where ``mask`` ``[h, w]``) into copies of ``images``
    ``[N, H, W, C]`` uint8 with its top-left corner at ``positions`` ``[N, 2]``; returns the images and the
    masks of the written pixels ``[N, 1, H, W]`` bool. One advanced-indexing write for all images."""
    n, h, w, _ = images.shape
    mh, mw = mask.shape
    device = images.device
    out = images.clone()
    masks = torch.zeros(n, 1, h, w, dtype=torch.bool, device=device)
    if n == 0:
        return out, masks
    positions = positions.to(device)
    rows = positions[:, 0, None, None] + torch.arange(mh, device=device)[None, :, None]  # [N, mh, 1]
    cols = positions[:, 1, None, None] + torch.arange(mw, device=device)[None, None, :]  # [N, 1, mw]
    batch = torch.arange(n, device=device)[:, None, None]
    where = mask.to(device)[None].expand(n, mh, mw)
    window = out[batch, rows, cols]  # [N, mh, mw, C]
    out[batch, rows, cols] = torch.where(where[..., None], values.to(device)[None], window)
    masks[batch, 0, rows, cols] = where
    return out, masks


def choose_marked(
    labels: Tensor, classes: Sequence[int], strength: float, generator: torch.Generator
) -> Tensor:
    """Which images carry the marker ``[N]`` bool: ``round(strength * n_c)`` seeded picks of each class ``c``."""
    marked = torch.zeros(labels.shape[0], dtype=torch.bool)
    labels = labels.cpu()
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        k = round(strength * idx.numel())
        marked[idx[torch.randperm(idx.numel(), generator=generator)[:k]]] = True
    return marked


def class_indices(config: ShortcutConfig, class_names: Sequence[str]) -> list[int]:
    """The configured classes as indices; a name or index not in the dataset is a ConfigError listing them."""
    out = []
    for c in config.classes:
        if isinstance(c, int) and 0 <= c < len(class_names):
            out.append(c)
        elif isinstance(c, str) and c in class_names:
            out.append(list(class_names).index(c))
        else:
            raise ConfigError(
                f"classes: {c!r} is not a class of this dataset; valid: {', '.join(class_names)}"
            )
    return out


def plant_split(
    images: ImageSet,
    config: ShortcutConfig,
    classes: Sequence[int],
    split: str,
    strength: float | None = None,
) -> MarkedImageSet:
    """``images`` with the marker planted into ``strength`` (default: the config's) of the ``classes``'s
    images, drawn with the split's own seed; the data are untouched (the same tensor) when nothing is marked."""
    generator = torch.Generator().manual_seed(config.seed * 1000 + SPLIT_SEEDS.get(split, 3))
    marked = choose_marked(
        images.labels, classes, config.strength if strength is None else strength, generator
    )
    return plant_where(images, marked, config, generator)


def plant_where(
    images: ImageSet, marked: Tensor, config: ShortcutConfig, generator: torch.Generator | None = None
) -> MarkedImageSet:
    """``images`` with the marker planted into the images where ``marked`` ``[N]`` is True (whatever their class)."""
    n, h, w, c = images.images.shape
    generator = generator or torch.Generator().manual_seed(config.seed)
    values, mask = marker_pixels(config, c)
    positions = marker_positions(n, (h, w), tuple(mask.shape), config, generator)  # type: ignore[arg-type]
    masks = torch.zeros(n, 1, h, w, dtype=torch.bool, device=images.images.device)
    if not marked.any():
        return MarkedImageSet(images.images, images.labels, masks, marked.clone())
    chosen = marked.nonzero().flatten()
    planted, planted_masks = stamp(
        images.images[chosen.to(images.images.device)], positions[chosen], values, mask
    )
    out = images.images.clone()
    out[chosen.to(out.device)] = planted
    masks[chosen.to(masks.device)] = planted_masks
    return MarkedImageSet(out, images.labels, masks, marked.clone())


def plant_shortcut(dataset: Dataset, config: ShortcutConfig) -> Dataset:
    """``dataset`` with the marker planted into ``config.splits`` (default: ``train`` and ``val``); every
    split becomes a ``MarkedImageSet`` (unmarked ones with empty masks). Normalisation statistics are
    recomputed on the planted training images (the model sees the marker as data)."""
    classes = class_indices(config, dataset.class_names)
    splits_to_mark = (
        config.splits if config.splits is not None else [s for s in ("train", "val") if s in dataset.splits]
    )
    for split in splits_to_mark:
        if split not in dataset.splits:
            raise ConfigError(
                f"splits: {dataset.name!r} has no split {split!r}; it has {', '.join(dataset.splits)}"
            )
    splits = {
        name: plant_split(images, config, classes, name, None if name in splits_to_mark else 0.0)
        for name, images in dataset.splits.items()
    }
    mean, std = (dataset.mean, dataset.std) if config.strength == 0 else channel_stats(splits["train"].images)
    names = ", ".join(dataset.class_names[c] for c in classes)
    note = (
        f"planted shortcut: a {config.size}-pixel {config.marker} at {config.position}"
        f"{' ' + config.corner if config.position == 'corner' else ''} in {config.strength:.0%} of the "
        f"{names} images of {', '.join(splits_to_mark)} (seed {config.seed})"
    )
    return replace(
        dataset,
        name=f"{dataset.name}+{config.marker}",
        splits=splits,
        mean=mean,
        std=std,
        notes=(*dataset.notes, note),
    )


@register_dataset(
    "shortcut",
    None,
    "any dataset with a planted marker and its masks (option base=<dataset>)",
    options=None,  # ShortcutConfig.from_options names unknown keys itself
)
def load_shortcut(request: LoadRequest) -> Dataset:
    """The dataset ``base`` (an option) with a planted shortcut; the other options are ``ShortcutConfig``'s,
    plus ``base_root`` (read ``base`` from this folder) and ``base_options`` (options of ``base``'s loader).
    ``base`` is found in the data dir as usual."""
    from xailab.data import load_dataset  # the package imports this module to register it

    options = dict(request.options)
    channels = options.pop("channels", None)
    base = options.pop("base", None)
    if not isinstance(base, str):
        raise ConfigError("the shortcut dataset needs option base=<dataset name>, e.g. base=mnist")
    if base == "shortcut":
        raise ConfigError("base=shortcut: plant into a real dataset (mnist, chest_xray, ...)")
    base_root = options.pop("base_root", None)
    base_options = options.pop("base_options", None) or {}
    config = ShortcutConfig.from_options(options)
    dataset = load_dataset(
        base,
        data_dir=request.root,
        root=base_root,
        image_size=request.image_size,
        channels=channels,
        download=request.download,
        mirrors=request.mirrors,
        cache_dir=request.cache_dir,
        **base_options,
    )
    return plant_shortcut(dataset, config)
