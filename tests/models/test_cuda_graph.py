"""A fast model's whole training step (forward, loss, backward, SGD) captured by one CUDA graph after warm-up,
as PyTorch's whole-network capture recipe does it, and replayed: nothing on the fused path synchronizes with
the host or decides on the host what a replay must redo (the Triton weight copy, cached per weight version,
is captured because the optimizer step before the capture changed the weights)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from pyfast import models

NARROW = dict(widths=(8, 16, 32, 64), stem_width=8)


def _step(model, opt, x, labels):
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fast_training_step_replays_in_a_cuda_graph(backend):
    model = models.create("resnet50", num_classes=10, fused=True, backend=backend, **NARROW).cuda()
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(8, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (8,), device="cuda")

    side = torch.cuda.Stream()  # warm-up on a side stream: tuning, caches, the optimizer's momentum buffers
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            _step(model, opt, x, labels)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        graphed_loss = _step(model, opt, x, labels)

    # The same step run eagerly, from the state the replay starts from (capturing runs nothing).
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own momentum buffers, not opt's
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        ref_opt.zero_grad(set_to_none=True)
        ref_loss = _step(reference, ref_opt, x, labels)
        torch.testing.assert_close(graphed_loss, ref_loss, rtol=1e-4, atol=1e-5)
    for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=name)
