"""dada_min's GPU fast path, checked on CPU: the decisions (precision, layout, fused Adam), a bf16 training step,
the sync-free crops and the paper-size parameter counts.
(bench.py, which times the fast path, is tested in tests/test_bench.py.)"""
import pytest
import torch

import dada_min as dm

CPU = torch.device("cpu")


# --- decisions: precision, layout, fused Adam ------------------------------------------------------
def test_pick_precision_on_cpu():
    assert dm.pick_precision("auto", CPU) is None                   # fp32 on CPU
    assert dm.pick_precision("fp32", CPU) is None
    assert dm.pick_precision("bf16", CPU) == torch.bfloat16         # an explicit choice is honoured


@pytest.mark.parametrize("major, expected", [(9, torch.bfloat16), (8, torch.bfloat16), (7, None)])
def test_pick_precision_auto_on_cuda_follows_compute_capability(monkeypatch, major, expected):
    # no GPU needed: only the capability query is faked (H100 = 9, A100 = 8, T4/V100 = 7: fp32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert dm.pick_precision("auto", torch.device("cuda")) == expected
    assert dm.pick_precision("fp32", torch.device("cuda")) is None


def test_fast_path_switches_are_cuda_only():
    assert not any(dm.fast_path(CPU).values())
    assert dm.fast_path(torch.device("cuda")) == {"channels_last": True, "fused_adam": True, "cudnn_benchmark": True}


def test_init_state_on_cpu_is_the_plain_path():
    state = dm.init_state(dm.make_config("tiny"), CPU)
    w = state.D.inp.weight
    assert w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)
    assert not state.opt.defaults["fused"]


# --- bf16 steps -----------------------------------------------------------------------------------------------
def test_bf16_steps_train_and_checkpoint(tmp_path, tiny_data):
    cfg = dm.make_config("tiny", precision="bf16", steps=2)
    state = dm.init_state(cfg, CPU)
    before = [p.detach().clone() for p in state.G.parameters()]
    for _ in range(2):
        parts = dm.train_step(state, tiny_data)
        assert torch.isfinite(parts["loss_res"]) and torch.isfinite(parts["loss_dif"])
    assert any(not torch.equal(a, b) for a, b in zip(before, state.G.parameters()))    # steps were taken
    assert all(p.dtype == torch.float32 for p in state.G.parameters())          # autocast: weights stay fp32
    path = str(tmp_path / "ck.pt")
    dm.save_checkpoint(path, state)
    fresh = dm.init_state(cfg, CPU)
    dm.load_checkpoint(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.G.parameters(), state.G.parameters()))


# --- data: crops without host synchronisation ----------------------------------------------------------------
def _crops_reference(pool, n, patch):
    """The straightforward version: crop, then transform each sample with a mask loop (host syncs)."""
    N, C, H, W = pool.shape
    idx = torch.randint(N, (n,))
    oy, ox = torch.randint(H - patch + 1, (n,)), torch.randint(W - patch + 1, (n,))
    k = torch.randint(8, (n,))
    out = torch.stack([pool[i, :, y:y + patch, x:x + patch] for i, y, x in zip(idx, oy, ox)])
    for t in range(8):
        if (k == t).any():
            out[k == t] = dm.dihedral(out[k == t], t)
    return out


def test_random_crops_equal_the_loop_reference():
    pool = torch.rand(6, 4, 13, 11)
    torch.manual_seed(5)
    ref = _crops_reference(pool, 64, 7)
    torch.manual_seed(5)
    torch.testing.assert_close(dm.random_crops(pool, 64, 7), ref, rtol=0, atol=0)


# --- networks: the paper sizes -------------------------------------------------------------------------------
def _official_layout_counts():
    """Parameters of the official RestorationNet (depth 4, wf 64) and guided-diffusion UNet (base 64,
    mults 1,2,4,8, 2 res blocks, scale-shift norm, resblock up/down, attention in the middle block only,
    9 input channels, gamma embedding 64 -> 256), counted layer by layer from their definitions."""
    def conv(i, o, k):
        return i * o * k * k + o

    r, c, chans = 0, 3, [64, 128, 256, 512]
    for co in chans:
        r += conv(c, co, 3) + conv(co, co, 3)
        c = co
    for co in reversed(chans[:-1]):
        r += conv(c, co, 3) + conv(2 * co, co, 3) + conv(co, co, 3)
        c = co
    r += conv(c, 3, 3)

    E = 256

    def res(ci, co):  # GN, conv, Linear(E, 2co) for scale-shift, GN, conv, 1x1 skip when channels change
        return 2 * ci + conv(ci, co, 3) + (E * 2 * co + 2 * co) + 2 * co + conv(co, co, 3) + (
            0 if ci == co else conv(ci, co, 1))

    d = (64 * E + E) + (E * E + E) + conv(9, 64, 3)
    ch, skips = 64, [64]
    for level, m in enumerate((1, 2, 4, 8)):
        for _ in range(2):
            d += res(ch, 64 * m)
            ch = 64 * m
            skips.append(ch)
        if level < 3:
            d += res(ch, ch)
            skips.append(ch)
    d += 2 * res(ch, ch) + (2 * ch + conv(ch, 3 * ch, 1) + conv(ch, ch, 1))
    for level, m in reversed(list(enumerate((1, 2, 4, 8)))):
        for i in range(3):
            d += res(ch + skips.pop(), 64 * m)
            ch = 64 * m
            if level and i == 2:
                d += res(ch, ch)
    d += 2 * ch + conv(64, 3, 3)
    return r, d


def test_paper_preset_parameter_counts():
    G, D = dm.make_networks(dm.make_config("paper"))
    assert dm.n_params(G) == 8_559_171                               # the paper's 8.56 M
    assert dm.n_params(D) == 62_643_075                              # "about 62.6 M"
    assert (dm.n_params(G), dm.n_params(D)) == _official_layout_counts()


def test_attention_heads_of_32_channels_match_a_per_head_reference():
    assert dm.AttnBlock(512).heads == 16 and dm.AttnBlock(48).heads == 1
    torch.manual_seed(0)
    blk = dm.AttnBlock(64)                                          # 2 heads
    x = torch.randn(2, 64, 4, 5)
    qkv = blk.qkv(blk.norm(x)).flatten(2)                           # (B, 3C, HW): q, k, v blocks of C channels
    heads = []
    for h in range(2):
        q, k, v = (qkv[:, j * 64 + h * 32: j * 64 + (h + 1) * 32] for j in range(3))  # (B, 32, HW) each
        w = torch.softmax(q.transpose(1, 2) @ k / 32 ** 0.5, -1)    # (B, HW, HW)
        heads.append((w @ v.transpose(1, 2)).transpose(1, 2))       # (B, 32, HW)
    ref = x + blk.proj(torch.cat(heads, 1).view_as(x))
    torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


# --- the benchmark -------------------------------------------------------------------------------------------
