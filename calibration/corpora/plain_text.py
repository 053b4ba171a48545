"""Plain-text cleaners for the documentation and novel sources of build_corpora.py (stdlib only).

`rst_document` turns one reStructuredText page of the Python documentation into prose lines: code
(literal blocks, doctests, code directives), tables, comments, targets and index entries are dropped,
inline markup (roles, literals, links, emphasis) is reduced to its visible text, each paragraph and
list item becomes one line; `read_rst_pages` applies it to every page of a manual, `deb_data` opens a
Debian package's files. `moby_dick` reads the chapters of the novel in reading order.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile

# Directives whose body is prose (kept) or an API entry (the signature line dropped, the body kept).
PROSE_DIRECTIVES = {
    "note", "warning", "seealso", "important", "tip", "attention", "caution", "danger", "hint",
    "admonition", "topic", "sidebar", "rubric", "impl-detail", "versionadded", "versionchanged",
    "deprecated", "deprecated-removed", "glossary", "centered", "epigraph", "describe",
    "function", "method", "class", "decorator", "decoratormethod", "attribute", "data", "exception",
    "module", "currentmodule", "classmethod", "staticmethod", "abstractmethod", "coroutinefunction",
    "coroutinemethod", "cmdoption", "option", "envvar", "opcode", "pdbcommand", "2to3fixer",
    "c:function", "c:type", "c:member", "c:macro", "c:var", "c:struct", "c:enum", "c:enumerator",
    "c:union", "setting", "django-admin", "django-admin-option", "templatetag", "templatefilter",
    "fieldlookup",
}
VERSION_DIRECTIVES = {"versionadded", "versionchanged", "deprecated", "deprecated-removed"}
UNDERLINE = re.compile(r"([=\-~^\"*#+`:.'_])\1{3,}")
DIRECTIVE = re.compile(r"\.\. ([\w:-]+)::\s*(.*)")
FIELD = re.compile(r":[\w][\w .-]*:(\s|$)")
BULLET = re.compile(r"^([*\-+•]|#\.|\d+\.|\(\d+\)|[a-z]\.)\s+")
ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
MARKUP_CHARS = set("{}[]|<>=`\\_*")


def _role_text(m: re.Match[str]) -> str:
    text = m.group(1)
    label = re.fullmatch(r"(.*?)\s*<[^<>]*>", text, flags=re.S)
    if label and label.group(1):
        return label.group(1)
    text = text.lstrip("!")
    return text.rsplit(".", 1)[-1] if text.startswith("~") else text


def inline(text: str) -> str:
    """Visible text of one paragraph's inline markup."""
    text = ROLE.sub(_role_text, text)
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = re.sub(r"`([^`<]*?)\s*<[^`>]*>`__?", r"\1", text)  # `label <url>`_
    text = re.sub(r"`([^`]+)`__?", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\1", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\|[\w -]+\|_?", "", text)  # substitutions
    text = re.sub(r"\[#?\w*\]_", "", text)  # footnote references
    text = text.replace("\\ ", "").replace(" --- ", " — ").replace(" -- ", " – ")
    return re.sub(r"\s+", " ", text).strip()


def _keep(line: str, heading: bool) -> bool:
    if not line or sum(c in MARKUP_CHARS for c in line) > 0.02 * len(line):
        return False
    return heading or len(line.split()) >= 3


def rst_document(text: str) -> tuple[str, list[str]]:
    """(title, prose lines) of one reST page; the title is its first heading."""
    raw_lines = text.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    title = ""
    para: list[str] = []
    skip: int | None = None  # indentation of a dropped block's head: deeper lines are dropped too
    after_directive = False

    def flush(heading: bool = False) -> None:
        nonlocal title
        line = inline(" ".join(para))
        para.clear()
        if heading and not title:
            title = line
            return
        if _keep(line, heading):
            out.append(line)

    for raw in raw_lines:
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if skip is not None:
            if not stripped or indent > skip:
                continue
            skip = None
        if not stripped:
            flush()
            after_directive = False
            continue
        if UNDERLINE.fullmatch(stripped):
            flush(heading=True)
            continue
        if after_directive and FIELD.match(stripped):
            continue  # directive options such as :synopsis:
        after_directive = False
        if stripped.startswith(".."):
            flush()
            m = DIRECTIVE.match(stripped)
            if m is None or m.group(1) not in PROSE_DIRECTIVES:
                skip = indent  # comments, targets, substitutions, code and table directives
                continue
            if m.group(1) in VERSION_DIRECTIVES:
                rest = m.group(2).split(None, 1)
                if len(rest) > 1:
                    para.append(rest[1])
            after_directive = True
            continue
        if stripped.startswith((">>>", "... ", "+-", "|", "$ ")) or stripped == "...":
            continue
        if FIELD.match(stripped):
            stripped = FIELD.sub("", stripped, count=1).strip()
        bullet = BULLET.match(stripped)
        if bullet:
            flush()
            stripped = stripped[bullet.end():]
        if stripped.endswith("::"):
            head = stripped[:-2].rstrip()
            if head:
                para.append(head + ":" if stripped[-3] != " " else head)
            flush()
            skip = indent
            continue
        para.append(stripped)
    flush()
    return title or "Untitled", out


def moby_dick(tgz_bytes: bytes) -> tuple[str, int]:
    """The novel's chapters in its own file order (etymology, extracts, chapters, epilogue),
    each under '= HEADING =', one paragraph per line; the table of contents is left out."""
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar  # type: ignore[union-attr]
                 if m.isfile() and m.name.startswith("package/data/")}
    order = json.loads(files["package/data/file_list.json"])
    parts = []
    for name in order:
        if name == "contents.txt":
            continue
        body = files[f"package/data/{name}"].decode("utf-8").replace("\r\n", "\n")
        paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", body)]
        paragraphs = [p for p in paragraphs if p]
        parts.append(f"= {paragraphs[0]} =\n" + "\n".join(paragraphs[1:]) + "\n\n")
    return "".join(parts), len(parts)


def deb_data(deb: bytes) -> tarfile.TarFile:
    """The data.tar.* member of a Debian package (an ar archive) as an open tar file."""
    if not deb.startswith(b"!<arch>\n"):
        raise SystemExit("not a Debian package (ar archive)")
    pos = 8
    while pos + 60 <= len(deb):
        name = deb[pos:pos + 16].decode().strip().rstrip("/")
        size = int(deb[pos + 48:pos + 58].decode().strip())
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(deb[pos + 60:pos + 60 + size]))
        pos += 60 + size + (size & 1)
    raise SystemExit("no data.tar member in the Debian package")


def read_rst_pages(tar: tarfile.TarFile, root: str, suffix: str, skip: tuple[str, ...]) -> tuple[str, int, str]:
    """A manual's reST pages under root (sorted by path) as documents; also the sources' sha256."""
    pages = {m.name[len(root):]: tar.extractfile(m).read()  # type: ignore[union-attr]
             for m in tar if m.isfile() and m.name.startswith(root) and m.name.endswith(suffix)}
    digest = hashlib.sha256()
    out = []
    for path in sorted(pages):
        digest.update(path.encode() + b"\0" + pages[path] + b"\0")
        if path.startswith(skip):
            continue
        title, lines = rst_document(pages[path].decode("utf-8"))
        if len(lines) >= 2:
            out.append(f"= {title} =\n" + "\n".join(lines) + "\n\n")
    return "".join(out), len(out), digest.hexdigest()
