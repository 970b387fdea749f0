"""The C++ runner (cpp/, over an AOTInductor export) against the Python runtime (eager backend), token
for token and exit layer for exit layer, in dense, paper (approximate + skip), approximate + backfill
and lossless (backfill + rollback) modes; bad inputs; the README's C++ example; the CLI backend.

One tiny random Llama (6 layers, vocabulary 32, so that k = 4 candidates catch the exit-layer argmax
often enough for exits to happen) with random predictors and a random EAGLE draft is exported once per
session (about 1.5 min of AOTInductor compiles on 2 cores); the runner is built once per source digest
(about 1 min) into the SPECEE cache. Skips only where cmake or g++ is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specee_compile.backends.cpp_runner import (
    RUNNER,
    build_runner,
    result_from_json,
    run_runner,
    toolchain_missing,
)

pytestmark = pytest.mark.skipif(toolchain_missing() is not None,
                                reason=f"the C++ runner needs {toolchain_missing()} (not on PATH)")

from transformers import LlamaConfig, LlamaForCausalLM

from specee_compile.artifacts import read_manifest
from specee_compile.backends import make_segments
from specee_compile.backends.aoti_export import export_aoti_dir
from specee_compile.config import Settings
from specee_compile.draft import EagleDraft, EagleSource
from specee_compile.errors import SpecEEError
from specee_compile.plugins.triton_decode_attention import workspace_numel
from specee_compile.predictors.schedule import OnlineScheduler
from specee_compile.program import ExitPoint, Predictors, SpecEEProgram
from specee_compile.runtime.decoder import Decoder

L, V, K = 6, 32, 4
CFG = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": L,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
PROMPTS = [[1, 2, 3, 4, 5], [7, 7, 8, 9, 7, 7, 8], [30, 2, 17], [4]]
MAX_CONTEXT = 128
README = Path(__file__).resolve().parents[1] / "exported" / "README.md"


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


def random_program(seed=0, hm=16, k=K):
    g = torch.Generator().manual_seed(seed)
    exits = list(range(L - 1))
    return SpecEEProgram(
        num_layers=L,
        exit_points=[ExitPoint(i, 0.3 + 0.1 * i) for i in exits],
        predictors=Predictors(torch.randn(L, hm, 3 * k, generator=g), torch.randn(L, hm, generator=g),
                              torch.randn(L, hm, generator=g) * 0.5, torch.randn(L, 1, generator=g), exits),
        offline_layers=[1, 3],
        num_candidates=k,
    )


def random_draft(model):
    torch.manual_seed(1)
    draft = EagleDraft(model)
    with torch.no_grad():  # the default init proposes near-constant tokens; spread it
        for p in draft.parameters():
            p.normal_(0, 0.2)
    return draft


@pytest.fixture(scope="module")
def runner():
    return build_runner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, runner):
    model, prog = tiny_model(), random_program()
    draft = random_draft(model)
    out = tmp_path_factory.mktemp("aoti") / "tiny"
    export_aoti_dir(model, prog, out, Settings(max_context=MAX_CONTEXT), draft, model_name="tiny", eos_ids=())
    return model, prog, draft, out


def python_run(model, prog, draft, s: Settings, ids):
    seg = make_segments(model, s, prog)
    if not s.specee:
        return Decoder(seg, s).generate(ids)
    sched = OnlineScheduler.from_settings(s, prog.offline_layers, prog.predictors.layers)
    return Decoder(seg, s, program=prog, draft=EagleSource(draft, K), scheduler=sched).generate(ids)


MODES = {
    "dense": {},
    "paper": {"specee": True, "mode": "approximate", "kv_policy": "skip"},
    "paper_thr": {"specee": True, "mode": "approximate", "kv_policy": "skip", "threshold": 0.3, "use_schedule": False},
    "backfill": {"specee": True, "mode": "approximate", "kv_policy": "backfill", "threshold": 0.3},
    "lossless": {"specee": True, "mode": "lossless", "kv_policy": "backfill", "threshold": 0.3, "max_pending": 3},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_parity_with_python_runtime(exported, mode):
    model, prog, draft, out = exported
    s = Settings(max_new_tokens=24, max_context=MAX_CONTEXT, **MODES[mode])
    exits = rollbacks = 0
    for ids in PROMPTS:
        ref = python_run(model, prog, draft, s, ids)
        got = run_runner(out, ids, s)
        assert got["token_ids"] == ref.token_ids, (mode, ids)
        assert got["exit_layers"] == ref.exit_layers, (mode, ids)
        assert got["pdl_edges"] == 0  # a CPU: no PDL (and --no-pdl is accepted, changing nothing)
        if mode == "dense":
            assert run_runner(out, ids, s, extra=("--no-pdl",))["token_ids"] == ref.token_ids
        assert (got["layer_passes"], got["layer_rows"], got["decode_steps"], got["predictor_calls"],
                got["head_calls"], got["rollbacks"]) == (ref.layer_passes, ref.layer_rows, ref.decode_steps,
                                                         ref.predictor_calls, ref.head_calls, ref.rollbacks)
        exits += sum(e < L - 1 for e in got["exit_layers"])
        rollbacks += got["rollbacks"]
    if mode != "dense":
        assert exits > 0, "the test should exercise exits"
    if mode == "lossless":
        assert rollbacks > 0, "the test should exercise rollbacks"
        dense = Settings(max_new_tokens=24, max_context=MAX_CONTEXT)
        for ids in PROMPTS:  # lossless = dense greedy
            assert run_runner(out, ids, s)["token_ids"] == run_runner(out, ids, dense)["token_ids"]


def test_runner_pdl_follows_specee_pdl(monkeypatch):
    """SPECEE_PDL=0 turns PDL off for the runner's captured step too; otherwise the packages decide."""
    from specee_compile.backends.cpp_runner import runner_args

    for env, off in ((None, False), ("all", False), ("ops", False), ("0", True)):
        if env is None:
            monkeypatch.delenv("SPECEE_PDL", raising=False)
        else:
            monkeypatch.setenv("SPECEE_PDL", env)
        assert ("--no-pdl" in runner_args("d", [1, 2], Settings())) == off, env


