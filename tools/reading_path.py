"""The size of the reading path: non-blank, non-comment lines of the project's own modules that
`import train` loads (docstrings count), and the longest line of each.

    python tools/reading_path.py
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402,F401

total = 0
for name, module in sorted(sys.modules.items()):
    path = os.path.abspath(getattr(module, "__file__", None) or "")
    if path.startswith(os.path.join(ROOT, "tools")) or not path.startswith(ROOT + os.sep) or not os.path.exists(path):
        continue
    lines = open(path).read().splitlines()
    n = sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))
    total += n
    print(f"{n:5d}  {os.path.relpath(path, ROOT)}  (longest line {max(map(len, lines))})")
print(f"{total:5d}  in all")
