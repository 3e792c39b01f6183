"""The README's reliability table, from the test suite's own fault-injection tests.

    python -m pytest -q -m "fault or bad_input"      # records outcomes (.faults/log.json)
    python -m tools.fault_table                     # prints the table
    python -m tools.fault_table --readme=README.md  # replaces the table in the README

Tests marked `fault("what was injected")` or `bad_input("what was tried")` are recorded by
tests/conftest.py with their outcome, one entry per test case, merged over runs (the latest
outcome of each case counts). A fault is *survived* when its test passed: the run or sweep
resumed to the expected records, or stopped with the promised one-line message and exit
status. A bad input is *refused* when its test passed: one line naming the flag or file,
exit status 2. Cases with the same description are one row; nothing is counted by hand.
"""
import argparse
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_LOG = os.environ.get("SBT_FAULT_LOG") or str(REPO / ".faults" / "log.json")
BEGIN, END = "<!-- fault-table: begin -->", "<!-- fault-table: end -->"
HEADINGS = {"fault": ("fault injected", "survived"),
            "bad_input": ("bad input tried", "refused with one line")}


def load(path):
    with open(path) as f:
        return json.load(f)


def rows(log, kind):
    """[(what, cases, passed, skipped, failed, test files)] in test order."""
    grouped = {}
    for case_id, entry in sorted(log.items()):
        if entry["kind"] != kind:
            continue
        row = grouped.setdefault(entry["what"], {"cases": 0, "passed": 0, "skipped": 0,
                                                 "failed": 0, "files": []})
        row["cases"] += 1
        row[{"passed": "passed", "skipped": "skipped"}.get(entry["outcome"], "failed")] += 1
        name = entry["test"].rsplit("/", 1)[-1]  # file.py::test_name
        if name not in row["files"]:
            row["files"].append(name)
    return [(what, r["cases"], r["passed"], r["skipped"], r["failed"], r["files"])
            for what, r in grouped.items()]


def _escape(text):
    return text.replace("|", "\\|")


def table(log):
    out = []
    totals = {}
    for kind, (heading, passed_word) in HEADINGS.items():
        found = rows(log, kind)
        cases = sum(r[1] for r in found)
        passed = sum(r[2] for r in found)
        skipped = sum(r[3] for r in found)
        totals[kind] = (len(found), cases, passed, skipped)
        out += [f"| {heading} | cases | {passed_word} | test |", "|---|---|---|---|"]
        for what, n, ok, skip, failed, files in found:
            cell = f"{ok}" + (f" ({skip} skipped)" if skip else "") + \
                   (f" ({failed} FAILED)" if failed else "")
            out.append(f"| {_escape(what)} | {n} | {cell} | {', '.join(files)} |")
        out.append("")
    kinds, cases, passed, skipped = totals["fault"]
    summary = [f"**{cases} faults injected ({kinds} kinds): {passed} survived"
               + (f", {skipped} not run" if skipped else "") + ".**"]
    kinds, cases, passed, skipped = totals["bad_input"]
    summary.append(f"**{cases} bad inputs tried ({kinds} kinds): {passed} refused with one "
                   f"line" + (f", {skipped} not run" if skipped else "") + ".**")
    return "\n".join(summary + [""] + out).rstrip() + "\n"


def replace_in(readme, text):
    content = pathlib.Path(readme).read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"error: {readme} has no {BEGIN} ... {END} section")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    pathlib.Path(readme).write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", default=DEFAULT_LOG, help="the outcomes tests/conftest.py "
                        "recorded (default: .faults/log.json, or $SBT_FAULT_LOG)")
    parser.add_argument("--readme", default="", help="replace the table between the "
                        "fault-table markers of this file instead of printing it")
    args = parser.parse_args(argv)
    if not os.path.exists(args.log):
        print(f"error: {args.log} does not exist; run the fault tests first (see "
              f"python -m tools.fault_table --help)", file=sys.stderr)
        return 2
    text = table(load(args.log))
    if args.readme:
        replace_in(args.readme, text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
