"""sezm's caching CPU allocator for torch's tensors (``cpu_allocator.cpp``).

A training step or an evaluation allocates and frees hundreds of edge-sized tensors of a few
dozen sizes, in the same pattern every time. glibc serves them from its heap, which fragments:
DPA4-Mini's training step on the bundled water data peaks at ~1,980 MB. A caching allocator
that carves large requests best-fit from 128 MB segments, splits blocks and merges freed
neighbours holds the same steps in ~1,590 MB and is ~8-18 % faster (fewer first-touch page
faults); evaluation is 5-16 % faster and smaller too. On one thread the numbers are bitwise
the same, as only where tensors live changes (``benchmarks/RESULTS.md``). The memory it takes
stays with the process (as glibc's heap does under :func:`sezm.runtime.tune_allocator`).

The allocator is a small C++ library compiled against the installed torch with
``torch.utils.cpp_extension`` (a C++ compiler and ninja; the ``ninja`` wheel is a dependency):
about 2 s, once per machine, source, torch and Python version, into
``<torch extensions dir>/sezm_cpu_allocator_<hash>`` (``TORCH_EXTENSIONS_DIR`` moves it).
:func:`sezm.runtime.tune_allocator` installs it for CPU runs (``sezm train``, ``DeepPot`` and
everything built on it) before they allocate anything large. Where it cannot be compiled or
loaded, the process keeps glibc's allocator and the log says why (the compiler's output goes to
``build.log`` there). ``SEZM_CPU_ALLOCATOR=system`` keeps glibc's allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

#: The environment variable that chooses the allocator, and its values.
ENV = "SEZM_CPU_ALLOCATOR"
CHOICES = ("caching", "system")

_SOURCE = Path(__file__).with_suffix(".cpp")
_CFLAGS = ("-O2",)
#: libc10's folder, written into the library: preloaded, it finds its libtorch without help.
_LDFLAGS = (f"-Wl,-rpath,{Path(torch.__file__).parent / 'lib'}",)
_library: ctypes.CDLL | None = None


@contextlib.contextmanager
def _torch_build_notices_quiet():
    """``torch.utils.cpp_extension``'s notices (no CUDA runtime on a CPU machine, the compiler
    ABI check) left out of the run's log while it is imported or builds."""
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch_log.setLevel(level)


def build_directory() -> Path:
    """Where the library of this source, torch and Python is compiled."""
    with _torch_build_notices_quiet():
        from torch.utils.cpp_extension import get_default_build_root

    versions = (torch.__version__, platform.python_version())
    key = "\0".join((_SOURCE.read_text(), *versions, *_CFLAGS, *_LDFLAGS))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"sezm_cpu_allocator_{digest}"


def _library_file(directory: Path) -> Path:
    return directory / f"{directory.name}.so"


def choice() -> str:
    """The allocator ``SEZM_CPU_ALLOCATOR`` asks for (default ``caching``)."""
    value = os.environ.get(ENV, "caching").strip().lower() or "caching"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    return value


def install() -> str:
    """Make the caching allocator torch's CPU allocator (compiling it first if need be); the
    line that says which allocator is in force."""
    global _library
    if choice() == "system":
        return f"CPU allocator: glibc's ({ENV}=system)"
    if not sys.platform.startswith("linux"):
        return "CPU allocator: the system's (sezm's caching allocator is built on Linux only)"
    if _library is not None:
        return "CPU allocator: sezm's caching allocator"
    directory = build_directory()
    library = _library_file(directory)
    compiled = ""
    if not library.is_file():
        if (directory / "lock").exists():  # never wait on another process (or a stale lock)
            return (
                "CPU allocator: glibc's; sezm's caching allocator is being compiled by another "
                f"process (if none is running, remove {directory / 'lock'})"
            )
        start = time.perf_counter()
        try:
            _compile(directory)
        except Exception as err:  # no compiler, no ninja, a torch without headers, ...
            return (
                f"CPU allocator: glibc's; sezm's caching allocator (~20 % less peak memory) "
                f"did not compile: {_reason(str(err))} (full output: "
                f"{directory / 'build.log'}). {ENV}=system skips the attempt"
            )
        compiled = f", compiled in {time.perf_counter() - start:.1f} s into {directory}"
    try:
        _library = ctypes.CDLL(str(library))  # loading the library installs it
    except OSError as err:
        return f"CPU allocator: glibc's; {library} did not load ({err})"
    return f"CPU allocator: sezm's caching allocator{compiled}"


def library_path() -> Path:
    """The compiled library, compiling it first if need be. Loading it installs it: a program
    that links libtorch without Python (LAMMPS) takes it with ``LD_PRELOAD``."""
    directory = build_directory()
    if not _library_file(directory).is_file():
        _compile(directory)
    return _library_file(directory)


def stats() -> dict[str, int] | None:
    """``reserved``, ``in_use``, ``peak_in_use`` bytes, ``segments`` and ``free_blocks`` of the
    caching allocator; ``None`` when it is not in force."""
    if _library is None:
        return None
    out = (ctypes.c_int64 * 5)()
    _library.sezm_cpu_allocator_stats(out)
    return dict(zip(("reserved", "in_use", "peak_in_use", "segments", "free_blocks"), out))


def _compile(directory: Path) -> None:
    """Compile the library into ``directory``; a failure's output goes to ``build.log``."""
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    log_file = directory / "build.log"
    path = os.environ.get("PATH", "")
    with contextlib.suppress(ImportError):  # the ninja wheel's binary, wherever the venv is
        import ninja

        path = f"{ninja.BIN_DIR}{os.pathsep}{path}"
    saved_path, os.environ["PATH"] = os.environ.get("PATH"), path
    try:
        with _torch_build_notices_quiet():
            load(
                name=directory.name,
                sources=[str(_SOURCE)],
                extra_cflags=list(_CFLAGS),  # copies: torch appends its own flags to these
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(directory),
                is_python_module=False,
            )
    except Exception as err:
        log_file.write_text(f"{type(err).__name__}: {err}\n")
        raise
    finally:
        if saved_path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved_path
    log_file.unlink(missing_ok=True)


def _reason(text: str) -> str:
    """The line of a compilation error that says what went wrong."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    telling = [
        line
        for line in lines
        if any(k in line for k in ("error", "not found", "required", "No such file"))
        and not line.startswith(("ninja:", "FAILED:"))
    ]
    return (telling or lines or ["no output"])[-1][:300]


if __name__ == "__main__":  # python -m sezm.cpu_allocator: the library's path, for LD_PRELOAD
    print(library_path())
