"""The PVD variable split: a StableNet's parameters as P blocks of contiguous layers.

Block ``l`` owns the layers ``a_l .. b_l - 1`` of the stack, that is the slices
``stack.weight[a_l:b_l]`` and ``stack.bias[a_l:b_l]`` of the ``(N, d, d)`` and
``(N, d)`` tensors the (fused) stack op takes whole. The input lift belongs to
the first block and the classifier to the last.

All parameters live in one flat vector laid out block by block, so block ``l``
is the contiguous range ``ranges[l]``: a worker's proposal, the direction and
the synchronised point are plain slices, and shared memory needs one storage
per vector rather than one per parameter. :meth:`BlockPartition.unflatten`
turns a flat vector (or a concatenation of per-block pieces that carry
autograd history) back into the named parameters the model's ``forward``
expects, rebuilding each stack tensor whole so the fused kernels see exactly
the shapes they would in plain training.

A multi-stage model (several stacks ``stacks.k``, see
:class:`~stablenets_ext.models.StableNet`) is split over its global layer index
(the stages' layers one after another): a block may own layers of several
stages, and the transition into stage ``k`` belongs to the block that owns the
first layer of stage ``k``. When there are as many blocks as stages the blocks
are the stages (the natural cut).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Segment:
    """The part of one named parameter that one block owns."""

    name: str
    block: int
    offset: int  # position in the flat vector
    shape: tuple  # shape of the piece (leading dim sliced for stack tensors)
    rows: tuple | None = None  # (a, b): the stack tensor's local layers a..b-1, else None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def split_layers(layers: int, blocks: int) -> list[tuple[int, int]]:
    """``blocks`` contiguous, nearly equal layer ranges (the first ones one longer)."""
    if not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"workers: expected a positive int, got {blocks!r}")
    if layers < blocks:
        raise ValueError(
            f"workers: PVD gives each worker at least one layer, but the stack has {layers} "
            f"layers for {blocks} workers; use --layers >= {blocks} or fewer workers"
        )
    base, extra = divmod(layers, blocks)
    out, start = [], 0
    for l in range(blocks):
        stop = start + base + (1 if l < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _owner(name: str, blocks: int, layer_ranges=None, stage_starts=None) -> int | None:
    """Block of a non-stack parameter: lift -> first, classifier -> last, the
    transition into stage k -> the block owning stage k's first layer."""
    head = name.split(".", 1)[0]
    if head == "lift":
        return 0
    if head == "classifier":
        return blocks - 1
    if head == "transitions" and layer_ranges is not None:
        k = int(name.split(".")[1]) + 1
        return _block_of(stage_starts[k], layer_ranges)
    return None


def _block_of(layer: int, layer_ranges) -> int:
    return next(l for l, (a, b) in enumerate(layer_ranges) if a <= layer < b)


def _stacks_of(model) -> list[tuple[str, int]]:
    """``[(parameter prefix, layers)]`` of the model's stacks, in order."""
    prefixes = getattr(model, "stage_prefixes", None)
    if prefixes is not None and getattr(model, "multistage", False):
        return [(p, s.weight.shape[0]) for p, s in zip(prefixes, model.stage_stacks)]
    return [("stack.", model.stack.weight.shape[0])]


