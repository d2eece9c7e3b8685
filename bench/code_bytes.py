#!/usr/bin/env python3
"""Where the shipped code's bytes go, and how far better coding of the text could take it (issue 14, item 5).

    python bench/code_bytes.py [--top 40] [--cm] [--json out.json]
    python bench/code_bytes.py --smoke      # sections only, CM on the first 4 KB (used by the tests)

The shipped code is train_gpt.py minified and packed with raw LZMA2 in a self-extracting wrapper
(train_gpt.shipped_code). This bench reports:
- the sizes along the way (source, minified, LZMA stream, wrapper);
- per top-level definition and per section (the `# ===` banners of train_gpt.py) the compressed bytes it
  adds: the LZMA size of the minified text minus that size with the definition (or section) cut out, so shared
  context is credited to whatever stays;
- the same for every string literal longer than 20 characters (messages, help, log formats);
- with --cm: the ideal code length of the minified text under a bitwise context-mixing model (orders 1-4 and
  6, a word context, a match model, a logistic mixer per partial byte and an order-1 APM; no coder built, no
  decompressor counted), and `lrzip -z -L 9` (ZPAQ) when installed: how much a stronger text coder could win.
"""
from __future__ import annotations

import argparse
import ast
import lzma
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import T, TRAIN_GPT_PATH, table, write_json  # noqa: E402
from bench.compress_bench import lrzip_bytes  # noqa: E402

LONG_STRING = 20  # characters: shorter literals are names, keys and format pieces, not prose


def packed_size(text: str | bytes) -> int:
    data = text.encode() if isinstance(text, str) else text
    return len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=T.CODE_LZMA_FILTERS))


def top_level_spans(source: bytes, minified: str) -> list[dict]:
    """Each top-level statement of the minified text: its name in the source, its section and its line span."""
    src_tree, min_tree = ast.parse(source), ast.parse(minified)
    body = src_tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the module docstring, which the minifier drops
    if len(body) != len(min_tree.body):
        raise SystemExit(f"minified text has {len(min_tree.body)} top-level statements, the source {len(body)}")
    lines = source.decode().split("\n")
    banners = [(i + 2, lines[i + 1].lstrip("# ").split(":")[0]) for i, line in enumerate(lines[:-1])
               if line.startswith("# ====") and lines[i + 1].startswith("# ") and not lines[i + 1].startswith("# ==")]
    spans = []
    for s, m in zip(body, min_tree.body):
        start = (m.decorator_list[0] if getattr(m, "decorator_list", None) else m).lineno - 1
        name = getattr(s, "name", None) or ast.unparse(s).split("\n")[0][:48]
        section = ([title for line, title in banners if line <= s.lineno] or ["Header"])[-1]
        spans.append(dict(name=name, section=section, start=start, end=m.end_lineno))
    return spans


def cut_cost(lines: list[str], total: int, spans: list[dict]) -> int:
    """Compressed bytes that the lines of `spans` add to the whole."""
    cut = set()
    for s in spans:
        cut.update(range(s["start"], s["end"]))
    return total - packed_size("\n".join(line for i, line in enumerate(lines) if i not in cut))


def long_string_cost(minified: str) -> tuple[int, int]:
    """Compressed bytes the string literals over LONG_STRING characters add, and how many there are."""
    tree = ast.parse(minified)
    plain = packed_size(ast.unparse(tree))  # unparse's own spacing on both sides, compared like with like
    literals = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and len(n.value) > LONG_STRING]
    for n in literals:
        n.value = ""
    return plain - packed_size(ast.unparse(tree)), len(literals)


