"""torch.func.vmap rules of the custom ops: the vmapped axis folded into the samples' axis, one call.

Every op treats each sample (each capsule, for squash) on its own, so a vmap over a batch of
inputs is one call over a larger batch: V slices of B samples are V B samples. Without a rule,
torch runs the op once per slice and warns of it. A vmapped argument that all samples share (W
of capsule_linear, the routing bias) cannot be folded, and neither can an output that sums over
the samples (capsule_linear's dW): those calls run once per slice, as torch's own fallback would.
"""

import torch

__all__ = ["register_folding_rule"]


def register_folding_rule(op, sample_axes, output_axes, new_axis=False):
    """Register op's vmap rule.

    sample_axes: per argument of op, the axis of its samples (None for an argument that is not a
    tensor or that every sample shares); output_axes: the same per output (None for one summed
    over the samples), a tuple for an op of several outputs. new_axis: the vmapped axis becomes
    a new leading axis of samples instead of being folded into one (squash: any leading axes)."""
    several = isinstance(output_axes, tuple)
    axes_out = output_axes if several else (output_axes,)

    def rule(info, in_dims, *args):
        size = info.batch_size
        if None in axes_out or any(d is not None and axis is None for d, axis in zip(in_dims, sample_axes)):
            return _per_slice(op, size, in_dims, args, several)
        folded, samples = [], None
        for arg, d, axis in zip(args, in_dims, sample_axes):
            if axis is not None:
                arg = arg.movedim(d, axis) if d is not None else arg.unsqueeze(axis).expand(
                    *arg.shape[:axis], size, *arg.shape[axis:])
                samples = arg.shape[axis + 1] if samples is None else samples
                if not new_axis:
                    arg = arg.flatten(axis, axis + 1)
            folded.append(arg)
        outputs = op(*folded)
        outputs = outputs if several else (outputs,)
        if not new_axis:                  # (size, samples): a vmap over 0 slices unfolds too
            outputs = tuple(out.unflatten(axis, (size, samples)) for out, axis in zip(outputs, axes_out))
        return (outputs if several else outputs[0]), output_axes

    torch.library.register_vmap(op, rule)


def _per_slice(op, size, in_dims, args, several):
    """op once per slice of the vmapped arguments, its outputs stacked on a new axis 0."""
    if size == 0:                         # no slice to learn the outputs' shapes from
        raise ValueError("vmap over 0 slices of an argument that the samples share (W, the bias) is not supported")
    results = [op(*(arg if d is None else arg.select(d, k) for arg, d in zip(args, in_dims))) for k in range(size)]
    if not several:
        return torch.stack(results), 0
    stacked = tuple(torch.stack(parts) for parts in zip(*results))
    return stacked, (0,) * len(stacked)
