"""scripts/gpu_check.sh, dry-run on the CPU (GPU_CHECK_DRY_RUN=1 prints each stage's command):
every stage of every call has a command line that fits one call, the files it names exist, the
Python entry points it runs import and know the options it passes, the pytest stages select
tests, each call leaves exactly its summary and its tarball of logs in $OUT (the GPU machine
returns at most 8 files), and the benchmark stages write their JSON into the logs, merged into
one bench-<call>.json in $OUT."""
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CALLS = {
    "call1": ["build", "tests"],
    "call2": ["build", "step", "overlap"],
    "call3": ["build", "data", "scale"],
    "call4": ["build", "cpp"],
    "call5": ["build", "paths"],
    "all": ["build", "tests", "step", "overlap", "data", "scale", "ops", "cpp", "paths"],
}
CALL_LIMIT_S = 480  # one command on the GPU machine: at most 600 s, less the summary and the transfer


def dry_run(tmp_path: Path, call: str, **env) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_DRY_RUN="1", GPU_CHECK_LOGS=str(tmp_path / "logs"),
               PYTHON=sys.executable, **env)
    proc = subprocess.run(["bash", str(SCRIPT), call], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, out


def stage_commands(stdout: str) -> dict[str, tuple[int, list[str]]]:
    """{stage: (its timeout in s, its command as arguments)} from a dry run's output, in order."""
    commands = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"stage (\w+): timeout (\d+) (.*?)(  #.*)?", line)
        if match:
            commands[match.group(1)] = (int(match.group(2)), shlex.split(match.group(3)))
    return commands


@pytest.fixture(scope="module")
def outs() -> dict[str, Path]:
    return {}


@pytest.fixture(scope="module")
def calls(tmp_path_factory, outs) -> dict[str, dict[str, tuple[int, list[str]]]]:
    found = {}
    for call in CALLS:
        tmp = tmp_path_factory.mktemp(call)
        proc, out = dry_run(tmp, call)
        found[call], outs[call] = stage_commands(proc.stdout), out
        assert sorted(p.name for p in out.iterdir()) == [f"logs-{call}.tar.gz", f"summary-{call}.txt"]
        summary = (out / f"summary-{call}.txt").read_text()
        assert "commit: " in summary and "dry run" in summary
        with tarfile.open(out / f"logs-{call}.tar.gz") as tar:
            assert f"{call}/summary-{call}.txt" in tar.getnames()
    return found


@pytest.mark.parametrize("call", list(CALLS))
def test_every_stage_of_every_call_has_a_command_that_fits_a_call(calls, call):
    commands = calls[call]
    assert list(commands) == CALLS[call]
    for stage, (limit, command) in commands.items():
        assert 0 < limit < CALL_LIMIT_S, stage
        if stage == "cpp":  # a shell script, given the interpreter in PYTHON
            assert command[0] == "env" and f"PYTHON={sys.executable}" in command, command
            assert command[-2:] == ["bash", "scripts/test_cpp.sh"] and "NAD_WITH_CUDA=ON" in command, command
        else:
            assert command[0] == sys.executable, stage  # the interpreter given in PYTHON
        for arg in command[1:]:
            if arg.endswith((".py", ".sh")) or arg.startswith(("python_tests", "benchmarks/")):
                assert (ROOT / arg).exists(), f"{stage}: {arg} does not exist"


def test_the_step_stage_measures_resnet50_first(calls):
    command = calls["call2"]["step"][1]
    models = command[command.index("--models") + 1:]
    assert models[:2] == ["resnet50", "vgg16"]


def test_caches_stay_under_tmp(calls, outs):
    """Out of $OUT, whose files all come back from the GPU machine."""
    for call, commands in calls.items():
        for stage, (_, command) in commands.items():
            for option in ("--cache", "--dir"):
                if option in command:
                    path = Path(command[command.index(option) + 1])
                    assert str(path).startswith("/tmp/") and not path.is_relative_to(outs[call]), (call, stage)


def test_the_commit_comes_from_gpu_commit(tmp_path):
    (tmp_path / "GPU_COMMIT").write_text("0123abc + uncommitted changes\n")
    script = tmp_path / "scripts" / "gpu_check.sh"  # a copy without .git, as on the GPU machine
    script.parent.mkdir()
    script.write_text(SCRIPT.read_text())
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_DRY_RUN="1", GPU_CHECK_LOGS=str(tmp_path / "logs"),
               GIT_CEILING_DIRECTORIES=str(tmp_path.parent))
    subprocess.run(["bash", str(script), "call1"], env=env, check=True, capture_output=True, timeout=60)
    assert "commit: 0123abc + uncommitted changes (GPU_COMMIT)" in (out / "summary-call1.txt").read_text()
    (tmp_path / "GPU_COMMIT").unlink()
    subprocess.run(["bash", str(script), "call1"], env=env, check=True, capture_output=True, timeout=60)
    assert "commit: unknown" in (out / "summary-call1.txt").read_text()


