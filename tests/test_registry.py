"""The one backend registry (backends/registry.py) and the policy tables (runtime/policies.py) are what
Settings, the CLI and the loop read: nothing else lists backend or mode names."""

from __future__ import annotations

import pytest

from specee_compile.backends import make_segments
from specee_compile.backends.registry import REGISTRY, backend_names, get_backend
from specee_compile.cli import build_parser
from specee_compile.config import BACKENDS, KV_POLICIES, MODES, Settings
from specee_compile.errors import SpecEEError
from specee_compile.runtime.policies import EXIT_POLICIES, KV_POLICIES as KV_TABLE, trace_exits


def test_settings_and_cli_read_the_registry():
    assert BACKENDS == backend_names() == tuple(REGISTRY)
    assert MODES == tuple(EXIT_POLICIES) and KV_POLICIES == tuple(KV_TABLE)
    gen = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
               if "--backend" in a.option_strings)
    assert tuple(gen.choices) == BACKENDS
    with pytest.raises(SpecEEError, match="is not one of eager, inductor"):
        Settings(backend="tvm")
    with pytest.raises(SpecEEError, match="is not one of"):
        get_backend("tvm")


def test_every_entry_loads_and_model_backends_build_segments():
    for entry in REGISTRY.values():
        assert entry.kind in ("model", "artifact") and callable(entry.load())
    from test_runtime import tiny

    for name in ("onnx", "tensorrt"):
        with pytest.raises(SpecEEError, match="specee-compile export"):
            make_segments(tiny(), Settings(backend=name))
    assert make_segments(tiny(), Settings()).name == "eager"


def test_policies_declare_what_they_need():
    lossless, approx = EXIT_POLICIES["lossless"], EXIT_POLICIES["approximate"]
    assert lossless.needs_rollback and lossless.needs_kv == "backfill" and lossless.exit_token == "candidates"
    assert not approx.needs_rollback and approx.verify_in_candidates and approx.exit_token == "full_head"
    assert KV_TABLE["backfill"].keeps_pending and not KV_TABLE["skip"].keeps_pending
    with pytest.raises(SpecEEError, match="needs kv_policy=backfill"):
        Settings(mode="lossless", kv_policy="skip")
    t = trace_exits([3, 31, 5])
    assert t.forced and [t.forced_layer(n) for n in range(4)] == [3, 31, 5, 3]
    assert EXIT_POLICIES["approximate"].forced_layer(0) is None
    assert t.exit_rates([3, 5, 7]) == {3: 1 / 3, 5: 1 / 3, 7: 0.0}
    assert EXIT_POLICIES["approximate"].exit_rates([3]) is None
