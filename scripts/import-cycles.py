#!/usr/bin/env python3
"""File-level import cycles of a Rust crate: an edge for every `crate::a::b` / `super::x`
path in a file (comments and test modules left out), resolved to the module file it
names; prints the strongly connected components of more than one file.
Usage: scripts/import-cycles.py launcher/src   (or worker/src)"""
import os, re, sys, collections
root = sys.argv[1]  # crate src dir
files = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith('.rs'):
            p = os.path.join(d, f); rel = os.path.relpath(p, root)[:-3]
            parts = rel.split('/')
            if parts[-1] in ('mod', 'lib', 'main'): parts = parts[:-1]
            files['::'.join(parts)] = p
def resolve(path):
    parts = path.split('::')
    while parts:
        k = '::'.join(parts)
        if k in files: return k
        parts = parts[:-1]
    return None
edges = collections.defaultdict(set)
for mod, p in files.items():
    text = open(p).read()
    text = re.sub(r'#\[cfg\(test\)\]\s*mod tests\s*\{.*', '', text, flags=re.S)
    text = re.sub(r'//[^\n]*', '', text)
    cur = mod.split('::') if mod else []
    is_dir_mod = p.endswith('mod.rs') or p.endswith('lib.rs')
    for m in re.finditer(r'\b(crate|super)::([A-Za-z0-9_:]+)', text):
        kind, rest = m.group(1), m.group(2)
        if kind == 'crate': target = rest
        else:
            base = cur if is_dir_mod else cur[:-1]
            target = '::'.join(base + [rest]) if base else rest
        t = resolve(target)
        if t is not None and t != mod and not mod.startswith(t + '::') and t != '':
            edges[mod].add(t)
# Tarjan
index, low, stack, on, comps, i = {}, {}, [], set(), [], [0]
def sc(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        c = []
        while True:
            w = stack.pop(); on.discard(w); c.append(w)
            if w == v: break
        if len(c) > 1: comps.append(sorted(c))
sys.setrecursionlimit(10000)
for v in list(files): 
    if v not in index: sc(v)
for c in comps: print(len(c), ' <-> '.join(c))
print(f"{len(comps)} cycle group(s) among {len(files)} files")
