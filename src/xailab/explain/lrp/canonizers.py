"""Canonisation: a copy of the model in the form LRP rules assume, with the same outputs.

The user's model is never changed: one probe forward pass of one image runs on it with scoped hooks (removed
also when it raises), and the changes are made to a copy of its modules (``canonical_copy``). What the probe
finds:

- which layers read the model input (directly or through parameter-free operations: a channel repeat, a
  max-pool branch) — they get a composite's ``"first"`` rule;
- which batch norms directly normalise the output of a convolution or linear layer (that output feeding
  nothing else), or directly feed a linear layer: those are merged into it, ``W' = a W``, ``b' = a b + s``
  (or ``W' = W a``, ``b' = W s + b`` before a linear layer), and replaced by ``nn.Identity``;
- whether the forward pass runs under autocast (``explain``'s bf16 mode), so the copy runs the same way.

Residual additions, concatenations, pooling, dropout, flatten and depthwise convolutions need no structural
change: relevance flows through them as a gradient with ``R = a * c`` (see ``rules``), which splits an
addition in proportion to its terms and routes a concatenation back to its parts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.explain.base import preserved_state
from xailab.explain.lrp.rules import AFFINE_TYPES, LINEAR_TYPES, NORM_TYPES, affine_params

# Parameter-free layers whose plain gradient is already the LRP propagation (see ``rules``)
PASS_THROUGH_TYPES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Upsample,
    nn.ZeroPad2d,
)


@dataclass
class Probe:
    """What one forward pass of ``model`` showed: leaf layers with a rule in execution order (``order``),
    those reading the model input (``first``), batch norms to merge as ``(layer, norm, "after" | "before")``,
    the autocast dtype of the forward pass (None: none) and the probe image's logits ``[1, K]``."""

    order: list[str] = field(default_factory=list)
    first: set[str] = field(default_factory=set)
    merges: list[tuple[str, str, str]] = field(default_factory=list)
    autocast: torch.dtype | None = None
    logits: Tensor | None = None


def rule_leaves(model: nn.Module) -> dict[str, nn.Module]:
    """Leaf modules that are not pass-through (they get a rule or raise); ConfigError for a module holding
    parameters of its own beside children (used functionally, so no rule can reach them)."""
    leaves = {}
    for path, module in model.named_modules():
        own = [name for name, _ in module.named_parameters(recurse=False)]
        has_children = next(module.children(), None) is not None
        if has_children and own:
            raise ConfigError(
                f"LRP cannot propagate through module {path or 'model'!r} of type {type(module).__name__}: it "
                f"holds parameters ({', '.join(own)}) used outside any layer with a rule"
            )
        if not has_children and not isinstance(module, PASS_THROUGH_TYPES):
            leaves[path] = module
    return leaves


