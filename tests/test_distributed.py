"""Expert-parallel quantize and window-parallel eval with torch.distributed: two ranks on this CPU (gloo,
launched by torchrun) give the bytes and figures of one process at the same thread count, a killed or
hung rank ends the run with one line, and --resume finishes it with the same bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_MISTRAL, save_model

from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.distributed import SINGLE, Ranks
from mixtral_quant.loading import new_model
from mixtral_quant.recipe import RECIPES, shipped_recipes

HELPER = str(Path(__file__).with_name("ranks_run.py"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
NOT_COMPARED = {"run_log.json", "manifest.json"}  # wall-clock seconds, and the manifest that hashes them


def run(cmd: list[str], timeout: float = 900, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env={**os.environ, **ONE_THREAD, **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in NOT_COMPARED}


def same_artifacts(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    differ = [n for n in fa if fa[n] != fb[n]]
    assert not differ, f"{a.name}: {differ} differ"


@pytest.fixture(scope="module")
def recipes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every shipped recipe, plus the expert policies the shipped ones do not use: every token through
    every expert, and the all-tokens fallback of experts under a 20 % share (routed and shared Hessians
    on the same rank)."""
    d = tmp_path_factory.mktemp("recipes")
    for name in shipped_recipes():
        shutil.copyfile(RECIPES / f"{name}.toml", d / f"{name}.toml")
    base = (RECIPES / "gptq-w4g128.toml").read_text()
    (d / "gptq-all-tokens.toml").write_text(base.replace('policy = "routed"', 'policy = "all-tokens"')
                                            .replace('name = "gptq-w4g128"', 'name = "gptq-all-tokens"'))
    (d / "gptq-fallback.toml").write_text(base.replace("min_token_share = 0.005", "min_token_share = 0.2")
                                          .replace('fallback = "rtn"', 'fallback = "all-tokens"')
                                          .replace('name = "gptq-w4g128"', 'name = "gptq-fallback"'))
    assert "all-tokens" in (d / "gptq-fallback.toml").read_text()
    return d


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory: pytest.TempPathFactory, recipes_dir: Path) -> tuple[Path, Path, list[str]]:
    """Each recipe quantized by one process and by two ranks (8 sequences of 128 tokens)."""
    names = sorted(p.stem for p in recipes_dir.glob("*.toml"))
    paths = [str(recipes_dir / f"{n}.toml") for n in names]
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run([sys.executable, HELPER, "quantize", str(one), "8", "128", str(DEFAULT_MODEL), *paths])
    run([*TORCHRUN, HELPER, "quantize", str(two), "8", "128", str(DEFAULT_MODEL), *paths], MIXTRAL_QUANT_TIMEOUT="120")
    return one, two, names


def test_two_ranks_quantize_every_shipped_recipe_to_the_bytes_of_one_process(both_runs):
    one, two, names = both_runs
    assert set(shipped_recipes()) < set(names)
    for name in names:
        same_artifacts(one / name, two / name)
    calib = json.loads((two / "gptq-fallback" / "calibration.json").read_text())
    assert any("all-tokens" in why for why in calib["fallbacks"].values())  # the shared-Hessian path ran


def test_two_ranks_quantize_a_dense_mistral_to_the_same_bytes(tmp_path):
    from dataclasses import replace

    cfg = replace(SMALL_MISTRAL, vocab_size=32000, hidden_size=128, intermediate_size=256, initializer_range=0.02,
                  num_hidden_layers=3)  # layers owned by rank 0, 1, 0
    src = save_model(new_model(cfg, seed=5), tmp_path / "mistral")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", src / "tokenizer.model")
    run([sys.executable, HELPER, "quantize", str(tmp_path / "one"), "4", "64", str(src), "gptq-w4g128", "nf4"])
    run([*TORCHRUN, HELPER, "quantize", str(tmp_path / "two"), "4", "64", str(src), "gptq-w4g128", "nf4"])
    for name in ("gptq-w4g128", "nf4"):
        same_artifacts(tmp_path / "one" / name, tmp_path / "two" / name)


