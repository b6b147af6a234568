"""Localisation: does the map put its relevance where the ground truth says the evidence is?

Every metric here scores maps ``[B, 1, H, W]`` against a ground-truth mask ``[B, 1, H, W]`` (bool or 0/1,
given as ``mask=``), batched in torch on the maps' device, one score per image ``[B]``; higher is better
for all of them. A map equal to the mask scores 1 (top-k intersection: when ``k`` is at most the mask's
area), its complement 0, and a map that says nothing (uniform) scores chance: the mask's share of the
pixels (AUC: 0.5; the size-weighted variants: 1).

Ties are broken in expectation, not by sort order: where several pixels share the highest value (the
pointing game) or the k-th highest value (rank accuracy, top-k intersection), the score is the average
over every way of choosing among them. Quantus picks among tied pixels by its sort order (so a uniform map
scores perfectly in its pointing game); on maps without ties both give the same numbers, which the parity
tests check.

``focus`` (Arias-Duart et al. 2022) needs no annotation: ``mosaics`` builds 2x2 mosaics from labelled test
images and the mask of the quadrants that hold the target class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.metrics.base import average_ranks, register_metric

LOCALISATION_METRICS = (
    "pointing_game",
    "attribution_localisation",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection",
    "localisation_auc",
)


def check_mask(mask: Tensor | None, attributions: Tensor) -> Tensor:
    """``mask`` as bool ``[B, 1, H, W]`` on the maps' device, or a ConfigError naming what is wrong: no mask,
    a shape other than the maps' ``[B, 1, H, W]`` (``[B, H, W]`` is accepted), values other than 0/1, or an
    image whose mask is empty (nothing to localise)."""
    if mask is None:
        raise ConfigError(
            "localisation metrics need the ground truth: pass mask=<[B, 1, H, W] bool tensor> "
            "(e.g. the marker masks of xailab.data.shortcut)"
        )
    b, _, h, w = attributions.shape
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or tuple(mask.shape) != (b, 1, h, w):
        raise ConfigError(
            f"mask has shape {tuple(mask.shape)} for maps of shape {tuple(attributions.shape)}; give one "
            f"[1, H, W] mask per map, i.e. [{b}, 1, {h}, {w}]"
        )
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ConfigError("mask must be boolean or hold only 0 and 1")
        mask = mask != 0
    mask = mask.to(attributions.device)
    empty = (~mask.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ConfigError(
            f"the mask of image(s) {empty[:10]} is empty: localisation needs at least one ground-truth pixel "
            "per image (leave unmarked images out)"
        )
    return mask


def _flat(attributions: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Maps ``[B, N]`` in float64 and the checked mask ``[B, N]`` bool."""
    if attributions.ndim == 3:
        attributions = attributions[:, None]
    if attributions.ndim != 4:
        raise ConfigError(f"attributions must be [B, 1, H, W], got shape {tuple(attributions.shape)}")
    if attributions.shape[1] != 1:
        attributions = attributions.sum(1, keepdim=True)  # per-channel maps: summed, as xailab.explain does
    m = check_mask(mask, attributions)
    return attributions.flatten(1).double(), m.flatten(1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with NaN where ``den`` is 0 (a map without positive relevance localises nothing)."""
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den != 0, num / safe, torch.nan)


def top_hits(a: Tensor, m: Tensor, k: Tensor) -> Tensor:
    """Expected number of mask pixels among the ``k`` ``[B]`` highest of ``a`` ``[B, N]`` (``m`` ``[B, N]``
    bool), pixels tied at the k-th value shared in proportion: ``[B]`` float64."""
    values = a.sort(dim=1, descending=True).values
    threshold = values.gather(1, (k - 1).clamp(0, a.shape[1] - 1)[:, None])
    above = a > threshold
    tied = a == threshold
    slots = k.double() - above.sum(1).double()  # places left for the pixels tied at the threshold
    return (above & m).sum(1).double() + slots * (tied & m).sum(1).double() / tied.sum(1).double()


def dilate(mask: Tensor, radius: float) -> Tensor:
    """``mask`` ``[B, 1, H, W]`` grown by every pixel within Euclidean distance ``radius``: ``[B, 1, H, W]``."""
    r = int(radius)
    if r < 1:
        return mask
    offsets = torch.arange(-r, r + 1, device=mask.device, dtype=torch.float32)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).float()[None, None]
    return torch.nn.functional.conv2d(mask.float(), disk, padding=r) > 0


@register_metric(
    "pointing_game",
    better="higher",
    description="Pointing game (Zhang et al. 2018): whether the map's maximum lies in the mask, grown by a tolerance.",
)
def pointing_game(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    mask: Tensor | None = None,
    tolerance: float = 0.0,
) -> Tensor:
    """Pointing game (Zhang et al. 2018): 1 when the map's maximum lies in the mask (grown by ``tolerance``
    pixels, Euclidean; the paper uses 15 at ImageNet resolution), else 0. ``[B]``

    Where several pixels share the maximum, the score is the share of them that hit (the chance that one
    picked at random does), so a uniform map scores the mask's share of the image; Quantus counts a hit if
    any of them does (and has no tolerance), which only differs on ties.
    """
    a, m = _flat(attributions, mask)
    if tolerance < 0:
        raise ConfigError(f"tolerance={tolerance!r} must be >= 0 (pixels)")
    if tolerance > 0:
        m = dilate(m.view(attributions.shape[0], 1, *attributions.shape[-2:]), tolerance).flatten(1)
    top = a == a.max(1, keepdim=True).values
    return ((top & m).sum(1).double() / top.sum(1).double()).float()


@register_metric(
    "attribution_localisation",
    better="higher",
    description="Attribution localisation (Kohlbrenner et al. 2020): the share of the positive relevance inside the mask.",
)
def attribution_localisation(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    mask: Tensor | None = None,
    weighted: bool = False,
) -> Tensor:
    """Attribution localisation (Kohlbrenner et al. 2020): the share of the positive relevance that lies in
    the mask, ``mu = R_in / R_tot``. ``[B]``

    With ``weighted``, the paper's size-weighted ``mu_w = mu * S_tot / S_in`` (pixels of the image over
    pixels of the mask), which is 1 for a uniform map whatever the mask's size. Quantus's ``weighted``
    multiplies by the inverse ratio (and takes the image size from the batch array), and by default uses
    ``|a|`` instead of the positive part: xailab follows the paper. NaN for a map without positive relevance.
    """
    a, m = _flat(attributions, mask)
    pos = a.clamp_min(0)
    mu = _ratio((pos * m).sum(1), pos.sum(1))
    if weighted:
        mu = mu * m.shape[1] / m.sum(1).double()
    return mu.float()


@register_metric(
    "relevance_mass_accuracy",
    better="higher",
    description="Relevance mass accuracy (Arras et al. 2022): the relevance inside the mask over the whole image's.",
)
def relevance_mass_accuracy(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    mask: Tensor | None = None,
    positive: bool = True,
) -> Tensor:
    """Relevance mass accuracy (Arras et al. 2022): the relevance inside the mask over the relevance of
    the whole image, ``R_within / R_total``. ``[B]``

    As in the paper, only positive relevance counts (``positive=False``: the signed sums, as Quantus, which
    can leave [0, 1] when a map has negative parts). NaN when the total is 0.
    """
    a, m = _flat(attributions, mask)
    if positive:
        a = a.clamp_min(0)
    return _ratio((a * m).sum(1), a.sum(1)).float()


@register_metric(
    "relevance_rank_accuracy",
    better="higher",
    description="Relevance rank accuracy (Arras et al. 2022): the share of the K top-ranked pixels inside the mask of K pixels.",
)
def relevance_rank_accuracy(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Relevance rank accuracy (Arras et al. 2022): with ``K`` the mask's size, the share of the ``K``
    highest-ranked pixels that lie in the mask. ``[B]``

    Pixels tied at the K-th value share the remaining places in proportion (Quantus takes them in its sort
    order), so a uniform map scores the mask's share of the image.
    """
    a, m = _flat(attributions, mask)
    k = m.sum(1)
    return (top_hits(a, m, k) / k.double()).float()


