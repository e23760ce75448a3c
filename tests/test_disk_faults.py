"""Writes that never leave debris or lose data: a full or read-only disk (a real small tmpfs, mounted in a
private mount namespace), SIGKILL and SIGINT mid-write, the staging that dead runs leave, and runs racing to
the same output directory.

Run as a script (``python test_disk_faults.py SPEC``) this module is the driver of one such scenario inside the
namespace: see :func:`scenario`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from quantkit.api import quantize
from quantkit.diskspace import OutputError
from quantkit.export import atomic
from quantkit.export.atomic import atomic_directory, remove_stale_staging
from quantkit.interrupts import interrupts_held
from quantkit.models.synthetic import SyntheticShape, write_synthetic_llama
from quantkit.schemes import QuantScheme
from quantkit.streaming.state import STATE_FILE, RunState, work_dir

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
QUANTKIT = [sys.executable, "-m", "quantkit"]
RTN = ["--method", "rtn", "--group-size", "16"]
FILLER = "filler"  # the file that takes a disk's space away
KIB = 1024


# ---------------------------------------------------------------------------------------------------------------
# The scenario driver: runs inside the namespace (or, for races on an ordinary disk, without one).


def _drive(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    disk = Path(spec["disk"])
    if spec["size"] is not None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size']}", "quantkit-test", str(disk)], check=True)
    results: dict = {}
    _steps(spec["steps"], disk, results)
    results["files"] = _listing(disk)
    Path(spec["results"]).write_text(json.dumps(results))


def _steps(steps: list[dict], disk: Path, results: dict) -> None:
    for step in steps:
        action = step.get("do", "run")
        if action == "copy":
            shutil.copytree(step["from"], disk / step["to"])
        elif action == "fill":
            _fill(disk, step["free"])
        elif action == "unfill":
            (disk / FILLER).unlink()
        elif action == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        elif action == "snapshot":
            results[step["name"]] = _listing(disk)
        elif "pause_at_block" in step:
            results[step["name"]] = _run_paused(step, disk, results)
        else:
            results[step["name"]] = _run_here(step["args"])


def _fill(disk: Path, free: int) -> None:
    """Leave ``free`` bytes (whole pages) free on ``disk``: a filler file takes the rest."""
    stat = os.statvfs(disk)
    with (disk / FILLER).open("ab") as f:
        f.write(bytes(stat.f_bavail * stat.f_frsize - free))


def _listing(disk: Path) -> dict[str, str]:
    """Every path below ``disk`` but the filler: a directory as "dir", a file as the SHA-256 of its bytes."""
    listing = {}
    for path in sorted(disk.rglob("*")):
        if path.name != FILLER:
            listing[str(path.relative_to(disk))] = "dir" if path.is_dir() else _digest(path)
    return listing


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_here(args: list[str]) -> dict:
    """``quantkit ARGS`` through its real entry point, in this process (one import for many commands)."""
    from quantkit.cli import main

    stderr = io.StringIO()
    sys.argv = ["quantkit", *args]
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
    return {"rc": code, "stderr": stderr.getvalue()}


def _run_paused(step: dict, disk: Path, results: dict) -> dict:
    """``quantkit ARGS`` (a streamed run) as a process, stopped once its state has ``pause_at_block`` blocks done
    while the ``while_paused`` steps run, then let go to its end."""
    process = subprocess.Popen([*QUANTKIT, *step["args"]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    state = work_dir(Path(step["args"][step["args"].index("-o") + 1])) / STATE_FILE
    paused = _when(process, lambda: _blocks_done(state) >= step["pause_at_block"], signal.SIGSTOP)
    if paused:
        _steps(step["while_paused"], disk, results)
        process.send_signal(signal.SIGCONT)
    return {"rc": process.wait(), "stderr": process.stderr.read(), "paused": paused}


def _blocks_done(state_file: Path) -> int:
    try:
        return json.loads(state_file.read_text())["next_block"]
    except (OSError, ValueError, KeyError):
        return 0


def _when(process: subprocess.Popen, condition: Callable[[], bool], sig: int, timeout: float = 120) -> bool:
    """Send ``sig`` to ``process`` once ``condition`` holds: the process is stopped first and the condition checked
    again, so that it holds when the signal lands however late this poller runs. False if the process ended (or
    left the condition) first; with SIGSTOP, the process is left stopped."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if condition():
            process.send_signal(signal.SIGSTOP)
            held = condition()
            if held and sig != signal.SIGSTOP:
                process.send_signal(sig)
            if not held or sig != signal.SIGSTOP:
                process.send_signal(signal.SIGCONT)
            return held
        time.sleep(0.0005)
    return False


