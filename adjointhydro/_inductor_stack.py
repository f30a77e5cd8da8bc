"""Private: a ``torch.compile`` backend for the compiled Runge-Kutta loop on a CPU whose
C++ wrapper keeps the loop's intermediate buffers on the stack.

Why: inductor's C++ wrapper allocates every intermediate buffer of a ``while_loop``
body anew in each iteration. For a few basins a Runge-Kutta step has about 70 such
buffers of a few bytes, and allocating and freeing them (glibc's aligned allocation
path, which its thread cache does not serve) took about 30 of the 42 us an iteration
took (one basin x 1 year, 2-core VM). AOT Inductor can put fixed-size buffers into
stack arrays instead (``aot_inductor.allow_stack_allocation``), but its wrapper cannot
hand a stack buffer out of a loop's body or out of the function: with it switched on
as it is, the generated C++ does not compile (torch 2.13).

Here the buffers that leave their graph stay on the heap: each graph's and subgraph's
outputs, and the inputs of its loops (which the loop carries and may hand back). Every
other buffer goes on the stack, up to :data:`STACK_BYTES` in all (larger batches keep
heap buffers everywhere: there their cost is small against the arithmetic). The wrapper
class is swapped in only while this backend compiles, so other compilations in the
process are untouched.

Relies on inductor internals; :func:`backend` returns ``None`` where they are missing,
and the caller compiles with plain inductor (or, if the C++ fails to build, falls back
to it as well).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

# the most bytes of intermediate buffers put on the stack (a thread's stack is 8 MB on
# Linux, 512 KB for macOS's secondary threads, 1 MB on Windows); larger graphs keep every
# buffer on the heap
STACK_BYTES = 256 * 1024


def _names(node) -> set:
    """The buffer names of an IR node and, for a view, of the buffer it views."""
    out = set()
    for get in (lambda: node.get_name(), lambda: node.unwrap_view().get_name()):
        try:
            out.add(get())
        except Exception:  # (no name: a constant, a shape, None)
            pass
    return out


def _escaping(graph) -> set:
    """Names of the buffers of ``graph`` and its subgraphs that must outlive their scope:
    graph outputs, and the carried and other inputs of loops and conditionals."""
    names: set = set()
    todo, seen = [graph], set()
    while todo:
        g = todo.pop()
        if g is None or id(g) in seen:
            continue
        seen.add(id(g))
        for out in getattr(g, "graph_outputs", None) or ():
            names |= _names(out)
        for op in getattr(g, "operations", None) or ():
            subgraphs = op.get_subgraphs() if hasattr(op, "get_subgraphs") else []
            if not subgraphs:
                continue
            for attr in ("carried_inputs", "additional_inputs", "operands"):
                for x in getattr(op, attr, None) or ():
                    names |= _names(x)
            todo.extend(s.graph for s in subgraphs)
    return names


def backend(options: dict) -> Callable | None:
    """A ``torch.compile`` backend: inductor with ``options`` and stack-allocated
    intermediate buffers; ``None`` where this torch lacks what it needs."""
    import torch

    try:
        # (verified on torch 2.13; older versions compile with inductor's own wrapper)
        if torch.__version__ < (2, 13):
            return None
        from torch._inductor import config as inductor_config
        from torch._inductor.codegen import common
        from torch._inductor.codegen.cpp_wrapper_cpu_array_ref import CppWrapperCpuArrayRef
        from torch._inductor.codegen.wrapper import AllocateLine
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.virtualized import V
    except Exception:  # (a torch whose internals moved, an unparsable version)
        return None
    if not (hasattr(inductor_config, "aot_inductor")
            and hasattr(inductor_config.aot_inductor, "allow_stack_allocation")
            and all(hasattr(CppWrapperCpuArrayRef, a) for a in (
                "can_stack_allocate_buffer", "memory_plan_reuse", "make_buffer_reuse",
                "static_shape_for_buffer_or_none"))
            and hasattr(common, "device_codegens") and hasattr(common, "init_backend_registration")):
        return None

    class _StackWrapper(CppWrapperCpuArrayRef):
        @staticmethod
        def create(*args, **kwargs):
            return _StackWrapper()

        def _escapes(self, buffer) -> bool:
            # (subgraph buffers may be allocated when the whole wrapper is written out, with
            # the main graph current: its walk covers every subgraph)
            graph = V.graph
            if getattr(self, "_escaping_graph", None) is not graph:
                self._escaping_graph, self._escaping_names = graph, _escaping(graph)
            return buffer.get_name() in self._escaping_names

        def can_stack_allocate_buffer(self, buffer):
            return super().can_stack_allocate_buffer(buffer) and not self._escapes(buffer)

        def memory_plan_reuse(self):
            # inductor bounds the element count of all the graph's buffers (100 K); here the
            # bytes of those that go on the stack (the loop's period-end array, carried on
            # the heap, would count many times over for a few basins)
            before = self.allow_stack_allocation
            super().memory_plan_reuse()
            on_stack = 0
            for line in self.lines:
                node = getattr(line, "node", None)
                if isinstance(line, AllocateLine) and node is not None and not self._escapes(node):
                    shape = self.static_shape_for_buffer_or_none(node)
                    if shape is not None and node.get_device().type == "cpu":
                        on_stack += math.prod(shape) * node.get_dtype().itemsize
            self.allow_stack_allocation = before is not False and on_stack <= STACK_BYTES

        def make_buffer_reuse(self, old, new, delete_old):
            # a buffer that leaves must not take over a freed stack buffer: a heap one of its own
            if old.get_name() in self.stack_allocated_buffers and self._escapes(new):
                return self.make_buffer_allocation(new)
            return super().make_buffer_reuse(old, new, delete_old)

    @contextlib.contextmanager
    def swapped():
        common.init_backend_registration()
        entry = common.device_codegens["cpu"]
        before = entry.cpp_wrapper_codegen
        entry.cpp_wrapper_codegen = _StackWrapper
        try:
            yield
        finally:
            entry.cpp_wrapper_codegen = before

    patches = dict(options, **{"cpp_wrapper": True, "aot_inductor.allow_stack_allocation": True})

    def compile_with_stack(gm, example_inputs):
        with swapped():
            return compile_fx(gm, example_inputs, config_patches=patches)

    return compile_with_stack
