"""Grades exercise 5: restore(G, x) for images of any size."""
import pytest
import torch

import dada_min as dm

pytestmark = pytest.mark.ex5
REF = dm.restore
GUARDED = [(dm, "restore")]   # conftest.own_work: calling these fails in a test


def restorer(depth, seed):
    """A small G whose residual head is NOT zero (a fresh G is the identity, which would hide mistakes)."""
    torch.manual_seed(seed)
    G = dm.RestorerUNet(4, depth)
    torch.nn.init.normal_(G.last.weight, std=0.3)
    torch.nn.init.normal_(G.last.bias, std=0.1)
    return G.eval()


@pytest.mark.parametrize("depth,H,W", [(1, 7, 5), (2, 9, 16), (3, 17, 13), (3, 24, 8), (4, 11, 30)])
def test_matches_reference(sol, depth, H, W):
    G = restorer(depth, H * W)
    x = torch.rand(2, 3, H, W)
    out = sol.restore(G, x)
    assert out.shape == x.shape, "crop back to the input size"
    torch.testing.assert_close(out, REF(G, x), msg="pad bottom/right with mode='replicate', crop, clamp")


def test_pads_to_the_smallest_multiple(sol):
    G = restorer(3, 0)
    seen = []
    G.register_forward_pre_hook(lambda m, inp: seen.append(tuple(inp[0].shape[-2:])))
    sol.restore(G, torch.rand(1, 3, 13, 8))
    assert seen == [(16, 8)], f"G must see the input padded to multiples of 2^(depth-1) = 4, saw {seen}"


def test_output_is_clamped_and_builds_no_graph(sol):
    G = restorer(2, 1)
    torch.nn.init.constant_(G.last.bias, 5.0)            # pushes every output far above 1
    x = torch.rand(1, 3, 10, 6, requires_grad=True)
    out = sol.restore(G, x)
    assert out.max() <= 1 and out.min() >= 0, "clamp the restored image to [0, 1]"
    assert not out.requires_grad, "restore is inference: run it under torch.no_grad()"
