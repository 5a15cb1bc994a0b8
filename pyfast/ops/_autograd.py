"""What the fused ops' autograd.Functions share."""
import functools

import torch


def double_backward_unsupported(op: str):
    """Wraps a Function's backward like torch.autograd.function.once_differentiable: the backward runs
    without recording a graph, and only if a second backward (create_graph=True) actually reaches its
    results does it raise, with an error naming the op and the fallback (the fused backward kernels are not
    themselves differentiable; the reference backend is plain PyTorch)."""
    def wrap(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            with torch.no_grad():
                results = backward(ctx, *grads)
            if not (torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads)):
                return results
            tensors = [r for r in results if r is not None]
            incoming = [g for g in grads if g is not None]
            guarded = iter(_Unsupported.apply(op, len(tensors), *tensors, *incoming))
            return tuple(None if r is None else next(guarded) for r in results)
        return checked
    return wrap


class _Unsupported(torch.autograd.Function):
    """Passes the backward's results through, attached to the incoming gradients' graph (they are what a
    second backward reaches them by); its own backward is the error."""

    @staticmethod
    def forward(ctx, op, count, *tensors):
        ctx.op = op
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"pyfast.ops.{ctx.op} does not support double backward (a gradient of its gradient): its backward "
            f"kernels are not differentiable. Run it with backend='reference' (plain PyTorch, e.g. inside "
            f"`with pyfast.use_backend('reference'):`) where you need higher-order gradients.")


class _Unrecorded:
    """The context a Function's forward gets when the call records no autograd graph: what it saves for a
    backward that will never run is dropped."""

    def save_for_backward(self, *tensors):
        pass


def eager_autograd(chosen):
    """The chosen backend's own C++ autograd for the fused ops (see Backend.eager_autograd), or None where
    the Python Functions run: backends without one (Triton) and torch.compile, which traces them."""
    functions = chosen.eager_autograd
    return None if functions is None or torch.compiler.is_compiling() else functions


def apply(function, records: bool, *args):
    """function.apply(*args) when the call `records` an autograd graph (an input needs a gradient, see
    pyfast.ops._common.needs_grad); otherwise (inference, torch.no_grad()) its forward alone: the same
    computation without building an autograd node."""
    if records:
        return function.apply(*args)
    return function.forward(_Unrecorded(), *args)