def top_k_count(k: int | float, pixels: int) -> int:
    """``k`` as a pixel count: an int as is, a float in (0, 1) as that share of ``pixels`` (at least 1)."""
    if (
        isinstance(k, bool)
        or k <= 0
        or (isinstance(k, float) and k >= 1)
        or (isinstance(k, int) and k > pixels)
    ):
        raise ConfigError(
            f"k={k!r} must be a pixel count in 1..{pixels} or a share of the pixels in (0, 1), e.g. k=0.05"
        )
    return int(k) if isinstance(k, int) else max(1, round(k * pixels))


@register_metric(
    "top_k_intersection",
    better="higher",
    description="Top-k intersection (Theiner et al. 2021): the share of the map's k highest pixels inside the mask.",
)
def top_k_intersection(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    mask: Tensor | None = None,
    k: int | float = 0.05,
    concept_influence: bool = False,
) -> Tensor:
    """Top-k intersection (Theiner et al. 2021): the share of the map's ``k`` highest pixels that lie in
    the mask (``k``: a pixel count, or a share of the image's pixels, default 5%). ``[B]``

    Reaches 1 only when ``k`` is at most the mask's area. ``concept_influence``: divided by the mask's share
    of the image (as Quantus), so a uniform map scores 1. Ties at the k-th value are shared in proportion.
    """
    a, m = _flat(attributions, mask)
    count = top_k_count(k, a.shape[1])
    score = top_hits(a, m, torch.full_like(m[:, 0], count, dtype=torch.long)) / count
    if concept_influence:
        score = score * m.shape[1] / m.sum(1).double()
    return score.float()