def _runner_exe(runner) -> str:
    return str(runner / RUNNER)


def _fail(runner, *args) -> str:
    r = subprocess.run([_runner_exe(runner), *map(str, args)], capture_output=True, text=True, check=False)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specee_runner: error: "), r.stderr
    return lines[0]


def test_bad_inputs_one_line_nonzero_exit(exported, runner, tmp_path):
    _, _, _, out = exported
    assert "does not exist" in _fail(runner, tmp_path / "nope", "--ids", "1,2")
    assert "exceeds the context of 128" in _fail(runner, out, "--ids", ",".join(["1"] * 120),
                                                 "--max-new-tokens", "20")
    assert "outside the vocabulary" in _fail(runner, out, "--ids", "1,99")
    assert "prompt is empty" in _fail(runner, out, "--ids", "")
    assert "needs kv=backfill" in _fail(runner, out, "--ids", "1", "--mode", "lossless")
    # corrupt copies: a flipped byte (same size), a truncated package, a missing manifest
    for damage, expect in (("flip", "checksum differs"), ("truncate", "bytes, the manifest says"),
                           ("manifest", "no manifest.json"), ("garbage", "malformed JSON")):
        bad = tmp_path / damage
        shutil.copytree(out, bad)
        if damage == "flip":
            p = bad / "weights.safetensors"
            b = bytearray(p.read_bytes())
            b[-3] ^= 0xFF
            p.write_bytes(bytes(b))
        elif damage == "truncate":
            p = bad / "layer.pt2"
            p.write_bytes(p.read_bytes()[:1000])
        elif damage == "manifest":
            (bad / "manifest.json").unlink()
        else:
            (bad / "manifest.json").write_text('{"format_version": 1, "files": {')
        assert expect in _fail(runner, bad, "--ids", "1,2,3")
    with pytest.raises(SpecEEError, match="exceeds the context"):
        run_runner(out, [1] * 127, Settings(max_new_tokens=4, max_context=MAX_CONTEXT))


