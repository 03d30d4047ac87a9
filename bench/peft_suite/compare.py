"""Compare an unpatched and a patched run of PEFT's tests (the JSON lines plugin.py writes): outcomes per mode and
every test whose outcome differs.

    python -m bench.peft_suite.compare UNPATCHED.jsonl PATCHED.jsonl [--markdown]

Exit status 1 when some test's outcome differs (or a test ran in one mode only), else 0.
"""

import argparse
import collections
import json
import sys

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def read(path: str) -> dict:
    """{test id: entry} from a plugin.py results file."""
    with open(path) as f:
        return {entry["id"]: entry for entry in map(json.loads, filter(str.strip, f))}


def compare(unpatched: dict, patched: dict) -> dict:
    """Counts per mode, fused-call totals and the differing tests ({id: (unpatched entry, patched entry)})."""
    counts = {mode: collections.Counter(e["outcome"] for e in run.values())
              for mode, run in (("unpatched", unpatched), ("patched", patched))}
    differ = {}
    for test_id in sorted(set(unpatched) | set(patched)):
        a, b = unpatched.get(test_id), patched.get(test_id)
        if a is None or b is None or a["outcome"] != b["outcome"]:
            differ[test_id] = (a, b)
    fused = sum(e.get("fused", 0) for e in patched.values())
    peft = sum(e.get("peft", 0) for e in patched.values())
    with_fused = sum(1 for e in patched.values() if e.get("fused", 0))
    summed = sum(e.get("summed", 0) for e in patched.values())
    with_summed = sum(1 for e in patched.values() if e.get("summed", 0))
    shadowed = [e for e in patched.values() if e.get("shadow_calls")]
    shadow = dict(calls=sum(e["shadow_calls"] for e in shadowed),
                  worst=sorted(((e["shadow"], e["id"]) for e in shadowed), reverse=True)[:5])
    return dict(counts=counts, differ=differ, fused=fused, peft=peft, tests_with_fused=with_fused, shadow=shadow,
                summed=summed, tests_with_summed=with_summed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("unpatched")
    parser.add_argument("patched")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args(argv)
    result = compare(read(args.unpatched), read(args.patched))
    header = ["mode", "tests"] + list(OUTCOMES)
    lines = []
    for mode, counts in result["counts"].items():
        lines.append([mode, str(sum(counts.values()))] + [str(counts.get(o, 0)) for o in OUTCOMES])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        for line in [header] + lines:
            print("  ".join(f"{cell:>10}" for cell in line))
    print(f"\npatched run: {result['fused']} LoRA layer calls on the fused op in {result['tests_with_fused']} tests, "
          f"{result['peft']} on PEFT's own forward"
          + (f"; of the fused, {result['summed']} calls of several active adapters as one (in "
             f"{result['tests_with_summed']} tests)" if result["summed"] else ""))
    if result["shadow"]["calls"]:
        print(f"{result['shadow']['calls']} fused calls compared with PEFT's forward (--lora-fast-shadow); largest "
              "max|fused - PEFT| / max|PEFT| per test:")
        for ratio, test_id in result["shadow"]["worst"]:
            print(f"  {ratio:.2e}  {test_id}")
    print(f"{len(result['differ'])} tests differ")
    for test_id, (a, b) in result["differ"].items():
        print(f"- {test_id}: {a['outcome'] if a else 'not run'} -> {b['outcome'] if b else 'not run'}"
              + (f"  ({b['reason']})" if b and b.get("reason") else ""))
    return 1 if result["differ"] else 0


if __name__ == "__main__":
    sys.exit(main())
