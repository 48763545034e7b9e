"""The package's shape at a checkout, as issue 31 measures it: modules, lines, the core's lines
(qat_jax's top-level modules but the command line), the largest modules, how many exceed 400
lines, the longest chain of qat_jax imports (lazy ones included), and the modules that import
ml_collections.

    python benchmarks/structure.py .            # this checkout
    git worktree add /tmp/old COMMIT && python benchmarks/structure.py /tmp/old
"""

from __future__ import annotations

import ast
import functools
import pathlib
import sys


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    out = {}
    for p in root.rglob("*.py"):
        name = "qat_jax." + ".".join(p.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(p: pathlib.Path, mods: dict) -> tuple[set[str], bool]:
    """The qat_jax modules `p` imports (anywhere in it), and whether it imports ml_collections."""
    out, mlc = set(), False
    for n in ast.walk(ast.parse(p.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module:
            mlc |= n.module.startswith("ml_collections")
            if n.module.startswith("qat_jax"):
                for a in n.names:
                    full = f"{n.module}.{a.name}"
                    out.add(full if full in mods else n.module)
        elif isinstance(n, ast.Import):
            for a in n.names:
                mlc |= a.name.startswith("ml_collections")
                if a.name.startswith("qat_jax"):
                    out.add(a.name)
    return {d for d in out if d in mods}, mlc


def main(checkout: str):
    mods = modules(pathlib.Path(checkout) / "qat_jax")
    graph, mlc = {}, []
    for m, p in mods.items():
        deps, uses = imports(p, mods)
        graph[m] = deps - {m}
        if uses:
            mlc.append(m.removeprefix("qat_jax."))

    @functools.lru_cache(None)
    def depth(m, stack=()):
        if m in stack:
            return 0
        return 1 + max((depth(d, (*stack, m)) for d in graph[m]), default=0)

    lines = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    cli = {m for m in mods if m.split(".")[-1].startswith("cli") or m.endswith("__main__")}
    core = {m for m in mods if m.count(".") == 1 and m not in cli}
    big = sorted(lines.items(), key=lambda x: -x[1])[:6]
    print(f"modules {len(mods)}, lines {sum(lines.values())}, core (top-level, no cli) "
          f"{sum(lines[m] for m in core)} in {len(core)} modules")
    print("largest:", ", ".join(f"{m.removeprefix('qat_jax.')} {n}" for m, n in big))
    print("over 400 lines:", sum(n > 400 for n in lines.values()))
    print("import depth (longest chain):", max(depth(m) for m in mods))
    print("import ml_collections:", sorted(mlc))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
