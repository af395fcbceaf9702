"""A folder of documents: every .txt/.md/.html/.htm file below it, one record per file.

Text files must be UTF-8 (a leading BOM is dropped); HTML goes through the main-content extractor
(`stages.html`) with the page's own charset. A file is checked before it is trusted: larger than
`max_doc_bytes` (not read), NUL bytes (a binary file that only looks like text by its suffix),
undecodable, or empty after extraction: each is one quarantine row, and the walk goes on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from stages import html
from stages.connectors import DEFAULT_MAX_DOC_BYTES, Digest, Record, bad_file, bad_record, decode_text, file_digest
from stages.dataset import QuarantineLog

TEXT_SUFFIXES = (".txt", ".md")
HTML_SUFFIXES = (".html", ".htm")
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES


def folder_files(folder: Path) -> list[Path]:
    """Document files below `folder`, in a stable order (the same ids in every run)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .ipynb_checkpoints
        found += [Path(dirpath) / f for f in filenames if f.lower().endswith(SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def folder_records(folder: Path, q: QuarantineLog, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
                   digest: Digest = file_digest) -> Iterator[Record]:
    folder = Path(folder)
    source = f"folder:{folder.name}"
    if not folder.is_dir():
        bad_file(q, file=folder, kind="not a directory", detail=f"folders: {folder} is not a directory",
                 source=source)
        return
    for path in folder_files(folder):
        rel = path.relative_to(folder).as_posix()
        try:
            size = path.stat().st_size
            if size > max_doc_bytes:
                bad_record(q, file=path, kind="document too large", source=source, offset=0,
                           detail=f"{size} bytes > max_doc_bytes={max_doc_bytes}")
                continue
            raw = path.read_bytes()
            md5 = digest(path)
        except OSError as e:
            bad_file(q, file=path, kind="unreadable file", detail=f"{type(e).__name__}: {e}", source=source)
            continue
        nul = raw.find(b"\x00")
        if path.suffix.lower() in HTML_SUFFIXES and nul < 0:
            text, kind, detail, at = html.extract_text(raw), "", "", None
        else:
            text, kind, detail, at = decode_text(raw)
        if text is None:
            bad_record(q, file=path, kind=kind, detail=detail, source=source, offset=at, raw=raw)
            continue
        if not text.strip():
            bad_record(q, file=path, kind="empty document", source=source, offset=0,
                       detail=f"{size} bytes, no text" + (" after HTML extraction" if size else ""), raw=raw)
            continue
        yield {"id": f"{source}:{rel}", "text": text, "source": source, "url": "",
               "meta": {"path": str(path), "raw_md5": md5}}

