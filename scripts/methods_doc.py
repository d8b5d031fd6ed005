"""Write docs/methods.md from the method table (``hub.methods.table``): ``python scripts/methods_doc.py``.

``--check`` exits 1 when the file is not what the table gives (tests/test_method_table.py runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "methods.md"

HEADER = """# Adaptation methods

Generated from the method table (`hub/methods/table.py`) by `scripts/methods_doc.py`; do not edit by hand.

Every adapter type PEFT 0.21.2 defines is in the table, plus the hub's own BITFIT, BOTTLENECK and DENSELORA
(docs/formats.md). Whatever the type, an adapter folder PEFT can load is registered, digested, listed, pushed,
pulled and exported byte for byte. The columns say what else the hub does with it:

* **trainable**: `hub train --method NAME` makes and trains one (the recipe names are listed);
* **attachable**: `activate` / `attach` put it on a model (fp32, bf16, nf4, int8). Attaching a type that is not
  says so in one line;
* **mergeable**: `merge_into_base` / `dequantize_merged` fold it into base weights;
* **summable**: `compose(..., kind="sum")` adds it to others into one new adapter (low-rank types with each
  other, the rest with their own type);
* **stackable**: it can be active beside other adapters (`compose(..., kind="stack")`);
* **mixture expert**: it can be an expert of a gated mixture (per-token gates at linear/embedding sites).

Third-party methods join through the `adapter_hub.methods` entry point group (see `hub/methods/table.py`).

| name | PEFT type | trainable | attachable | mergeable | summable | stackable | mixture expert | notes |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
"""


def render() -> str:
    sys.path.insert(0, str(ROOT))
    from hub.methods import all_methods

    def mark(flag: bool) -> str:
        return "yes" if flag else ""

    rows = []
    for method in all_methods():
        trainable = ", ".join(f"`{name}`" for name in method.recipes)
        rows.append(f"| {method.name} | {method.peft_type} | {trainable} | {mark(method.attachable)} | "
                    f"{mark(method.mergeable)} | {mark(method.summable)} | {mark(method.stackable)} | "
                    f"{mark(method.mixture_expert)} | {method.notes.replace('|', '/')} |")
    return HEADER + "\n".join(rows) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run python scripts/methods_doc.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