def test_the_benchmark_stages_write_json_into_the_logs(calls):
    """Into the tarball (the logs folder), never straight into $OUT: one merged file comes back."""
    for call, commands in calls.items():
        for stage, (_, command) in commands.items():
            if stage in ("step", "overlap", "data", "scale", "ops"):
                option = "--benchmark-json" if stage == "ops" else "--json"
                path = Path(command[command.index(option) + 1])
                assert path.name == f"{stage}.json" and path.parent.name == call, (call, stage, path)


def test_a_benchmark_stage_leaves_its_json_in_the_tarball_and_merged_in_out(tmp_path):
    """A real (not dry) call of the overlap stage with a stub interpreter that writes a JSON to
    ``--json`` instead of benchmarking (and runs everything else, the merge too, with this Python):
    $OUT gets the summary, the tarball with the stage's JSON, and bench-<call>.json."""
    stub = tmp_path / "python"
    case = '{"machine_info": {}, "commit_info": {}, "benchmarks": [{"group": "g", "name": "op", "stats": {}}]}'
    stub.write_text(f"""#!/usr/bin/env bash
args=("$@")
for ((i = 0; i < ${{#args[@]}}; i++)); do
  if [ "${{args[i]}}" = --json ]; then echo '{case}' > "${{args[i + 1]}}"; exit 0; fi
done
exec {shlex.quote(sys.executable)} "$@"
""")
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_LOGS=str(tmp_path / "logs"), PYTHON=str(stub),
               STAGES="overlap", GPU_CHECK_BUDGET="0")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bench-stages.json", "logs-stages.tar.gz", "summary-stages.txt"]
    with tarfile.open(out / "logs-stages.tar.gz") as tar:
        assert "stages/overlap.json" in tar.getnames()
    merged = json.loads((out / "bench-stages.json").read_text())
    assert merged["benchmarks"][0]["name"] == "op"
    assert merged["nad_bench"]["runs"][0]["file"] == "overlap.json"


def test_unknown_calls_and_stages_are_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "call9"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown call" in proc.stderr
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DRY_RUN="1", GPU_CHECK_LOGS=str(tmp_path / "logs"),
               STAGES="build warp")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "unknown stage warp" in proc.stderr


def test_the_benchmark_entry_points_import_and_take_the_options_given(calls, monkeypatch, capsys):
    """Each benchmark script a stage runs: ``--help`` lists every option the stage passes; a script
    run without options is imported (not run: that would be the benchmark)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/x.py` has it
    monkeypatch.syspath_prepend(str(ROOT))
    scripts = {}
    for commands in calls.values():
        for _, command in commands.values():
            if command[1].startswith("benchmarks/") and command[1].endswith(".py"):
                scripts[command[1]] = [a for a in command[2:] if a.startswith("--")]
    assert set(scripts) == {"benchmarks/bench_step.py", "benchmarks/bench_overlap.py", "benchmarks/bench_data.py",
                            "benchmarks/bench_scale.py", "benchmarks/bench_paths.py"}
    for script, options in scripts.items():
        path = str(ROOT / script)
        if not options:
            runpy.run_path(path, run_name="gpu_check_import")
            continue
        monkeypatch.setattr(sys, "argv", [path, "--help"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(path, run_name="__main__")
        assert exit_.value.code == 0, script
        usage = capsys.readouterr().out
        for option in options:  # spelt out, not an abbreviation argparse happens to accept
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", usage), f"{script} has no option {option}"


@pytest.mark.slow
def test_the_pytest_stages_select_tests(calls):
    """The `tests` and `ops` stages, collected on the CPU: their files import and `-k cuda`
    selects tests (the CUDA kernels' own file among them)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for stage in ("tests", "ops"):
        command = calls["all"][stage][1]  # -q among its arguments: one test id a line
        proc = subprocess.run([*command, "--collect-only"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        selected = [line for line in proc.stdout.splitlines() if "::" in line]
        assert selected, stage
        if stage == "tests":
            assert any(line.startswith("python_tests/test_ops_cuda.py::") for line in selected)
