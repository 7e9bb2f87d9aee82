"""ggml's compute graph and ggml-alloc's sizing of it, for launcher.compute. Pure.

`Graph` builds tensors with ggml's result shapes, views and in-place rules (ggml/src/ggml.c) and adds them in
the order `ggml_build_forward_expand` visits them. `allocate` replays `ggml_gallocr_alloc_graph_impl` and
`ggml_dyn_tallocr` (ggml/src/ggml-alloc.c) on it and returns each device's peak.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# ggml types of compute tensors: (name, bytes per element)
F32 = ("f32", 4)
F16 = ("f16", 2)
I32 = ("i32", 4)
I64 = ("i64", 8)
CACHE_ELEMENT = {"f32": F32, "f16": F16, "bf16": ("bf16", 2)}

# Buffer alignment of each backend's compute buffer type (ggml_backend_buft_get_alignment): TENSOR_ALIGNMENT (32)
# on the CPU (ggml/src/ggml-impl.h), 128 on CUDA/HIP (ggml-cuda.cu), 32 on Metal.
BUFFER_ALIGNMENT = {"cpu": 32, "cuda": 128, "rocm": 128, "metal": 32, "rpc": 32}

HOST = "CPU"
BYTE = ("i8", 1)


# ------------------------------------------------------------------------------------------------------------------
# ggml tensors and ops


class Tensor:
    """One ggml tensor of the compute graph (weights, caches and other pre-allocated tensors never appear)."""

    __slots__ = (
        "device",
        "elt",
        "inplace",
        "is_copy",
        "is_input",
        "is_output",
        "n_children",
        "n_views",
        "nb",
        "nbytes",
        "ne",
        "offset",
        "own",
        "srcs",
        "view_src",
        "visited",
    )

    def __init__(
        self,
        ne: Sequence[int],
        elt: tuple[str, int],
        srcs: Sequence[Tensor],
        device: str,
        *,
        nb: tuple[int, ...] | None = None,
        view_src: Tensor | None = None,
        inplace: bool = False,
        is_input: bool = False,
    ) -> None:
        ne4 = tuple(ne) + (1,) * (4 - len(ne))
        self.ne = ne4
        self.elt = elt
        if nb is None:
            size = elt[1]
            nb = (size, size * ne4[0], size * ne4[0] * ne4[1], size * ne4[0] * ne4[1] * ne4[2])
        self.nb = nb
        # ggml_nbytes: 0 when any dimension is empty
        self.nbytes = 0 if min(ne4) <= 0 else elt[1] + sum((n - 1) * b for n, b in zip(ne4, nb, strict=True))
        self.srcs = list(srcs)
        self.view_src = view_src
        self.inplace = inplace
        self.is_input = is_input
        self.is_copy = False  # a copy into another device's split, used like an input there
        self.is_output = False
        self.device = device
        self.visited = False
        self.n_children = 0
        self.n_views = 0
        self.own = False
        self.offset = 0


class Graph:
    """A ggml graph under construction: ggml's ops, with their result shapes, views and in-place rules.

    Sources that are weights, KV caches or recurrent states are left out: they are allocated elsewhere, so
    ggml-alloc never allocates or frees them and never runs an op in place over them.
    """

    def __init__(self, *, n_copies: int = 1) -> None:
        self.nodes: list[Tensor] = []
        self.leafs: list[Tensor] = []
        self.device = HOST
        # copies of each input the scheduler keeps with pipeline parallelism (GGML_SCHED_MAX_COPIES), else 1
        self.n_copies = n_copies
        self._copies: dict[tuple[int, str], Tensor] = {}
        # stands for the weight or cache a store writes into: never allocated by ggml-alloc
        self._external = Tensor((1,), F32, [], HOST)
        self._external.visited = True

    # -- construction

    def _src(self, t: Tensor | None) -> Tensor | None:
        """A source as the current device sees it: a tensor of another device arrives as a copy (the
        scheduler's split inputs, ggml_backend_sched_split_graph)."""
        if t is None:
            return None
        base = t.view_src if t.view_src is not None else t
        if base.device == self.device:
            return t
        key = (id(t), self.device)
        copy = self._copies.get(key)
        if copy is None:
            copy = Tensor(t.ne, t.elt, [t], self.device, is_input=self.n_copies > 1)
            copy.is_copy = True
            self._persist(copy)
            self._copies[key] = copy
        return copy

    def _persist(self, t: Tensor) -> None:
        """With pipeline parallelism every input (and every copy of a tensor into another device's split) is
        allocated first, n_copies times, and never freed (ggml_backend_sched_split_graph sets them as inputs and
        outputs "to prevent ggml-alloc from overwriting" them)."""
        if self.n_copies > 1:
            t.is_output = True
            for _ in range(self.n_copies - 1):
                spare = Tensor(t.ne, t.elt, [], t.device, is_input=True)
                spare.is_output = True
                self.leafs.append(spare)

    def new(
        self, ne: Sequence[int], srcs: Sequence[Tensor | None], *, elt: tuple[str, int] = F32, inplace: bool = False
    ) -> Tensor:
        """A new contiguous tensor computed from `srcs` (None: a weight or cache)."""
        kept = [s for s in (self._src(s) for s in srcs) if s is not None]
        return Tensor(ne, elt, kept, self.device, inplace=inplace)

    def input(self, ne: Sequence[int], elt: tuple[str, int]) -> Tensor:
        """A graph input (ggml_set_input): allocated before any node, on the host."""
        t = Tensor(ne, elt, [], HOST, is_input=True)
        self._persist(t)
        return t

    def view(self, a: Tensor, ne: Sequence[int], nb: Sequence[int] | None = None) -> Tensor:
        """ggml_view_* / ggml_reshape_* (strides `nb`, the missing ones contiguous): no memory of its own; keeps
        its source alive until its own consumers are done."""
        base = a.view_src if a.view_src is not None else a
        ne4 = tuple(ne) + (1,) * (4 - len(ne))
        nb4 = None
        if nb is not None:
            strides = list(nb[:4])
            while len(strides) < 4:
                strides.append(strides[-1] * ne4[len(strides) - 1])
            nb4 = tuple(strides)
        return Tensor(ne4, a.elt, [a], base.device, nb=nb4, view_src=base)

    def permute(self, a: Tensor, axes: Sequence[int]) -> Tensor:
        ne, nb = [0] * 4, [0] * 4
        for i, axis in enumerate(axes):
            ne[axis], nb[axis] = a.ne[i], a.nb[i]
        return self.view(a, ne, nb)

    def transpose(self, a: Tensor) -> Tensor:
        return self.permute(a, (1, 0, 2, 3))

    def expand(self, t: Tensor | None) -> None:
        """ggml_build_forward_expand: add t and every source not yet in the graph, depth first, sources in order."""
        if t is None or t.visited:
            return
        stack: list[tuple[Tensor, int]] = [(t, 0)]
        t.visited = True
        while stack:
            node, i = stack[-1]
            if i < len(node.srcs):
                stack[-1] = (node, i + 1)
                src = node.srcs[i]
                if not src.visited:
                    src.visited = True
                    stack.append((src, 0))
                continue
            stack.pop()
            (self.leafs if node.is_input else self.nodes).append(node)

    # -- ops (ggml/src/ggml.c), each returning its result tensor

    def mul_mat(self, rows: int, b: Tensor, a: Tensor | None = None) -> Tensor:
        """ggml_mul_mat(a, b) with a of `rows` rows (a weight unless given): F32 [rows, b1, b2, b3]."""
        return self.new((rows, b.ne[1], b.ne[2], b.ne[3]), [a, b])

    def mul_mat_id(self, rows: int, b: Tensor, ids: Tensor) -> Tensor:
        """ggml_mul_mat_id: F32 [rows, n_expert_used, n_tokens]."""
        return self.new((rows, ids.ne[0], b.ne[2], 1), [b, ids])

    def elementwise(self, a: Tensor, *others: Tensor | None) -> Tensor:
        """An op whose result is ggml_dup_tensor(a) and that may run in place over a source with the same layout
        and no other consumer (ggml_op_can_inplace): add, mul, div, scale, clamp, rms_norm, rope, soft_max and
        the unary activations. With a view for a, never in place: ggml-alloc does not own views."""
        return self.new(a.ne, [a, *others], elt=a.elt, inplace=True)

    def cont(self, a: Tensor, ne: Sequence[int] | None = None) -> Tensor:
        """ggml_cont / ggml_cont_Nd: a contiguous copy (never in place)."""
        return self.new(ne or a.ne, [a], elt=a.elt)

    def get_rows(self, a: Tensor | None, ids: Tensor, *, width: int = 0) -> Tensor:
        """ggml_get_rows(a, ids): F32 [a0, ids0, ids1, ids2] (`width` = a0 when a is a weight)."""
        a0 = a.ne[0] if a is not None else width
        elt = I32 if a is not None and a.elt == I32 else F32
        return self.new((a0, ids.ne[0], ids.ne[1], ids.ne[2]), [a, ids], elt=elt)

    def glu(self, a: Tensor, b: Tensor | None = None) -> Tensor:
        """ggml_swiglu_split / geglu_split (with b) or swiglu (one tensor, half width): never in place."""
        ne = a.ne if b is not None else (a.ne[0] // 2, *a.ne[1:])
        return self.new(ne, [a, b], elt=a.elt)

    def concat(self, a: Tensor, b: Tensor, dim: int) -> Tensor:
        ne = list(a.ne)
        ne[dim] += b.ne[dim]
        return self.new(ne, [a, b], elt=a.elt)

    def argsort(self, a: Tensor) -> Tensor:
        return self.new(a.ne, [a], elt=I32)

    def sum_rows(self, a: Tensor) -> Tensor:
        return self.new((1, *a.ne[1:]), [a], elt=a.elt)

    def repeat(self, a: Tensor, ne: Sequence[int]) -> Tensor:
        return self.new(ne, [a], elt=a.elt)

    def store(self, *srcs: Tensor | None) -> Tensor:
        """ggml_set_rows / ggml_cpy into a cache: the result is a view of the cache, so never allocated."""
        kept = [s for s in (self._src(s) for s in srcs) if s is not None]
        return Tensor((1,), F32, kept, self.device, view_src=self._external)


# ------------------------------------------------------------------------------------------------------------------
# ggml-alloc


class _Allocator:
    """ggml_dyn_tallocr for one buffer: best fit among free blocks, else the last block (which grows)."""

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        self.free: list[list[int]] = [[0, 1 << 62]]
        self.max_size = 0

    def _aligned(self, size: int) -> int:
        return -(-size // self.alignment) * self.alignment

    def alloc(self, size: int) -> int:
        size = self._aligned(size)
        free = self.free
        best, best_size = len(free) - 1, -1
        for i in range(len(free) - 1):
            block_size = free[i][1]
            if block_size >= size and (best_size < 0 or block_size <= best_size):
                best, best_size = i, block_size
        block = free[best]
        offset = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del free[best]
        self.max_size = max(self.max_size, offset + size)
        return offset

    def release(self, offset: int, size: int) -> None:
        size = self._aligned(size)
        free = self.free
        for i, block in enumerate(free):
            if block[0] + block[1] == offset:
                block[1] += size
                if i + 1 < len(free) and block[0] + block[1] == free[i + 1][0]:
                    block[1] += free[i + 1][1]
                    del free[i + 1]
                return
            if offset + size == block[0]:
                block[0] = offset
                block[1] += size
                if i > 0 and free[i - 1][0] + free[i - 1][1] == block[0]:
                    free[i - 1][1] += block[1]
                    del free[i]
                return
        i = 0
        while i < len(free) and free[i][0] < offset:
            i += 1
        free.insert(i, [offset, size])


def allocate(
    graph: Graph, alignment: Mapping[str, int], *, snapshots: Sequence[int] = ()
) -> tuple[dict[str, int], list[Any]]:
    """ggml_gallocr_alloc_graph_impl over `graph`: the peak bytes of each device's compute buffer, and the
    allocator's state just before each node index in `snapshots` (free blocks and live tensors; inputs without
    their use counts, which only matter at their last use)."""
    allocators: dict[str, _Allocator] = {}
    live: dict[int, Tensor] = {}
    states: list[Any] = []
    wanted = set(snapshots)

    def allocator(device: str) -> _Allocator:
        if device not in allocators:
            allocators[device] = _Allocator(alignment.get(device, 32))
        return allocators[device]

    def allocate_node(t: Tensor) -> None:
        if t.own or t.view_src is not None:
            return
        t.own = True
        if t.inplace:
            for parent in t.srcs:
                # a view parent is never "own" (ggml_gallocr_is_own), so only plain tensors are taken over
                if not parent.own or parent.is_output or parent.device != t.device:
                    continue
                if parent.ne != t.ne or parent.nb != t.nb or parent.elt != t.elt:
                    continue
                if parent.n_children == 1 and parent.n_views == 0:
                    t.offset = parent.offset
                    parent.own = False
                    del live[id(parent)]
                    live[id(t)] = t
                    return
        t.offset = allocator(t.device).alloc(t.nbytes)
        live[id(t)] = t

    def free_node(t: Tensor) -> None:
        if t.is_output:
            return
        allocators[t.device].release(t.offset, t.nbytes)
        t.own = False
        del live[id(t)]

    def state() -> Any:
        blocks = tuple((d, tuple(map(tuple, a.free))) for d, a in sorted(allocators.items()))
        tensors = sorted(
            (t.device, t.offset, t.nbytes, *((-1, -1) if t.is_input or t.is_copy else (t.n_children, t.n_views)))
            for t in live.values()
        )
        return blocks, tuple(tensors)

    for leaf in graph.leafs:
        allocate_node(leaf)
    for node in graph.nodes:
        if node.view_src is not None:
            node.view_src.n_views += 1
        for src in node.srcs:
            src.n_children += 1
    for index, node in enumerate(graph.nodes):
        if index in wanted:
            states.append(state())
        allocate_node(node)
        for parent in node.srcs:
            parent.n_children -= 1
            if parent.n_children == 0 and parent.n_views == 0:
                base = parent.view_src
                if base is not None:
                    base.n_views -= 1
                    if base.n_views == 0 and base.n_children == 0 and base.own:
                        free_node(base)
                elif parent.own:
                    free_node(parent)
    return {device: a.max_size for device, a in allocators.items()}, states
