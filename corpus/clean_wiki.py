"""Turn a MediaWiki XML dump into plain English paragraphs (one article per block)."""
import bz2, re, sys, html
import xml.etree.ElementTree as ET

def strip_nested(text, open_, close):
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1; i += len(open_); continue
        if depth and text.startswith(close, i):
            depth -= 1; i += len(close); continue
        if not depth:
            out.append(text[i])
        i += 1
    return "".join(out)

def clean(t):
    t = html.unescape(t)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref.*?</ref>", "", t, flags=re.S)
    t = re.sub(r"<(math|gallery|timeline|table|pre|code|source|score)[^>]*>.*?</\1>", "", t, flags=re.S)
    t = strip_nested(t, "{{", "}}")
    t = strip_nested(t, "{|", "|}")
    t = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", t)
    t = re.sub(r"\[\[([^\]|]*\|)?([^\]]*)\]\]", r"\2", t)
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[https?://\S+\]", "", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"'{2,}", "", t)
    lines = []
    for line in t.split("\n"):
        line = line.strip()
        m = re.match(r"^=+\s*(.*?)\s*=+$", line)
        if m:
            if m.group(1).lower() in {"references", "external links", "see also", "further reading", "notes", "bibliography", "sources"}:
                break
            lines.append(""); lines.append(m.group(1)); continue
        if not line or line.startswith(("|", "!", "{", "}", ":", ";", "__")):
            continue
        line = re.sub(r"^[*#]+\s*", "", line)
        line = re.sub(r"\s+", " ", line)
        if len(line) > 1:
            lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()

ns = "{http://www.mediawiki.org/xml/export-0.10/}"
arts = []
for ev, el in ET.iterparse(bz2.open(sys.argv[1])):
    if el.tag.endswith("page"):
        title = el.find(f".//{{*}}title").text
        txt = el.find(f".//{{*}}text").text or ""
        if not txt.lstrip().upper().startswith("#REDIRECT"):
            body = clean(txt)
            if len(body) > 500:
                arts.append(f"{title}\n\n{body}")
        el.clear()
open(sys.argv[2], "w").write("\n\n\n".join(arts) + "\n")
print(len(arts), "articles")
