"""A role's inputs in batches: precomputed frozen features, a subset of any role's inputs, and running
a module over all of them in input order. An encoder's own inputs (conformers, graphs, cached prefix
states) are batch sources of the same shape, defined beside it in encoders/.

A batch source has len(), lengths() (a molecule's size, for grouping similar ones) and
batch(indices, device), which gives what its model's forward takes."""
import numpy as np
import torch


class FeatureInputs:
    """A role's precomputed frozen features."""

    def __init__(self, features):
        self.features = torch.as_tensor(features)

    def __len__(self):
        return len(self.features)

    def lengths(self):
        return np.zeros(len(self))

    def batch(self, idx, device):
        return self.features[idx].to(device)


class Subset:
    """Some of a role's inputs, by position."""

    def __init__(self, inputs, positions):
        self.inputs, self.positions = inputs, torch.as_tensor(positions)

    def __len__(self):
        return len(self.positions)

    def lengths(self):
        return self.inputs.lengths()[self.positions.numpy()]

    def batch(self, idx, device):
        return self.inputs.batch(self.positions[idx], device)


@torch.no_grad()
def in_batches(module, forward, inputs, batch_size, device, width=()):
    """forward(batch) over all of `inputs` in length-sorted batches, in input order, fp32, with
    `module` in eval mode (then restored)."""
    was_training = module.training
    module.eval()
    order = torch.from_numpy(np.argsort(inputs.lengths(), kind="stable"))
    out = torch.zeros(len(inputs), *width)
    for start in range(0, len(inputs), batch_size):
        idx = order[start:start + batch_size]
        out[idx] = forward(inputs.batch(idx, device)).float().cpu()
    module.train(was_training)
    return out


def energies(model, inputs, batch_size, device):
    """Energies in fp32 for all of `inputs` in order."""
    return in_batches(model, model, inputs, batch_size, device)


def encoded(encoder, inputs, batch_size, device):
    """Features of a (fine-tuned) encoder for all of `inputs` (its own batch sources), in order."""
    return in_batches(encoder, encoder.forward_chunks, inputs, batch_size, device, (encoder.width,))