class BlockPartition:
    """Maps a model's named parameters to P contiguous blocks of one flat vector."""

    def __init__(self, model: nn.Module, blocks: int):
        stacks_ = getattr(model, "stage_stacks", None)
        stack = stacks_[0] if stacks_ else getattr(model, "stack", None)
        if stack is None or not hasattr(stack, "weight") or stack.weight.dim() < 2:
            raise TypeError(
                "model: PVD expects a StableNet-like module with .lift, .stack (weight of shape "
                f"(layers, ...)) and .classifier; got {type(model).__name__}"
            )
        self.blocks = blocks
        stacks = _stacks_of(model)
        self.prefixes = tuple(p for p, _ in stacks)
        starts = [0]
        for _, n in stacks:
            starts.append(starts[-1] + n)
        self.layers = starts[-1]
        if len(stacks) > 1 and len(stacks) == blocks:  # the natural cut: one block per stage
            self.layer_ranges = list(zip(starts, starts[1:]))
        else:
            self.layer_ranges = split_layers(self.layers, blocks)
        params = dict(model.named_parameters())
        self.names = list(params)
        self.shapes = {k: tuple(v.shape) for k, v in params.items()}
        self.dtype = stack.weight.dtype

        # Segments per block, in a fixed order: lift, stack tensors, classifier.
        per_block: list[list[tuple[str, int, int | None, int | None]]] = [[] for _ in range(blocks)]
        for name, p in params.items():
            k = next((i for i, (prefix, _) in enumerate(stacks) if name.startswith(prefix)), None)
            if k is not None:
                lo, hi = starts[k], starts[k + 1]
                if p.dim() >= 1 and p.shape[0] == hi - lo:
                    for l, (a, b) in enumerate(self.layer_ranges):
                        if max(a, lo) < min(b, hi):  # local layers of stage k in block l
                            per_block[l].append((name, l, max(a, lo) - lo, min(b, hi) - lo))
                else:  # a stack-wide parameter (none today): the block of its first layer
                    owner = _block_of(lo, self.layer_ranges)
                    per_block[owner].append((name, owner, None, None))
                continue
            owner = _owner(name, blocks, self.layer_ranges, starts)
            if owner is None:
                raise TypeError(
                    f"model: parameter {name!r} is neither in .lift, .stack nor .classifier, "
                    "so PVD cannot assign it to a block"
                )
            per_block[owner].append((name, owner, None, None))

        self.segments: list[Segment] = []
        self.ranges: list[tuple[int, int]] = []
        offset = 0
        for l in range(blocks):
            lo = offset
            for name, block, a, b in per_block[l]:
                shape = self.shapes[name]
                if a is not None:
                    shape = (b - a,) + shape[1:]
                seg = Segment(name, block, offset, shape, None if a is None else (a, b))
                self.segments.append(seg)
                offset += seg.numel
            self.ranges.append((lo, offset))
        self.numel = offset
        self._by_name: dict[str, list[Segment]] = {}
        for seg in self.segments:
            self._by_name.setdefault(seg.name, []).append(seg)
        for name in self._by_name:  # segments of one tensor in layer order
            self._by_name[name].sort(key=lambda s: s.block)

    # ------------------------------------------------------------ layouts

    def block_sizes(self) -> list[int]:
        return [hi - lo for lo, hi in self.ranges]

    def owner_index(self, device=None) -> torch.Tensor:
        """``(numel,)`` int64: the block that owns each entry of the flat vector."""
        sizes = torch.tensor(self.block_sizes(), device=device)
        return torch.repeat_interleave(torch.arange(self.blocks, device=device), sizes)

    def flatten(self, tensors: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Named full tensors -> flat vector (written into ``out`` when given)."""
        if out is None:
            first = tensors[self.names[0]]
            out = torch.empty(self.numel, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for seg in self.segments:
                src = tensors[seg.name]
                if src.shape != self.shapes[seg.name]:
                    raise ValueError(
                        f"{seg.name}: expected shape {self.shapes[seg.name]}, got {tuple(src.shape)}"
                    )
                piece = self._slice(src, seg)
                out[seg.offset:seg.offset + seg.numel].copy_(piece.reshape(-1))
        return out

    def _slice(self, full: torch.Tensor, seg: Segment) -> torch.Tensor:
        if seg.rows is None:
            return full
        a, b = seg.rows
        return full[a:b]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat vector -> named full tensors (views where one block owns the tensor,
        a concatenation of the layer slices for the stack tensors). Differentiable."""
        out = {}
        for name in self.names:
            segs = self._by_name[name]
            pieces = [flat[s.offset:s.offset + s.numel].view(s.shape) for s in segs]
            out[name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        return out

    def block(self, flat: torch.Tensor, l: int) -> torch.Tensor:
        lo, hi = self.ranges[l]
        return flat[lo:hi]

    def describe(self) -> list[dict]:
        """One line per block for reports: its layers and what else it owns."""
        out = []
        for l in range(self.blocks):
            extra = sorted({s.name.split(".", 1)[0] for s in self.segments
                            if s.block == l and not s.name.startswith(self.prefixes)})
            a, b = self.layer_ranges[l]
            out.append({"block": l, "layers": [a, b], "also": extra,
                        "parameters": self.ranges[l][1] - self.ranges[l][0]})
        return out


def write_back(model: nn.Module, partition: BlockPartition, flat: torch.Tensor) -> None:
    """Copy a flat point into ``model``'s parameters (weights and biases)."""
    params = partition.unflatten(flat)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])


def digest(flat: torch.Tensor) -> str:
    """An exact fingerprint of a parameter vector (a hash of its bytes, 60 bits as
    15 hex digits so that it also fits an int64 collective), for the
    identical-after-synchronisation checks."""
    data = flat.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()[:15]
