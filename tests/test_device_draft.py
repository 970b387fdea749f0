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


def _steps(src, ids, hid, P, n, device_path: bool):
    """reset on ids[:P]; then per step: propose, choose ids[t], observe with hid[t-1]."""
    out = []
    src.reset(ids[:P], hid[:P])
    for t in range(P, P + n):
        out.append(src.propose().tolist())
        if device_path:  # steady state: the graph runs this right after choosing ids[t]
            pos = torch.tensor([t - 1])
            src.device_step(torch.tensor([ids[t]]), hid[t - 1], pos, S=64)
            src.observe(ids[t], hid[t - 1], 3)
            src.adopt_device_proposal()
        else:
            src.observe(ids[t], hid[t - 1], 3)
    out.append(src.propose().tolist())
    return out


@pytest.mark.parametrize("static", ["full", "partial"])
def test_device_step_equals_eager_propose(tiny_model, draft, static):  # noqa: F811
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
    want = _steps(EagleSource(d, k=4), ids, hid, 8, 24, device_path=False)
    dev = DeviceEagleSource(d, k=4, max_len=64)
    got = _steps(dev, ids, hid, 8, 24, device_path=True)
    assert got == want
    assert dev.n_extra.item() == len(dev._extra_ids)


def test_device_source_after_rollback(tiny_model, draft):  # noqa: F811
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (30,), generator=g).tolist()
    hid = torch.randn(30, 64, generator=g)
    ref, dev = EagleSource(draft, k=4), DeviceEagleSource(draft, k=4, max_len=64)
    for src, device_path in ((ref, False), (dev, True)):
        _steps(src, ids, hid, 6, 12, device_path)
        src.truncate(12)  # roll back 6 positions, then continue on the eager path, then the device path
    assert dev.propose().tolist() == ref.propose().tolist()
    for t in range(12, 20):
        pos = torch.tensor([t - 1])
        dev.device_step(torch.tensor([ids[t]]), hid[t - 1], pos, S=64)
        for src in (ref, dev):
            src.observe(ids[t], hid[t - 1], 3)
        dev.adopt_device_proposal()
        assert dev.propose().tolist() == ref.propose().tolist()