def test_two_ranks_eval_has_the_figures_of_one_process(both_runs, tmp_path):
    one, _, _ = both_runs
    variants = [str(one / "gptq-w4g128"), str(one / "nf4"), str(one / "awq-w4g128")]
    run([sys.executable, HELPER, "eval", str(tmp_path / "one"), "2560", str(DEFAULT_MODEL), *variants])
    run([*TORCHRUN, HELPER, "eval", str(tmp_path / "two"), "2560", str(DEFAULT_MODEL), *variants])
    a, b = (json.loads((tmp_path / r / "report.json").read_text()) for r in ("one", "two"))
    assert b["settings"]["ranks"] == 2 and a["settings"]["ranks"] == 1
    for ma, mb in zip([a["baseline"], *a["variants"]], [b["baseline"], *b["variants"]], strict=True):
        assert ma["name"] == mb["name"]
        assert ma["perplexity"] == mb["perplexity"]  # every float equal: the sums are added in window order
        assert ma["comparison"] == mb["comparison"]
        assert ma["perplexity"]["windows"] == 10  # 2560 tokens in windows of 256, split 5 + 5 over the ranks
        assert mb["speed"] is not None  # measured by the rank that owns the model, handed to rank 0


def _worker_pid(launcher: subprocess.Popen[str], rank: int) -> int:
    """The pid of ``rank`` among the launcher's children (their environment holds RANK)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher.pid and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} under pid {launcher.pid}")


def _start_and_hit_rank1(out: Path, sig: signal.Signals, timeout_s: int) -> tuple[subprocess.Popen[str], int, float]:
    """Start a 2-rank quantize of the tiny model and send ``sig`` to rank 1 once layer 0 is committed."""
    cmd = [*TORCHRUN, "-m", "mixtral_quant", "quantize", "--recipe", "gptq-w4g128", "--samples", "48",
           "--out", str(out), "-q"]  # fmt: skip
    env = {**os.environ, **ONE_THREAD, "MIXTRAL_QUANT_TIMEOUT": str(timeout_s)}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = Path(f"{out}.partial") / "state.json"
    deadline = time.time() + 600
    while not (state.is_file() and json.loads(state.read_text())["layers_done"] >= 1):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    pid = _worker_pid(launcher, 1)
    os.kill(pid, sig)
    return launcher, pid, time.time()


def _our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference_48(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref48")
    run([sys.executable, HELPER, "quantize", str(out), "48", "512", str(DEFAULT_MODEL), "gptq-w4g128"])
    return out / "gptq-w4g128"


def test_killed_rank_ends_the_run_and_resume_gives_the_same_bytes(tmp_path, reference_48):
    out = tmp_path / "art"
    launcher, _, hit = _start_and_hit_rank1(out, signal.SIGKILL, 60)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and time.time() - hit < 60
    lines = _our_lines(err)
    assert len(lines) == 1 and "rank 0" in lines[0] and "--resume" in lines[0], err[-3000:]
    assert not out.exists()  # the artifact appears only when complete
    state = json.loads((Path(f"{out}.partial") / "state.json").read_text())
    assert 1 <= state["layers_done"] < 4
    run([*TORCHRUN, "-m", "mixtral_quant", "quantize", "--recipe", "gptq-w4g128", "--samples", "48", "--out",
         str(out), "-q", "--resume"])  # fmt: skip
    same_artifacts(reference_48, out)


def test_hung_rank_ends_the_others_at_the_collective_timeout(tmp_path):
    out = tmp_path / "art"
    launcher, pid, hit = _start_and_hit_rank1(out, signal.SIGSTOP, 8)
    assert launcher.stderr is not None
    try:
        line = ""
        while not line.startswith("error:"):  # rank 0's line, before the launcher's own report
            line = launcher.stderr.readline()
            assert line, "rank 0 ended without an error line"
        waited = time.time() - hit
    finally:
        os.kill(pid, signal.SIGCONT)  # let the stopped rank take the launcher's SIGTERM
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "lost the other ranks" in line and "timed out" in line.lower() and "--resume" in line
    assert 8 <= waited < 8 + 30  # the timeout, plus at most the rest of the layer rank 0 was computing


def test_single_rank_collectives_are_the_identity():
    assert SINGLE.share({"a": 1}, 0, "x") == {"a": 1}
    assert SINGLE.gather(3, "x") == [3]
    assert SINGLE.from_main(lambda: 7, "x") == 7
    SINGLE.close()  # nothing to leave
    assert [Ranks(1, 2).mine(e) for e in range(4)] == [False, True, False, True]
    assert Ranks(0, 3).owner(7) == 1


def test_commands_that_do_not_spread_refuse_torchrun():
    done = subprocess.run([sys.executable, "-m", "mixtral_quant", "export", "gguf", "--out", "x.gguf"],
                          env={**os.environ, "WORLD_SIZE": "2"}, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert _our_lines(done.stderr) == ["error: export runs in one process, not under torchrun (WORLD_SIZE=2); "
                                       "quantize and eval spread over ranks"]
    assert not Path("x.gguf").exists()