def test_readme_example_compiles_and_runs(exported, runner, tmp_path):
    """exported/README.md's C++ example, compiled against the built library, runs on the export."""
    _, _, _, out = exported
    text = README.read_text()
    m = re.search(r"<!-- cpp-example -->\s*```cpp\n(.*?)```", text, re.DOTALL)
    assert m, "exported/README.md has no C++ example block"
    src = tmp_path / "example.cpp"
    src.write_text(m.group(1))
    inc = Path(__file__).resolve().parents[1] / "cpp" / "include"
    exe = tmp_path / "example"
    subprocess.run(["g++", "-std=c++17", "-O1", str(src), f"-I{inc}", f"-L{runner}", "-lspecee_runtime",
                    f"-Wl,-rpath,{runner}", "-o", str(exe)], check=True, capture_output=True, text=True)
    r = subprocess.run([str(exe), str(out), "1", "2", "3", "4", "5"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    s = Settings(max_new_tokens=16, max_context=MAX_CONTEXT, specee=True)
    model, prog, draft, _ = exported
    ref = python_run(model, prog, draft, s, [1, 2, 3, 4, 5])
    assert data["token_ids"] == ref.token_ids


def test_cli_generate_backend_cpp(exported, tmp_path):
    """`specee-compile generate DIR PROMPT --backend cpp --specee --stats-json F` on an export with a tokenizer."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    model, prog, draft, _ = exported
    chars = list("abcdefghijklmnopqrstuvwxyz .")
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    out = tmp_path / "tiny-tok"
    export_aoti_dir(model, prog, out, Settings(max_context=MAX_CONTEXT), draft, model_name="tiny", eos_ids=(),
                    tokenizer=tok, progress=False)
    stats = tmp_path / "stats.json"
    r = subprocess.run([sys.executable, "-m", "specee_compile.cli", "generate", str(out), "hello world",
                        "--backend", "cpp", "--specee", "--threshold", "0.3", "--no-chat-template",
                        "--max-new-tokens", "16", "--max-context", str(MAX_CONTEXT), "--stats-json", str(stats)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    got = json.loads(stats.read_text())
    ids = [int(t) for t in tok("hello world")["input_ids"]]
    s = Settings(max_new_tokens=16, max_context=MAX_CONTEXT, specee=True, threshold=0.3)
    ref = python_run(model, prog, draft, s, ids)
    assert got["token_ids"] == ref.token_ids and got["exit_layers"] == ref.exit_layers
    assert r.stdout.strip() == tok.decode(ref.token_ids, skip_special_tokens=True).strip()
    # the runner's own load (packages, weights) and its cost check's outcome reach the stats, as the Python
    # runtime's do; no CUDA graphs captured on a CPU, and no PDL
    assert got["load_s"] > 0 and got["compile_s"] == 0 and got["pdl"] is None
    assert isinstance(got["exit_points_kept"], list) and isinstance(got["exit_points_dropped"], dict)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "paper", "lossless"])
def test_smollm2_parity(smollm2, smollm2_export, mode):
    from specee_compile.api import build_decoder, encode_prompt

    # the cost check off on both sides: the exit machinery itself is compared (on this CPU no exit point
    # pays for SmolLM2 and both runners would decode as dense: test_smollm2_cost_check_agrees); one
    # threshold of 0.5 for every point, so exits happen on this short prompt with the shipped head
    conf = {"dense": {}, "paper": {"specee": True, "threshold": 0.5},
            "lossless": {"specee": True, "mode": "lossless", "kv_policy": "backfill", "threshold": 0.5}}[mode]
    s = Settings(max_new_tokens=48, max_context=256, exit_cost_check=False, **conf)
    ids = encode_prompt(smollm2.tokenizer, "What is the capital of France?")
    ref = build_decoder(smollm2, s).generate(ids)
    got = run_runner(smollm2_export, ids, s)
    assert got["token_ids"] == ref.token_ids
    assert got["exit_layers"] == ref.exit_layers
    if mode != "dense":  # exits happened (lossless may have rolled every one back to the dense token)
        assert any(e < ref.num_layers - 1 for e in got["exit_layers"]) or got["rollbacks"] > 0
        assert got["predictor_calls"] == ref.predictor_calls and got["rollbacks"] == ref.rollbacks


@pytest.mark.slow
def test_smollm2_cost_check_agrees(smollm2, smollm2_export):
    """With the cost check on (the default), both runners apply the same rule (runtime/exit_costs.py). Given the
    Python runtime's measured costs (`--step-costs`), the C++ runner keeps and drops the same points for the same
    reasons and decodes the same tokens. With its own measurements it accounts for every point; the two
    processes' decisions are not compared there: on SmolLM2 on this CPU the rule's margin is ~7% (exits save
    ~71 ms/token against a ~76 ms draft), less than two processes' timings of a loaded 2-core machine differ
    (this comparison failed in CI that way)."""
    from specee_compile.api import build_decoder, encode_prompt

    s = Settings(max_new_tokens=24, max_context=256, specee=True)
    ids = encode_prompt(smollm2.tokenizer, "What is the capital of France?")
    ref = build_decoder(smollm2, s).generate(ids)
    costs = ref.exit_program["step_costs"]
    pinned = ",".join(f"{k}={costs[k]!r}" for k in ("layer_us", "decision_us", "draft_us", "check_us", "row_us"))
    got = run_runner(smollm2_export, ids, s, extra=("--step-costs", pinned))
    why = f"C++: {got.get('step_costs')} {got.get('exit_points_dropped')}; Python: {ref.exit_program}"
    assert got["exit_points_kept"] == ref.exit_program["exit_points_kept"], why
    # the same points dropped for the same reason (the figures in the text may differ in the last printed
    # digit: the runner computes in seconds, Python in microseconds)
    def reason(dropped):
        return {int(k): v.split(" us/token")[0].rsplit(" ", 1)[0] for k, v in dropped.items()}

    assert reason(got["exit_points_dropped"]) == reason(ref.exit_program["exit_points_dropped"]), why
    assert got["step_costs"].startswith("pinned by --step-costs")
    assert got["token_ids"] == ref.token_ids
    if not ref.exit_program["exit_points_kept"]:  # decoding as dense
        dense = build_decoder(smollm2, Settings(max_new_tokens=24, max_context=256)).generate(ids)
        assert got["token_ids"] == dense.token_ids
    own = run_runner(smollm2_export, ids, s)
    assert "the C++ runner on cpu" in own["step_costs"]
    points = sorted(own["exit_points_kept"] + [int(k) for k in own["exit_points_dropped"]])
    assert points == sorted(ref.exit_program["exit_points_kept"] + [int(k) for k in ref.exit_program["exit_points_dropped"]])
    with pytest.raises(SpecEEError, match="--step-costs"):
        run_runner(smollm2_export, ids, s, extra=("--step-costs", "layer_us=1"))


@pytest.fixture(scope="module")
def smollm2_export(smollm2, tmp_path_factory, runner):
    from specee_compile.api import default_artifacts_dir, eos_ids, load_program

    s = Settings(specee=True, max_context=256)
    program, src, _, _ = load_program(default_artifacts_dir(smollm2), smollm2, s)
    out = tmp_path_factory.mktemp("aoti_smollm2") / "smollm2"
    export_aoti_dir(smollm2.model, program, out, s, src.draft, model_name=smollm2.name,
                    fingerprint=smollm2.fingerprint, eos_ids=eos_ids(smollm2), tokenizer=smollm2.tokenizer)
    return out



CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the H200 runs are recorded in benchmarks/)")


@CUDA
@pytest.mark.parametrize("pdl", ["0", "all"])
def test_cuda_graph_dense_steps_match_python(tmp_path, monkeypatch, pdl):
    """On CUDA the runner's dense steps replay captured graphs (one per attention length, the token fed forward
    on the device, run ahead by one step): the same tokens as its per-layer calls and as the Python runtime,
    across an attention-length boundary (64) and with an early stop. (A dense export: no exit or draft package,
    so the check is quick on the device.) Exported and run under SPECEE_PDL=all (sm_90+), the packages' kernels
    wait and the runner's captured step has programmatic edges: the same tokens, with them and without."""
    if pdl == "all" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90 or newer")
    monkeypatch.setenv("SPECEE_PDL", pdl)
    model = tiny_model()
    out = tmp_path / "tiny-cuda-dense"
    export_aoti_dir(model, None, out, Settings(max_context=MAX_CONTEXT, device="cuda"), None, model_name="tiny",
                    eos_ids=(), device="cuda")  # moves the model to the GPU
    # the decode step's one-row package embeds the Python CUDA step's Triton kernels (triton_op twins); the
    # one-row head is traced with static shapes, as the Python step compiles it
    info = read_manifest(out)["cpp"]
    assert info["pdl"] == pdl and ("pdl_waiting_kernels" in info) == (pdl == "all")
    assert info["packages"]["layer1"] == "layer1.pt2" and info["packages"]["head1"] == "head1.pt2"
    assert info["layer1_attn_counters"] is True
    assert info["layer1_attn_workspace"] == workspace_numel(CFG["num_attention_heads"],
                                                            CFG["hidden_size"] // CFG["num_attention_heads"])
    dense = Settings(max_new_tokens=90, max_context=MAX_CONTEXT, device="cuda")
    for ids in PROMPTS:
        # the Python CUDA product (inductor: the same Triton kernels as layer1.pt2, so the same rounding)
        ref = python_run(model, None, None, dense.replace(backend="inductor"), ids)
        got = run_runner(out, ids, dense)
        assert got["cuda_graphs"] is True and got["capture_s"] > 0 and got["one_row_package"] is True
        assert got["token_ids"] == ref.token_ids, ids
        assert (got["pdl_edges"] > 0) == (pdl == "all"), got["pdl_edges"]
        assert result_from_json(got, "cuda").pdl == pdl  # what `generate --backend cpp --stats-json` reports
        if pdl == "all":
            plain = run_runner(out, ids, dense, extra=("--no-pdl",))
            assert plain["pdl_edges"] == 0 and plain["token_ids"] == ref.token_ids
        assert run_runner(out, ids, dense, extra=("--no-cuda-graphs",))["token_ids"] == ref.token_ids
        short = run_runner(out, ids, dense, extra=("--max-new-tokens", "5"))
        assert short["token_ids"] == ref.token_ids[:5] and short["decode_steps"] == 4


@CUDA
def test_cuda_specee_steps_match_python(tmp_path):
    """SpecEE steps that can exit keep the per-layer calls on CUDA, and match the Python runtime."""
    model, prog = tiny_model(), random_program()
    draft = random_draft(model)
    out = tmp_path / "tiny-cuda"
    export_aoti_dir(model, prog, out, Settings(max_context=MAX_CONTEXT, device="cuda"), draft, model_name="tiny",
                    eos_ids=(), device="cuda")  # moves model and draft to the GPU
    paper = Settings(max_new_tokens=24, max_context=MAX_CONTEXT, device="cuda", exit_cost_check=False,
                     **MODES["paper_thr"])
    exits = 0
    for ids in PROMPTS:
        ref = python_run(model, prog, draft, paper.replace(backend="inductor"), ids)
        got = run_runner(out, ids, paper)
        assert got["cuda_graphs"] is False
        assert (got["token_ids"], got["exit_layers"]) == (ref.token_ids, ref.exit_layers), ids
        exits += sum(e < L - 1 for e in got["exit_layers"])
    assert exits > 0