def probe(model: nn.Module, example: Tensor) -> Probe:
    """Run ``model`` on ``example[:1]`` ``[1, C, H, W]`` in eval mode with scoped hooks (see the module
    docstring); the model's modes are restored afterwards."""
    found = Probe()
    leaves = rule_leaves(model)
    produced: dict[int, tuple[str, Tensor]] = {}  # id of a rule layer's output -> (its path, the tensor)
    consumers: Counter[int] = Counter()
    calls: Counter[str] = Counter()
    fed: dict[str, Tensor] = {}  # path -> its input tensor (kept alive, so ids stay unique)
    device_type = example.device.type

    def before(path: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            if found.logits is None and torch.is_autocast_enabled(device_type):
                found.autocast = torch.get_autocast_dtype(device_type)
            for t in inputs:
                if isinstance(t, Tensor) and id(t) in produced:
                    consumers[id(t)] += 1
            if inputs and isinstance(inputs[0], Tensor):
                fed[path] = inputs[0]

        return hook

    def after(path: str):
        def hook(_module: nn.Module, inputs: tuple, output: object) -> object:
            calls[path] += 1
            if path not in found.order:
                found.order.append(path)
            if inputs and isinstance(inputs[0], Tensor) and not inputs[0].requires_grad:
                found.first.add(path)
            if not isinstance(output, Tensor):
                return None
            # cut from the graph: later layers require grad exactly when they depend on a layer with a rule
            # (a copy of a fresh leaf, which an in-place activation after the layer may change)
            cut = output.detach().requires_grad_(True).clone()
            produced[id(cut)] = (path, cut)
            return cut

        return hook

    handles = []
    try:
        for path, module in model.named_modules():
            if next(module.children(), None) is None:
                handles.append(module.register_forward_pre_hook(before(path)))
        handles += [module.register_forward_hook(after(path)) for path, module in leaves.items()]
        with preserved_state(model), torch.enable_grad():
            logits = model(example[:1].detach())
    finally:
        for handle in handles:
            handle.remove()
    found.logits = logits.detach().float()
    found.merges = _merges(leaves, produced, consumers, calls, fed)
    return found


def _merges(
    leaves: dict[str, nn.Module],
    produced: dict[int, tuple[str, Tensor]],
    consumers: Counter[int],
    calls: Counter[str],
    fed: dict[str, Tensor],
) -> list[tuple[str, str, str]]:
    """Batch norms that directly follow a conv/linear layer (whose output feeds only them), else directly
    feed a linear layer (their output feeding only it); each layer involved ran once."""
    merges, merged = [], set()
    for path, module in leaves.items():
        if not isinstance(module, NORM_TYPES) or calls[path] != 1 or path not in fed:
            continue
        source = produced.get(id(fed[path]))
        if (
            source
            and source[1] is fed[path]
            and isinstance(leaves[source[0]], AFFINE_TYPES)
            and not isinstance(leaves[source[0]], NORM_TYPES)
            and calls[source[0]] == 1
            and consumers[id(fed[path])] == 1
        ):
            merges.append((source[0], path, "after"))
            merged.add(path)
    for path, module in leaves.items():
        if not isinstance(module, LINEAR_TYPES) or calls[path] != 1 or path not in fed:
            continue
        source = produced.get(id(fed[path]))
        if (
            source
            and source[1] is fed[path]
            and source[0] not in merged
            and isinstance(leaves[source[0]], NORM_TYPES)
            and calls[source[0]] == 1
            and consumers[id(fed[path])] == 1
        ):
            merges.insert(
                0, (path, source[0], "before")
            )  # before-merges first: after-merges use their result
            merged.add(source[0])
    return merges


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (``"a.b.c"``) in ``model``."""
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


@torch.no_grad()
def merge_norm(layer: nn.Module, norm: nn.Module, where: str) -> None:
    """Fold batch norm ``norm`` (``a x + s`` per channel) into ``layer``'s weight and bias in place: applied
    ``"after"`` the layer (``a (W x + b) + s``) or ``"before"`` a linear layer (``W (a x + s) + b``)."""
    norm_scale, norm_shift = affine_params(norm)
    scale = norm_scale.detach().float()
    shift = cast(Tensor, norm_shift).detach().float()  # a batch norm's shift is always a tensor
    # ``layer`` is a conv or linear layer (``_merges``): a tensor weight and an optional tensor bias
    old_weight, old_bias = cast(Tensor, layer.weight), cast("Tensor | None", layer.bias)
    weight = old_weight.detach().float()
    bias = (
        old_bias.detach().float()
        if old_bias is not None
        else torch.zeros(weight.shape[0], device=weight.device)
    )
    if where == "after":
        new_weight = weight * scale.view(-1, *([1] * (weight.ndim - 1)))
        new_bias = scale * bias + shift
    else:
        new_weight = weight * scale.view(1, -1)
        new_bias = weight @ shift + bias
    dtype = old_weight.dtype
    layer.weight = nn.Parameter(new_weight.to(dtype), requires_grad=False)
    layer.bias = nn.Parameter(new_bias.to(dtype), requires_grad=False)


def _module_copy(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """A new module object for ``module`` and each submodule (one per shared submodule, ``memo``), their
    attribute dicts (parameter, buffer, submodule and hook tables) copied one level deep, the tensors and other
    attribute values shared: what ``copy.deepcopy`` with every tensor in its memo gives, at a fraction of its
    cost (it walks every attribute of every module through ``__reduce_ex__``)."""
    if id(module) in memo:
        return memo[id(module)]
    twin = object.__new__(type(module))  # no __init__: the state is the module's own, copied below
    memo[id(module)] = twin
    state = vars(twin)
    for key, value in vars(module).items():
        # _parameters, _buffers, _modules, hook tables: the copy's own dicts, holding the same values
        state[key] = value.copy() if isinstance(value, dict) else value
    state["_modules"] = {
        name: None if child is None else _module_copy(child, memo) for name, child in module._modules.items()
    }
    return twin


def canonical_copy(model: nn.Module, found: Probe) -> nn.Module:
    """A copy of ``model``'s modules (sharing its parameters and buffers) in eval mode with ``found``'s batch
    norms merged, and no instance-level ``forward`` (``explain``'s autocast wrapper calls the original model)."""
    # the copy's modules are new, its tensors the model's own (copying DenseNet-169's weights took longer
    # than explaining a batch): nothing below changes a tensor in place, merged layers get new parameters
    twin = _module_copy(model, {})
    vars(twin).pop("forward", None)
    twin.eval()
    for layer_path, norm_path, where in found.merges:
        merge_norm(twin.get_submodule(layer_path), twin.get_submodule(norm_path), where)
        replace_module(twin, norm_path, nn.Identity())
    return twin


def canonize(model: nn.Module, example: Tensor) -> nn.Module:
    """A copy of ``model`` with its batch norms merged into the adjacent convolution or linear layers where
    that is exact (see the module docstring); ``example`` ``[B, C, H, W]`` is an input for the probe.

    The copy maps ``[B, C, H, W]`` to the same logits ``[B, K]`` (up to float rounding); ``model`` is unchanged.
    """
    return canonical_copy(model, probe(model, example))
