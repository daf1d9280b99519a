"""Export a checkpoint as a PEFT LoRA adapter and/or a merged model plain transformers loads.

Both are written to a fresh temporary folder beside the target and moved into place, so an
export is either complete or absent. Weights are safetensors only.

tuneloop never deletes or overwrites what it did not write: every export folder gets a
manifest of the files tuneloop put there (``MARKER``). Exporting again into such a folder
replaces those files and keeps any other; a folder holding files tuneloop did not write is
refused unless ``force`` (then the export goes beside them, and still never over one of them).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .model_card import write_card
from .models import Resident, load_model, resolve_base, tokenizer_source
from .storage import refuse_links

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MARKER = ".tuneloop-export.json"


class DestinationInUse(FileExistsError):
    """The target holds files tuneloop did not write; the message names them."""


@contextmanager
def _staging(dest: Path):
    """A new, empty folder beside ``dest`` (same file system, so the final moves are renames),
    removed at the end whatever happened: it is tuneloop's own."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the export unreadable to others
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def written_by_tuneloop(folder: Path) -> set[str]:
    """Names of the files a previous export put into ``folder`` (none if it has no manifest)."""
    try:
        names = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    # plain names only: a manifest naming "../x" must not reach outside the folder
    return {n for n in names if isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n}


def check_destination(dest: Path, force: bool = False, names: set[str] = frozenset()) -> None:
    """Refuse ``dest`` when the export would delete or overwrite files tuneloop did not write."""
    if dest.exists() and not dest.is_dir():
        raise DestinationInUse(f"{dest} is a file, not a folder; not exporting over it")
    if not dest.is_dir():
        return
    foreign = {p.name for p in dest.iterdir()} - written_by_tuneloop(dest) - {MARKER}
    if foreign and not force:
        raise DestinationInUse(f"{dest} holds files tuneloop did not write ({', '.join(sorted(foreign)[:5])}"
                               f"{', ...' if len(foreign) > 5 else ''}); choose a new or empty folder, or pass "
                               "--force to write the export beside them")
    if clash := foreign & set(names):
        raise DestinationInUse(f"{dest}: the export would overwrite {', '.join(sorted(clash))}, which tuneloop "
                               "did not write; not even --force replaces those")


def _place(tmp: Path, dest: Path, force: bool, about: dict | None = None) -> Path:
    """Move the export in ``tmp`` to ``dest``, replacing only what an earlier export wrote there;
    ``about``: more for the manifest (the base's path, the fallback of a portable name)."""
    names = {p.name for p in tmp.iterdir()}
    check_destination(dest, force, names)
    manifest = json.dumps({"files": sorted(names), **(about or {})}, indent=1)
    if not dest.exists():
        (tmp / MARKER).write_text(manifest)
        tmp.rename(dest)
        return dest
    old = written_by_tuneloop(dest)
    for name in old:  # ours, from an earlier export
        path = dest / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for name in names:
        (tmp / name).rename(dest / name)
    (dest / MARKER).write_text(manifest)
    return dest


def _copy_tokenizer(src_dirs: list[Path], dest: Path) -> None:
    for name in TOKENIZER_FILES:
        for src in src_dirs:
            if (src / name).exists():
                shutil.copy2(src / name, dest / name)
                break


def export_adapter(checkpoint: Path, base: Path | str, dest: Path, force: bool = False, base_name: str | None = None,
                   card: str | None = None) -> Path:
    """Adapter weights + config + tokenizer (+ ``card``, the model card). The config names the
    base by ``base_name`` (``models.portable_name``: a hub id or ``package:DIST`` that loads on
    another machine); ``base``, where it was trained from here, goes in the manifest as the
    fallback ``base_of`` takes when the name does not resolve."""
    check_destination(dest, force)  # before the work, not only after it
    refuse_links(checkpoint)
    with _staging(dest) as tmp:
        for name in ADAPTER_FILES:
            if (checkpoint / name).exists():
                shutil.copy2(checkpoint / name, tmp / name)
        if not (tmp / "adapter_model.safetensors").exists():
            raise FileNotFoundError(f"{checkpoint}: no adapter_model.safetensors")
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_name or str(base)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        bases = [Path(base)] if Path(str(base)).is_dir() else []
        _copy_tokenizer([checkpoint, *bases], tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)  # instead of PEFT's empty template
        return _place(tmp, dest, force, {"base_path": str(Path(base).resolve()) if Path(str(base)).is_dir() else str(base)})


def export_merged(checkpoint: Path, base: Path | str, adapter: bool, dest: Path, force: bool = False,
                  resident: Resident | None = None, card: str | None = None) -> Path:
    """Base with the adapter merged in (or the full fine-tuned weights), as safetensors (+
    ``card``, the model card); ``resident``: a base kept in memory (the checkpoint service's),
    merged into a copy."""
    from transformers import AutoTokenizer

    check_destination(dest, force)
    refuse_links(checkpoint)
    with _staging(dest) as tmp:
        if resident is not None and adapter:
            resident.save_merged(base, checkpoint, tmp)
        else:
            load_model(base, checkpoint, adapter).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_source(base, checkpoint)).save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        return _place(tmp, dest, force)


def update_card(folder: Path, card: str) -> bool:
    """The model card of an export, written again (new verdicts); only where tuneloop wrote it."""
    if not folder.is_dir() or "README.md" not in written_by_tuneloop(folder):
        return False
    write_card(folder, card)
    return True


def base_of(adapter: Path) -> str:
    """Where the base of an exported adapter is on this machine: its portable name resolved
    (``models.resolve_base``), else the path it was trained from (the manifest's fallback)."""
    name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    try:
        fallback = json.loads((adapter / MARKER).read_text()).get("base_path")
    except (OSError, ValueError):
        fallback = None
    return resolve_base(name, fallback)


def load_exported(folder: str | Path):
    """An export, from wherever it was copied: a merged model as it is, an adapter merged into
    its base (found by ``base_of``), in float32."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return load_model(base_of(folder), folder, adapter=True)
    return load_model(folder, folder, adapter=False)