def cm_code_length(data: bytes) -> float:
    """Ideal code length in bytes of `data` under a small bitwise context-mixing model (see the module doc)."""
    stretch = [math.log((i + 0.5) / (4095.5 - i)) for i in range(4096)]
    orders, min_match, rate, limit = (1, 2, 3, 4, 6), 6, 0.01, 255
    n_in = len(orders) + 3  # order 0, the orders, the word, the match
    tables, weights, apm, matches = [dict() for _ in range(n_in)], {}, {}, {}
    bits, word, ptr, length = 0.0, 0, 0, 0
    for i, byte in enumerate(data):
        ctx = [0] + [hash(data[max(0, i - n): i]) for n in orders] + [word]
        if length == 0 and i >= min_match and data[i - min_match: i] in matches:
            ptr, length = matches[data[i - min_match: i]], 1
        if i >= min_match:
            matches[data[i - min_match: i]] = i
        partial = 1
        for k in range(7, -1, -1):
            bit, slots, x = (byte >> k) & 1, [], []
            for j, c in enumerate(ctx):
                s = tables[j].setdefault((c, partial), [0.5, 0])
                slots.append(s)
                x.append(stretch[int(s[0] * 4095)] if s[1] else 0.0)
            expected = (data[ptr] >> k) & 1 if length and (data[ptr] + 256) >> (k + 1) == partial else None
            if expected is None:
                x.append(0.0)
            else:
                s = tables[-1].setdefault((min(length, 15), expected), [0.5, 0])
                slots.append(s)
                x.append(stretch[int(s[0] * 4095)])
            w = weights.setdefault((partial, length > 0), [0.3] * (n_in))
            dot = sum(a * b for a, b in zip(w, x))
            p = 1 / (1 + math.exp(-dot))
            u = (max(min(dot, 7.99), -7.99) + 8) * 2
            lo, frac = int(u), u - int(u)
            a = apm.setdefault((data[i - 1] if i else 0, partial), [1 / (1 + math.exp(8 - b / 2)) for b in range(33)])
            final = min(max((p + 3 * (a[lo] * (1 - frac) + a[lo + 1] * frac)) / 4, 1 / 65536), 1 - 1 / 65536)
            bits -= math.log2(final if bit else 1 - final)
            for j in range(len(x)):
                w[j] += rate * (bit - p) * x[j]
            a[lo] += (bit - a[lo]) * 0.02 * (1 - frac)
            a[lo + 1] += (bit - a[lo + 1]) * 0.02 * frac
            for s in slots:
                s[1] = min(s[1] + 1, limit)
                s[0] += (bit - s[0]) / (s[1] + 0.5)
            partial = partial * 2 + bit
        if length:
            length, ptr = (length + 1, ptr + 1) if data[ptr] == byte else (0, 0)
        word = hash((word, byte)) if chr(byte).isalnum() or byte == 95 else 0
    return bits / 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=40, help="definitions listed, largest first")
    ap.add_argument("--cm", action="store_true", help="also the context-mixing estimate (~30 s) and lrzip")
    ap.add_argument("--smoke", action="store_true", help="sections only; CM on the first 4 KB")
    ap.add_argument("--json")
    args = ap.parse_args()
    with open(TRAIN_GPT_PATH, "rb") as f:
        source = f.read()
    minified = T.minify_source(source).decode()
    shipped, form = T.shipped_code(source)
    lines, total = minified.split("\n"), packed_size(minified)
    rec = dict(source=len(source), minified=len(minified.encode()), lzma=total, shipped=len(shipped), form=form)
    print(f"source {len(source):,} B -> minified {rec['minified']:,} B -> raw LZMA2 {total:,} B -> shipped "
          f"{len(shipped):,} B ({form})")
    spans = top_level_spans(source, minified)
    sections = {}
    for s in spans:
        sections.setdefault(s["section"], []).append(s)
    rec["sections"] = [dict(section=k, definitions=len(v), bytes=cut_cost(lines, total, v)) for k, v in sections.items()]
    print(table(["section", "definitions", "compressed bytes it adds"],
                [[r["section"], r["definitions"], f"{r['bytes']:,}"] for r in rec["sections"]]))
    strings, count = long_string_cost(minified)
    rec["long_strings"] = dict(count=count, bytes=strings)
    print(f"{count} string literals over {LONG_STRING} characters add {strings:,} compressed bytes")
    if not args.smoke:
        rows = sorted(({**s, "bytes": cut_cost(lines, total, [s])} for s in spans), key=lambda r: -r["bytes"])
        rec["definitions"] = [dict(name=r["name"], section=r["section"], bytes=r["bytes"]) for r in rows]
        print(table(["definition", "section", "compressed bytes it adds"],
                    [[r["name"], r["section"], f"{r['bytes']:,}"] for r in rows[: args.top]]))
    if args.cm or args.smoke:
        data = minified.encode()[: 4096 if args.smoke else None]
        lrzip = None if args.smoke else lrzip_bytes(data)
        rec["cm"] = dict(input=len(data), ideal_bytes=round(cm_code_length(data)), lzma=packed_size(data),
                         lrzip=lrzip and lrzip[0])
        print(f"context mixing (ideal code length) on {len(data):,} B: {rec['cm']['ideal_bytes']:,} B; raw LZMA2 "
              f"{rec['cm']['lzma']:,} B; lrzip -z -L 9 (ZPAQ) {rec['cm']['lrzip'] or '-'} B")
    if args.json:
        write_json(args.json, rec)


if __name__ == "__main__":
    main()