@register_metric(
    "localisation_auc",
    better="higher",
    description="AUC: the chance that a random mask pixel outranks a random pixel outside the mask (ROC area).",
)
def localisation_auc(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """AUC (Fawcett 2006, as Quantus's ``AUC``): the area under the ROC curve of the map's values as a
    detector of the mask's pixels, i.e. the chance that a random mask pixel outranks a random pixel outside
    it (ties count half). ``[B]``; NaN where the mask covers the whole image.
    """
    a, m = _flat(attributions, mask)
    ranks = average_ranks(a)
    p = m.sum(1).double()
    n = m.shape[1] - p
    u = (ranks * m).sum(1) - p * (p + 1) / 2  # Mann-Whitney U of the mask pixels
    return _ratio(u, p * n).float()


@register_metric(
    "focus",
    better="higher",
    description="Focus (Arias-Duart et al. 2022): the share of the positive relevance on the target class's quadrants of a 2x2 mosaic.",
)
def focus(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    attributions: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Focus (Arias-Duart et al. 2022): on 2x2 mosaics (``mosaics``), the share of the positive relevance
    that falls on the quadrants holding the target class. ``[B]``; ``mask``: those quadrants.

    A map that ignores the image scores the target quadrants' share (0.5 with two of four).

    Quantus 0.6's ``Focus`` computes the same ratio from the four quadrant flags (``custom_batch``) but
    divides by the positive total plus 1e-9: on a map without positive relevance it scores 0 (a map that
    points nowhere would count as pointing away from the target), where xailab gives NaN, as
    ``attribution_localisation`` does; on every other map the two agree (the tests check both).
    """
    a, m = _flat(attributions, mask)
    pos = a.clamp_min(0)
    return _ratio((pos * m).sum(1), pos.sum(1)).float()


@dataclass(frozen=True)
class Mosaics:
    """2x2 mosaics for Focus. ``inputs`` ``[M, C, 2H, 2W]``; ``targets`` ``[M]`` (the class two of the four
    tiles show); ``mask`` ``[M, 1, 2H, 2W]`` bool (those two tiles); ``index`` ``[M, 4]`` (the source images
    in reading order: top left, top right, bottom left, bottom right)."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    index: Tensor


def mosaics(images: Tensor, labels: Tensor, n: int, seed: int = 0) -> Mosaics:
    """``n`` mosaics of ``images`` ``[N, C, H, W]`` (labels ``[N]``), as Arias-Duart et al.: each holds two
    images of one class (the target) and two of other classes at random places. Seeded.

    The model must accept ``2H x 2W`` inputs (every xailab CNN with global pooling does).
    """
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ConfigError(
            f"mosaics need images [N, C, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    g = torch.Generator().manual_seed(seed)
    labels_cpu = labels.cpu()
    classes = [c for c in labels_cpu.unique().tolist() if (labels_cpu == c).sum() >= 2]
    if not classes or len(labels_cpu.unique()) < 2:
        raise ConfigError("mosaics need at least two classes and two images of one of them")
    rows, targets = [], []
    for _ in range(n):
        c = classes[int(torch.randint(len(classes), (1,), generator=g))]
        same = (labels_cpu == c).nonzero().flatten()
        other = (labels_cpu != c).nonzero().flatten()
        pick_same = same[torch.randperm(len(same), generator=g)[:2]]
        pick_other = other[torch.randint(len(other), (2,), generator=g)]
        order = torch.randperm(4, generator=g)
        rows.append(torch.cat([pick_same, pick_other])[order])
        targets.append(c)
    index = torch.stack(rows)  # [M, 4]
    target_t = torch.tensor(targets)
    tiles = images[index.to(images.device)]  # [M, 4, C, H, W]
    top = torch.cat([tiles[:, 0], tiles[:, 1]], dim=-1)
    bottom = torch.cat([tiles[:, 2], tiles[:, 3]], dim=-1)
    inputs = torch.cat([top, bottom], dim=-2)
    h, w = images.shape[-2:]
    is_target = (labels_cpu[index] == target_t[:, None]).to(images.device)  # [M, 4]
    quads = is_target.view(-1, 2, 2).repeat_interleave(h, 1).repeat_interleave(w, 2)
    return Mosaics(inputs, target_t.to(labels.device), quads[:, None], index)
