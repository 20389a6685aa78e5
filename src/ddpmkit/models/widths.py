"""Per-layer widths of a structurally pruned network, as plain config data.

A pruned network (compress/prune.py) differs from the one its ModelConfig describes only in
the sizes of some layers. `model.pruned` lists each such layer as one string,
"NAME:A:B" -- NAME the module's dotted name, and the sizes:

    Conv2d, Linear   in:out          GroupNorm  groups:channels
    LayerNorm        channels        Embedding  rows:dim

`record` writes the list by comparing a network with a fresh build of its config; `apply`
replaces the listed layers of a fresh build, so that `build_model` rebuilds a pruned network
from the config alone (the weights then load with weights_only=True; nothing is pickled).
"""
from __future__ import annotations

from torch import nn

from ..errors import DdpmError


def _sizes(module: nn.Module) -> tuple[int, ...] | None:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.GroupNorm):
        return module.num_groups, module.num_channels
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def _resized(old: nn.Module, sizes: tuple[int, ...]) -> nn.Module:
    """A fresh layer of old's kind and settings with the given sizes (weights are loaded afterwards)."""
    if isinstance(old, nn.Conv2d):
        if old.groups != 1:
            raise DdpmError("model.pruned lists a grouped convolution, which pruned networks never have")
        return nn.Conv2d(sizes[0], sizes[1], old.kernel_size, old.stride, old.padding, old.dilation,
                         bias=old.bias is not None, padding_mode=old.padding_mode)
    if isinstance(old, nn.Linear):
        return nn.Linear(sizes[0], sizes[1], bias=old.bias is not None)
    if isinstance(old, nn.GroupNorm):
        return nn.GroupNorm(sizes[0], sizes[1], eps=old.eps, affine=old.affine)
    if isinstance(old, nn.LayerNorm):
        return nn.LayerNorm(sizes, eps=old.eps, elementwise_affine=old.elementwise_affine)
    return nn.Embedding(sizes[0], sizes[1])


def record(model: nn.Module, reference: nn.Module) -> tuple[str, ...]:
    """The "NAME:A:B" entries of every layer of `model` whose sizes differ from `reference`'s."""
    ref = dict(reference.named_modules())
    out = []
    for name, module in model.named_modules():
        sizes = _sizes(module)
        if sizes is not None and name in ref and sizes != _sizes(ref[name]):
            out.append(":".join([name, *map(str, sizes)]))
    return tuple(out)


def apply(model: nn.Module, entries: tuple[str, ...]) -> nn.Module:
    """Resize the layers `entries` (from `record`) name in a freshly built `model`, in place."""
    modules = dict(model.named_modules())
    for entry in entries:
        name, *raw = entry.split(":")
        old = modules.get(name)
        try:
            sizes = tuple(int(v) for v in raw)
        except ValueError:
            sizes = ()
        want = _sizes(old) if old is not None else None
        if want is None or len(sizes) != len(want) or min(sizes, default=0) < 1:
            raise DdpmError(f"model.pruned entry {entry!r} does not name a resizable layer of this model with "
                            "positive sizes; the config was edited or made for another architecture")
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, _resized(old, sizes))
    return model
