"""Naming evaluation inputs: one rule for text domains and for multiple-choice tasks."""

from __future__ import annotations

from pathlib import Path

from ..arch import MoePruneError


def named_files(items, suffixes: tuple[str, ...], known: dict[str, Path], what: str) -> dict[str, Path]:
    """name -> file. A dict name -> path is used as given; else each item is NAME=PATH, a folder (each
    file with one of `suffixes` in it, named by stem), a file (named by stem) or a name in `known`."""
    if isinstance(items, dict):
        out = {str(k): Path(v).expanduser() for k, v in items.items()}
    else:
        out = {}
        for item in [items] if isinstance(items, (str, Path)) else items:
            item = str(item)
            path = Path(item).expanduser()
            if "=" in item and not path.exists():
                name, p = item.split("=", 1)
                out[name] = Path(p).expanduser()
            elif path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix in suffixes)
                if not files:
                    raise MoePruneError(f"{what} folder {path} holds no {' or '.join(suffixes)} files")
                out.update({p.stem: p for p in files})
            elif path.exists():
                out[path.stem] = path
            elif item in known:
                out[item] = known[item]
            else:
                hint = f"; demo {what}s: {', '.join(known)}" if known else ""
                raise MoePruneError(f"{what} {item!r} is neither a {' or '.join(suffixes)} file nor a demo {what}{hint}")
    for name, path in out.items():
        if not path.is_file():
            raise MoePruneError(f"{what} file for {name!r} not found: {path}")
        if path.suffix not in suffixes:
            raise MoePruneError(f"{what} file {path} must be {' or '.join(suffixes)}")
    return out