# ---------------------------------------------------------------------------------------------------------------
# The tests.

SHAPE = SyntheticShape(num_blocks=5, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=384)
# 32 MiB of embeddings and as much head: writing its checkpoint takes long enough to be caught in the act
WIDE = SyntheticShape(num_blocks=1, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32768)


@functools.cache
def _namespace_prefix() -> tuple[str, ...] | None:
    """How to run a command in a private mount namespace where it may mount a tmpfs: as root ``unshare --mount``,
    otherwise in an unprivileged user namespace ``unshare -rm``; None where neither works."""
    if shutil.which("unshare") is None:
        return None
    with tempfile.TemporaryDirectory() as where:
        for prefix in (("unshare", "--mount"), ("unshare", "--map-root-user", "--mount")):
            probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "quantkit-probe", where],
                                   capture_output=True)
            if probe.returncode == 0:
                return prefix
    return None


@pytest.fixture(scope="module")
def namespace() -> tuple[str, ...]:
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here: neither `unshare --mount` (root) nor `unshare -rm` (an "
                    "unprivileged user namespace) may mount the small tmpfs these tests fill")
    return prefix


def scenario(folder: Path, steps: list[dict], size: int | None = None,
             prefix: tuple[str, ...] = ()) -> dict:
    """Run ``steps`` on ``folder``/disk, a fresh tmpfs of ``size`` bytes in a private mount namespace (``prefix``)
    or, without ``size``, an ordinary directory; return each named command's ``rc`` and ``stderr`` and every file
    left there (``files``: path -> SHA-256, or "dir"). Steps: ``copy`` (``from`` -> ``to``), ``fill`` (leave
    ``free`` bytes), ``unfill``, ``read-only``, ``snapshot`` (the listing now, under ``name``) or a command
    (``name``, ``args``; with ``pause_at_block``, a streamed run stopped there while ``while_paused`` runs)."""
    disk = folder / "disk"
    disk.mkdir()
    spec, results = folder / "spec.json", folder / "results.json"
    spec.write_text(json.dumps({"disk": str(disk), "size": size, "steps": steps, "results": str(results)}))
    proc = subprocess.run([*prefix, sys.executable, __file__, str(spec)], capture_output=True, text=True, env=ENV,
                          cwd=folder, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(results.read_text())


def error_line(result: dict) -> str:
    """The one line a failed command ends with (progress lines may precede it; never a traceback)."""
    assert result["rc"] != 0, result["stderr"]
    assert "Traceback" not in result["stderr"], result["stderr"]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result["stderr"]
    return lines[-1]


@pytest.fixture(scope="module")
def rtn_checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rtn") / "ckpt"
    quantize(str(tiny_model_dir), method="rtn", scheme=QuantScheme(4, 16, True), output=out)
    return out


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic") / "model"
    write_synthetic_llama(folder, SHAPE)
    return folder


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model whose checkpoint takes a while to write, and its RTN checkpoint."""
    folder = tmp_path_factory.mktemp("wide")
    write_synthetic_llama(folder / "model", WIDE)
    quantize(str(folder / "model"), method="rtn", scheme=QuantScheme(4, 64, True), output=folder / "ckpt")
    return folder / "model", folder / "ckpt"


def _streamed(model: Path, out: Path, *extra: str) -> list[str]:
    """A streamed run (RTN: about a third of a second a block here, time enough to stop it between blocks)."""
    return ["quantize", str(model), "--method", "rtn", "--group-size", "64", "--offload", "disk", "-o", str(out),
            *extra]


def _under(files: dict[str, str], prefix: str) -> dict[str, str]:
    return {path.removeprefix(prefix): digest for path, digest in files.items() if path.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------------
# A full disk: one line naming the place and the space, nothing left behind, what was there intact.


@pytest.fixture(scope="module")
def full_disk(namespace: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
              calib_file: Path, rtn_checkpoint: Path) -> tuple[Path, Path, dict]:
    """Every write path run on a 1 MiB disk with 64 KiB left (then none), next to an existing checkpoint."""
    folder = tmp_path_factory.mktemp("full")
    disk, elsewhere = folder / "disk", folder / "elsewhere"
    tiny, calib = str(tiny_model_dir), str(calib_file)
    results = scenario(folder, [
        {"do": "copy", "from": str(rtn_checkpoint), "to": "existing"},
        {"do": "fill", "free": 64 * KIB},
        {"name": "quantize", "args": ["quantize", tiny, *RTN, "-o", f"{disk}/new"]},
        {"name": "quantize --overwrite", "args": ["quantize", tiny, *RTN, "--overwrite", "-o", f"{disk}/existing"]},
        {"name": "quantize --offload disk", "args": ["quantize", tiny, *RTN, "--offload", "disk", "-o",
                                                     f"{disk}/streamed"]},
        {"name": "export", "args": ["export", str(rtn_checkpoint), "--layout", "gptq", "-o", f"{disk}/exported"]},
        {"do": "fill", "free": 0},
        {"name": "eval --report", "args": ["eval", str(rtn_checkpoint), "--ppl", calib, "--seqlen", "64",
                                           "--max-windows", "1", "--report", f"{disk}/report"]},
        {"name": "quantize --save-recipe", "args": ["quantize", tiny, *RTN, "-o", str(elsewhere),
                                                    "--save-recipe", f"{disk}/recipe.yaml"]},
        {"name": "allocate --report", "args": ["allocate", tiny, "--bits", "4.5", "--allocation", "ranked",
                                               "--score", "lim", "--group-size", "16", "--calib", calib,
                                               "--nsamples", "2", "--seqlen", "32", "--report", f"{disk}/plan.json"]},
    ], size=1024 * KIB, prefix=namespace)
    return disk, rtn_checkpoint, results


@pytest.mark.parametrize(("command", "where", "what"), [
    ("quantize", "", "the checkpoint"),
    ("quantize --overwrite", "", "the checkpoint"),
    ("quantize --offload disk", "", "the checkpoint and the run's state"),
    ("export", "", "the checkpoint"),
    ("eval --report", "/report", "the report"),
    ("quantize --save-recipe", "", "recipe.yaml"),
    ("allocate --report", "", "plan.json"),
])
def test_a_full_disk_is_one_line_naming_the_place_and_the_space(full_disk: tuple[Path, Path, dict], command: str,
                                                                where: str, what: str) -> None:
    disk, _, results = full_disk
    line = error_line(results[command])
    free = "64.0 KiB" if command in ("quantize", "quantize --overwrite", "quantize --offload disk", "export") else "0 B"
    assert re.fullmatch(f"error: not enough space in {re.escape(str(disk))}{where} for {re.escape(what)}: it needs "
                        rf"[\d.]+ (B|KiB), {free} free", line), line
    if command.startswith("quantize") and command != "quantize --save-recipe":  # refused before quantizing
        assert " block " not in results[command]["stderr"], results[command]["stderr"]


def test_a_full_disk_leaves_nothing_behind_and_the_existing_checkpoint_intact(full_disk: tuple[Path, Path, dict]) -> None:
    _, existing, results = full_disk
    assert results["files"] == {"existing": "dir", **{f"existing/{k}": v for k, v in _listing(existing).items()}}


def test_a_disk_that_fills_up_during_the_write_is_one_line_and_leaves_nothing(
        namespace: tuple[str, ...], tmp_path: Path, tiny_model_dir: Path, rtn_checkpoint: Path) -> None:
    # Room for the tensors and config.json (what is checked first) but not for the tokenizer written after them.
    room = sum(-(-(rtn_checkpoint / name).stat().st_size // (4 * KIB)) * 4 * KIB
               for name in ("model.safetensors", "config.json"))
    results = scenario(tmp_path, [{"do": "fill", "free": room + 4 * KIB},
                                  {"name": "quantize", "args": ["quantize", str(tiny_model_dir), *RTN, "-o",
                                                                f"{tmp_path}/disk/out"]}],
                       size=1024 * KIB, prefix=namespace)
    line = error_line(results["quantize"])
    assert line.startswith(f"error: not enough space in {tmp_path}/disk for the checkpoint: the disk filled up "
                           "while it was written (at least "), line
    assert results["files"] == {}


def test_a_streamed_run_whose_disk_fills_keeps_its_blocks_and_resumes_when_there_is_room(
        namespace: tuple[str, ...], tmp_path: Path, synthetic_dir: Path) -> None:
    out = tmp_path / "disk" / "out"
    results = scenario(tmp_path, [
        {"name": "reference", "args": _streamed(synthetic_dir, out.with_name("reference"))},
        {"name": "filled", "args": _streamed(synthetic_dir, out), "pause_at_block": 1,
         "while_paused": [{"do": "fill", "free": 0}]},
        {"do": "snapshot", "name": "kept"},
        {"do": "unfill"},
        {"name": "rerun", "args": _streamed(synthetic_dir, out)},
    ], size=64 * 1024 * KIB, prefix=namespace)
    assert results["filled"]["paused"], "the run ended before the disk could be filled"
    line = error_line(results["filled"])
    assert line.startswith(f"error: not enough space in {out.parent}"), line
    assert f"blocks are kept in {work_dir(out)}: rerun the same command to" in line, line
    assert "out.partial/state.json" in results["kept"] and "out" not in results["kept"]
    assert results["rerun"]["rc"] == 0, results["rerun"]["stderr"]
    assert "resuming at block" in results["rerun"]["stderr"] or "blocks are done" in results["rerun"]["stderr"]
    assert _under(results["files"], "out/") == _under(results["files"], "reference/")
    assert sorted(name for name in results["files"] if "/" not in name) == ["out", "reference"]


def test_a_streamed_run_too_big_for_the_disk_is_refused_before_it_starts(
        namespace: tuple[str, ...], tmp_path: Path, synthetic_dir: Path) -> None:
    out = tmp_path / "disk" / "out"
    results = scenario(tmp_path, [{"name": "run", "args": _streamed(synthetic_dir, out)}],
                       size=256 * KIB, prefix=namespace)
    line = error_line(results["run"])
    assert line.startswith(f"error: not enough space in {out.parent} for the checkpoint and the run's state: it "
                           "needs "), line
    assert "blocks are kept" not in line and results["files"] == {}


@pytest.mark.parametrize("command", ["quantize", "quantize --overwrite", "export", "eval --report",
                                     "quantize --save-recipe", "allocate --report"])
def test_a_read_only_output_is_one_line_before_any_work(namespace: tuple[str, ...], tmp_path: Path, command: str,
                                                        tiny_model_dir: Path, calib_file: Path,
                                                        rtn_checkpoint: Path) -> None:
    disk, tiny = tmp_path / "disk", str(tiny_model_dir)
    args = {
        "quantize": ["quantize", tiny, *RTN, "-o", f"{disk}/out"],
        "quantize --overwrite": ["quantize", tiny, *RTN, "--overwrite", "-o", f"{disk}/existing"],
        "export": ["export", str(rtn_checkpoint), "--layout", "gptq", "-o", f"{disk}/out"],
        "eval --report": ["eval", str(rtn_checkpoint), "--ppl", str(calib_file), "--seqlen", "64", "--max-windows",
                          "1", "--report", f"{disk}/report"],
        "quantize --save-recipe": ["quantize", tiny, *RTN, "-o", f"{tmp_path}/out", "--save-recipe",
                                   f"{disk}/recipe.yaml"],
        "allocate --report": ["allocate", tiny, "--bits", "4.5", "--allocation", "ranked", "--score", "lim",
                              "--group-size", "16", "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "32",
                              "--report", f"{disk}/plan.json"],
    }[command]
    results = scenario(tmp_path, [{"do": "copy", "from": str(rtn_checkpoint), "to": "existing"},
                                  {"do": "read-only"}, {"name": command, "args": args}],
                       size=1024 * KIB, prefix=namespace)
    assert error_line(results[command]) == f"error: cannot write to {disk}: Read-only file system"
    assert _under(results["files"], "existing/") == _listing(rtn_checkpoint)


def _denied(folder: Path) -> tuple[str, ...]:
    """Make ``folder`` deny this user writing; return the prefix to run commands under. A user other than root
    gets that from mode 0555; root overrides modes, except in a user namespace where the folder's owner (nobody)
    is not mapped."""
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return ()
    os.chown(folder, 65534, 65534)
    prefix = ("unshare", "--map-root-user")
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without user namespaces: no folder can deny this process writing")
    return prefix


@pytest.mark.parametrize("command", ["quantize", "allocate --report"])
def test_a_folder_without_write_permission_is_one_line(tmp_path: Path, command: str, tiny_model_dir: Path,
                                                       calib_file: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    args = {"quantize": ["quantize", str(tiny_model_dir), *RTN, "-o", f"{folder}/out"],
            "allocate --report": ["allocate", str(tiny_model_dir), "--bits", "4.5", "--allocation", "ranked",
                                  "--score", "lim", "--group-size", "16", "--calib", str(calib_file), "--nsamples",
                                  "2", "--seqlen", "32", "--report", f"{folder}/plan.json"]}[command]
    proc = subprocess.run([*_denied(folder), *QUANTKIT, *args], capture_output=True, text=True, env=ENV)
    folder.chmod(0o755)
    assert error_line({"rc": proc.returncode, "stderr": proc.stderr}) == \
        f"error: cannot write to {folder}: Permission denied"
    assert list(folder.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Dead runs' staging: removed by the next run writing the same output, never a live run's.


def _appears(folder: Path, prefix: str) -> Callable[[], bool]:
    return lambda: any(entry.name.startswith(prefix) for entry in os.scandir(folder))


def test_sigkill_during_export_leaves_staging_that_the_next_run_removes(tmp_path: Path,
                                                                        wide_checkpoint: tuple[Path, Path]) -> None:
    _, checkpoint = wide_checkpoint
    out = tmp_path / "out"
    command = [*QUANTKIT, "export", str(checkpoint), "--layout", "gptq", "-o", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    assert _when(process, _appears(tmp_path, ".out.tmp-"), signal.SIGKILL), "the export ended before it was killed"
    process.wait()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and not out.exists()
    rerun = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed what interrupted runs writing {out} left beside it: {left[0]}" in rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_runs_staging_is_never_removed_a_dead_ones_is(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from quantkit.export.atomic import staging_beside\n"
         f"with staging_beside(Path({str(out)!r})) as staging:\n    print(staging, flush=True)\n    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    staging = Path(holder.stdout.readline().strip())
    remove_stale_staging(out)
    assert staging.is_dir() and capsys.readouterr().err == ""
    holder.kill()
    holder.wait()
    assert staging.is_dir()
    remove_stale_staging(out)
    assert not staging.exists() and f"left beside it: {staging.name}" in capsys.readouterr().err


def test_an_output_a_run_killed_while_replacing_it_had_moved_aside_is_put_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    retired = tmp_path / ".out.old-abc123"
    retired.mkdir()
    (retired / "config.json").write_text("{}")
    remove_stale_staging(out)
    assert (out / "config.json").read_text() == "{}" and not retired.exists()


def test_a_killed_streamed_run_then_a_resident_run_leaves_no_state(tmp_path: Path, synthetic_dir: Path) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen([*QUANTKIT, *_streamed(synthetic_dir, out)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=ENV)
    assert _when(process, lambda: _blocks_done(work_dir(out) / STATE_FILE) >= 1, signal.SIGKILL)
    process.wait()
    assert work_dir(out).is_dir()
    resident = subprocess.run([*QUANTKIT, "quantize", str(synthetic_dir), *RTN, "-o", str(out)], capture_output=True,
                              text=True, env=ENV)
    assert resident.returncode == 0, resident.stderr
    assert f"removed {work_dir(out)}, the state of an interrupted --offload disk run, now that {out} is written" \
        in resident.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_streamed_runs_state_survives_a_resident_run_to_the_same_output(tmp_path: Path,
                                                                               tiny_model_dir: Path) -> None:
    live = RunState.open(tmp_path / "out", {"a": "run"})
    try:
        quantize(str(tiny_model_dir), method="rtn", scheme=QuantScheme(4, 16, True), output=tmp_path / "out")
        assert (work_dir(tmp_path / "out") / STATE_FILE).is_file()
    finally:
        live.release()
    live.discard()


# ---------------------------------------------------------------------------------------------------------------
# Races to the same output: never a silent replacement, never a corrupt mix, one line for the loser.


@pytest.mark.parametrize("exchange", [True, False])  # False: a file system without renameat2 RENAME_EXCHANGE (NFS)
def test_an_output_published_meanwhile_is_refused_without_overwrite_and_replaced_with_it(
        tmp_path: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not exchange:
        monkeypatch.setattr("quantkit.export.atomic._exchange", lambda _a, _b: False)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=f"output directory {out} was written by another run while this one "
                                          "worked; pass --overwrite to replace it"):
        with atomic_directory(out) as staging:
            (staging / "mine").write_text("mine")
            with atomic_directory(out) as other:  # another run publishes first
                (other / "theirs").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "theirs").read_text() == "theirs"
    with atomic_directory(out, overwrite=True) as staging:
        (staging / "mine").write_text("mine")
    assert sorted(p.name for p in out.iterdir()) == ["mine"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_put_at_the_output_meanwhile_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="exists and is not a directory"):
        with atomic_directory(out, overwrite=True) as staging:
            (staging / "mine").write_text("mine")
            out.write_text("a file")
    assert out.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_streamed_run_does_not_replace_an_output_written_while_it_ran_and_overwrite_only_publishes(
        tmp_path: Path, synthetic_dir: Path) -> None:
    out = tmp_path / "disk" / "out"
    results = scenario(tmp_path, [
        {"name": "reference", "args": _streamed(synthetic_dir, out.with_name("reference"))},
        {"name": "streamed", "args": _streamed(synthetic_dir, out), "pause_at_block": 1,
         "while_paused": [{"name": "resident", "args": ["quantize", str(synthetic_dir), *RTN, "-o", str(out)]},
                          {"do": "snapshot", "name": "resident output"}]},
        {"do": "snapshot", "name": "after"},
        {"name": "overwrite", "args": _streamed(synthetic_dir, out, "--overwrite")},
    ])
    assert results["streamed"]["paused"] and results["resident"]["rc"] == 0, results["resident"]["stderr"]
    line = error_line(results["streamed"])
    assert line == (f"error: output directory {out} was written by another run while this one worked; pass "
                    f"--overwrite to replace it; all {SHAPE.num_blocks} blocks are kept in {work_dir(out)}: rerun "
                    "the same command to publish them")
    reference = _under(results["files"], "reference/")
    resident_files = _under(results["resident output"], "out/")
    assert _under(results["after"], "out/") == resident_files != reference
    assert "out.partial/state.json" in results["after"]
    assert results["overwrite"]["rc"] == 0, results["overwrite"]["stderr"]
    assert f"all {SHAPE.num_blocks} blocks are done in {work_dir(out)}; publishing" in results["overwrite"]["stderr"]
    assert _under(results["files"], "out/") == reference
    assert sorted(name for name in results["files"] if "/" not in name) == ["out", "reference"]


def test_two_resident_runs_at_once_give_one_complete_checkpoint_and_one_line(tmp_path: Path, tiny_model_dir: Path,
                                                                            rtn_checkpoint: Path) -> None:
    out = tmp_path / "out"
    command = [*QUANTKIT, "quantize", str(tiny_model_dir), *RTN, "-o", str(out)]
    runs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
            for _ in range(2)]
    outcomes = sorted(({"rc": run.wait(), "stderr": run.stderr.read()} for run in runs), key=lambda r: r["rc"])
    assert outcomes[0]["rc"] == 0, outcomes[0]["stderr"]
    line = error_line(outcomes[1])
    assert (line == f"error: output directory {out} already exists and is not empty; pass --overwrite to replace it"
            or line == f"error: output directory {out} was written by another run while this one worked; pass "
                       "--overwrite to replace it"), line
    written, expected = _listing(out), _listing(rtn_checkpoint)
    assert written.keys() == expected.keys() and written["model.safetensors"] == expected["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C: exit 130 with one line; a streamed run keeps its state and says how to resume; no staging anywhere.


def _interrupted(process: subprocess.Popen) -> str:
    """The last stderr line of ``process`` after a Ctrl-C, which must exit 130 and say so."""
    stderr = process.communicate()[1]
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    line = [line for line in stderr.splitlines() if line.strip()][-1]
    assert line.startswith("error: interrupted"), stderr
    return line


def test_ctrl_c_while_finalizers_run_is_held_and_raised_after_not_lost() -> None:
    class Finalized:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C landing while gc.collect() runs a finalizer

    with pytest.raises(KeyboardInterrupt), interrupts_held():
        cycle = Finalized()
        cycle.self = cycle
        del cycle
        gc.collect()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_an_output_is_replaced_waits_until_the_new_one_is_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the two-rename path, the one a cut would break
    renames, rename = [], os.rename

    def interrupted_rename(source: Path, target: Path) -> None:
        renames.append(target)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C between the renames
        rename(source, target)

    monkeypatch.setattr(os, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt), atomic_directory(out, overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert len(renames) == 3  # onto the occupied output, the old one aside, the new one in
    assert [p.name for p in out.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_ctrl_c_in_a_streamed_run_keeps_its_state_and_names_it(tmp_path: Path, synthetic_dir: Path) -> None:
    out = tmp_path / "out"
    command = [*QUANTKIT, *_streamed(synthetic_dir, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    assert _when(process, lambda: _blocks_done(work_dir(out) / STATE_FILE) >= 1, signal.SIGINT)
    assert _interrupted(process) == (f"error: interrupted; rerun the same command to resume from {work_dir(out)}")
    assert (work_dir(out) / STATE_FILE).is_file() and not out.exists()
    rerun = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0 and "resuming at block" in rerun.stderr, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("command", ["quantize", "export", "eval --report"])
def test_ctrl_c_while_writing_leaves_no_staging(tmp_path: Path, command: str, wide_checkpoint: tuple[Path, Path],
                                                calib_file: Path) -> None:
    model, checkpoint = wide_checkpoint
    out = tmp_path / "out"
    args, watched = {
        "quantize": (["quantize", str(model), *RTN, "-o", str(out)], tmp_path),
        "export": (["export", str(checkpoint), "--layout", "gptq", "-o", str(out)], tmp_path),
        "eval --report": (["eval", str(checkpoint), "--ppl", str(calib_file), "--seqlen", "64", "--max-windows", "1",
                           "--report", str(out)], out),
    }[command]
    process = subprocess.Popen([*QUANTKIT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=ENV)
    prefix = ".report.json.tmp-" if command == "eval --report" else ".out.tmp-"
    caught = _when(process, lambda: watched.is_dir() and _appears(watched, prefix)(), signal.SIGINT)
    assert caught, "the command ended before it was interrupted"
    _interrupted(process)
    assert list(tmp_path.iterdir()) == [], [str(p) for p in tmp_path.rglob("*")]


if __name__ == "__main__":
    _drive(sys.argv[1])
