"""DeviceEagleSource (draft/eagle.py): the draft step a whole-step backend records into its CUDA graph.

Its `device_step` is plain tensor code, so its semantics are checked here on the CPU against the eager
EagleSource: same candidates at every step, context vocabulary (a token outside the static vocabulary
becomes proposable right after it is chosen) and rollback included.
"""

from __future__ import annotations

import pytest
import torch
from test_draft import draft, tiny_model  # noqa: F401  # fixtures

from specee_compile.draft.eagle import DeviceEagleSource, EagleSource


def _steps(src, ids, hid, P, n, device_path):
    """reset on ids[:P]; then per step: propose, choose ids[t], observe with hid[t-1].
    device_path "sync": the graph's draft step right after choosing ids[t], then the host's bookkeeping;
    "ahead": the loop runs one step ahead, so the host's bookkeeping for ids[t] comes after the device
    already stepped on ids[t+1] (what runtime/decoder.py does on CUDA)."""
    out = []
    src.reset(ids[:P], hid[:P])
    late = None
    for t in range(P, P + n):
        if device_path != "ahead" or t == P:
            out.append(src.propose().tolist())
        else:
            out.append(src.next_cands.tolist())
        if device_path:  # steady state: the graph runs this right after choosing ids[t]
            src.device_step(torch.tensor([ids[t]]), hid[t - 1], torch.tensor([t - 1]), S=32 if t <= 32 else 64)
            if late is not None:
                src.observe_device(*late)
            late = (ids[t], hid[t - 1], 3)
            if device_path == "sync":
                src.observe_device(*late)
                late = None
        else:
            src.observe(ids[t], hid[t - 1], 3)
    if late is not None:
        src.observe_device(*late)
    out.append(src.propose().tolist())
    return out


@pytest.mark.parametrize("path", ["sync", "ahead"])
@pytest.mark.parametrize("static", ["full", "partial"])
def test_device_step_equals_eager_propose(tiny_model, draft, static, path):  # noqa: F811
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (40,), generator=g).tolist()
    hid = torch.randn(40, 64, generator=g)
    if static == "partial":  # a static vocabulary without ids >= 128: the context vocabulary matters
        from specee_compile.draft.eagle import EagleDraft

        d = EagleDraft(tiny_model, torch.arange(128))
        d.load_state_dict({k: v for k, v in draft.state_dict().items() if k != "vocab_ids"}, strict=False)
        d.set_vocab_ids(torch.arange(128), tiny_model.lm_head.weight)
    else:
        d = draft
    want = _steps(EagleSource(d, k=4), ids, hid, 8, 24, device_path=None)
    dev = DeviceEagleSource(d, k=4, max_len=64)
    got = _steps(dev, ids, hid, 8, 24, device_path=path)
    assert got == want
    assert dev.n_extra.item() == len(dev._extra_ids)


def _device_vs_eager(d, seed: int, n: int, compiled: bool):
    """(eager candidates, device candidates "ahead", the inputs) over n steps of random ids and features."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (40,), generator=g).tolist()
    hid = torch.randn(40, 64, generator=g)
    want = _steps(EagleSource(d, k=4), ids, hid, 8, n, device_path=None)
    dev = DeviceEagleSource(d, k=4, max_len=64, compile=compiled)
    got = _steps(dev, ids, hid, 8, n, device_path="ahead")
    assert dev.compile_error is None, dev.compile_error
    return want, got, (ids, hid)


def test_compiled_device_step_equals_eager(tiny_model, draft):  # noqa: F811
    """The Inductor-compiled draft step (the CUDA default) gives the eager step's candidates, across
    attention lengths (one compile: S is a dynamic dimension)."""
    want, got, _ = _device_vs_eager(draft, 6, 30, compiled=True)
    assert got == want


def test_device_source_after_rollback(tiny_model, draft):  # noqa: F811
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (30,), generator=g).tolist()
    hid = torch.randn(30, 64, generator=g)
    ref, dev = EagleSource(draft, k=4), DeviceEagleSource(draft, k=4, max_len=64)
    for src, device_path in ((ref, None), (dev, "sync")):
        _steps(src, ids, hid, 6, 12, device_path)
        src.truncate(12)  # roll back 6 positions, then continue on the eager path, then the device path
    assert dev.propose().tolist() == ref.propose().tolist()
    for t in range(12, 20):
        pos = torch.tensor([t - 1])
        dev.device_step(torch.tensor([ids[t]]), hid[t - 1], pos, S=64)
        ref.observe(ids[t], hid[t - 1], 3)
        dev.observe_device(ids[t], hid[t - 1], 3)
        assert dev.propose().tolist() == ref.propose().tolist()


@pytest.mark.parametrize("compiled", [False, True])
def test_two_layer_draft_device_step_equals_eager(tiny_model, compiled):  # noqa: F811
    """A head with two decoder layers (`train-draft --draft-layers 2`): the device step (eager tensor code, and
    compiled as on CUDA) runs both layers as the eager source does; its proposals differ from the first layer's
    alone, so the second layer is really in the chain."""
    from specee_compile.draft.eagle import EagleDraft

    torch.manual_seed(2)
    two = EagleDraft(tiny_model, torch.arange(200), num_layers=2)
    with torch.no_grad():
        for p in two.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    two.eval()
    one = EagleDraft(tiny_model, torch.arange(200))
    one.load_state_dict({k: v for k, v in two.state_dict().items() if not k.startswith("layers.1.")})
    want, got, (ids, hid) = _device_vs_eager(two, 5, 24, compiled)
    assert got == want
    assert want != _steps(EagleSource(one.eval(), k=4), ids, hid, 8, 24, device_path=None)
