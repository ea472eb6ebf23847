#!/usr/bin/env python3
"""Compare an Autobahn|Testsuite report case by case with committed expectations.

Usage: check_expectations.py REPORT_DIR_OR_INDEX_JSON EXPECTED_JSON
                             [--agent NAME] [--only-reported] [--update]

summarize.py only tells passed from failed, and NON-STRICT counts as passed
there: a case that slides from OK to NON-STRICT (or INFORMATIONAL) would go
unnoticed. This script holds every case to the exact `behavior` and
`behaviorClose` recorded in EXPECTED_JSON (tests/autobahn/expected-server.json
or expected-client.json), as tungstenite does with its expected-results.json.

A case differs, and the check fails, when
  - its behavior or behaviorClose is not the recorded one (in either
    direction: OK -> NON-STRICT fails, and so does NON-STRICT -> OK, so the
    file always says what the implementation does);
  - it is in the expectations but not in the report (missing), unless
    --only-reported (a run restricted with --cases / --exclude / --quick);
  - it is in the report but not in the expectations (extra).
Every difference is listed as "CASE  expected BEHAVIOR/CLOSE, got ...".

The expectations themselves may only record results that are acceptable at
all: behavior OK, NON-STRICT or INFORMATIONAL, and a behaviorClose that is
neither FAILED nor UNCLEAN (summarize.py's pass rule, with UNIMPLEMENTED not
accepted). A file recording anything else is refused, so a failure can never
be "expected". NON-STRICT entries are allowed so that a deliberate change can
be recorded, and each run lists them.

--update writes EXPECTED_JSON from the report instead of checking (one line
per case, sorted, for readable diffs) and prints what changed. It refuses to
record a report with an unacceptable result. With --only-reported it updates
just the reported cases and keeps the others; otherwise the file is replaced
and cases the report lacks are dropped.

Last line: "expectations: N as expected, M differ" (check) or
"expectations: updated FILE: ..." (update).
Exit status: 0 = all as expected / updated, 1 = some case differs,
2 = usage error, unreadable input, no results, or an unacceptable result.
"""
import argparse
import json
import os
import sys

ACCEPTABLE_BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL")
UNACCEPTABLE_CLOSE = ("FAILED", "UNCLEAN")
FIELDS = ("behavior", "behaviorClose")


class InputError(Exception):
    """An input that cannot be checked (exit status 2)."""


def case_key(case_id):
    """Sort key: 1.2.10 after 1.2.9."""
    out = []
    for part in case_id.split("."):
        try:
            out.append((0, int(part), ""))
        except ValueError:
            out.append((1, 0, part))
    return out


def load_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError("%s %s not found" % (what, path))
    except ValueError as e:
        raise InputError("%s %s is not valid JSON: %s" % (what, path, e))


def load_report(path, agent):
    """The {case: {behavior, behaviorClose}} of one agent in index.json."""
    if os.path.isdir(path):
        path = os.path.join(path, "index.json")
    index = load_json(path, "report")
    if not isinstance(index, dict) or not index:
        raise InputError("report %s has no agent" % path)
    if agent is None:
        if len(index) != 1:
            raise InputError("report %s has agents %s: choose one with --agent"
                             % (path, ", ".join(sorted(index))))
        agent = next(iter(index))
    if agent not in index:
        raise InputError("agent %s not in report %s (have: %s)"
                         % (agent, path, ", ".join(sorted(index))))
    results = index[agent]
    if not isinstance(results, dict) or not results:
        raise InputError("report %s has no results for agent %s" % (path, agent))
    cases = {}
    for cid, res in results.items():
        if not isinstance(res, dict):
            raise InputError("report %s: case %s is not an object" % (path, cid))
        cases[cid] = {f: str(res.get(f, "?")) for f in FIELDS}
    return agent, cases


def load_expectations(path):
    """The {case: {behavior, behaviorClose}} of an expectations file."""
    doc = load_json(path, "expectations")
    cases = doc.get("cases") if isinstance(doc, dict) else None
    if not isinstance(cases, dict):
        raise InputError("expectations %s: no \"cases\" object" % path)
    for cid, exp in cases.items():
        if not isinstance(exp, dict) or any(not isinstance(exp.get(f), str) for f in FIELDS):
            raise InputError("expectations %s: case %s needs string fields %s"
                             % (path, cid, " and ".join(FIELDS)))
    bad = unacceptable(cases)
    if bad:
        raise InputError("expectations %s record unacceptable results (a failure cannot be "
                         "expected): %s" % (path, "; ".join(bad)))
    return doc, cases


def unacceptable(cases):
    """Descriptions of the cases whose result may not be recorded."""
    bad = []
    for cid in sorted(cases, key=case_key):
        res = cases[cid]
        if res["behavior"] not in ACCEPTABLE_BEHAVIORS or res["behaviorClose"] in UNACCEPTABLE_CLOSE:
            bad.append("%s %s" % (cid, show(res)))
    return bad


def show(res):
    return "%s/%s" % (res["behavior"], res["behaviorClose"])


def compare(expected, got, only_reported=False):
    """Sorted list of (case, expected or None, got or None) that differ."""
    diffs = []
    ids = set(got) if only_reported else set(expected) | set(got)
    for cid in sorted(ids, key=case_key):
        exp, res = expected.get(cid), got.get(cid)
        if exp is None or res is None or any(exp[f] != res[f] for f in FIELDS):
            diffs.append((cid, exp, res))
    return diffs


def describe(diff):
    cid, exp, res = diff
    if res is None:
        return "%-10s expected %s, got nothing (missing from the report)" % (cid, show(exp))
    if exp is None:
        return "%-10s expected nothing (not in the expectations), got %s" % (cid, show(res))
    return "%-10s expected %s, got %s" % (cid, show(exp), show(res))


def write_expectations(path, doc, cases):
    """One case per line, sorted, so a changed case is a one-line diff."""
    head = {k: v for k, v in doc.items() if k != "cases"}
    lines = ["{"]
    for k, v in head.items():
        lines.append("  %s: %s," % (json.dumps(k), json.dumps(v)))
    lines.append('  "cases": {')
    ids = sorted(cases, key=case_key)
    for i, cid in enumerate(ids):
        entry = json.dumps({f: cases[cid][f] for f in FIELDS})
        lines.append("    %s: %s%s" % (json.dumps(cid), entry, "," if i + 1 < len(ids) else ""))
    lines.append("  }")
    lines.append("}")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


DEFAULT_ABOUT = ("Autobahn|Testsuite results tidewire is held to, case by case: "
                 "behavior/behaviorClose per case id, compared by "
                 "tests/autobahn/check_expectations.py. Regenerate on purpose with "
                 "scripts/autobahn server|client --update-expectations "
                 "(see tests/autobahn/README.md).")


def update(report_path, expected_path, agent, only_reported, out):
    agent, got = load_report(report_path, agent)
    bad = unacceptable(got)
    if bad:
        raise InputError("refusing to record unacceptable results (fix them first): %s"
                         % "; ".join(bad))
    existed = os.path.exists(expected_path)
    if existed:
        doc, old = load_expectations(expected_path)
    else:
        doc, old = {"about": DEFAULT_ABOUT}, {}
    new = dict(old) if only_reported else {}
    new.update(got)
    changes = compare(old, new)
    if existed:  # a new file is all changes: nothing worth listing
        for d in changes:
            out("  changed: " + describe(d).replace("expected", "was", 1).replace(", got", ", now", 1))
    write_expectations(expected_path, doc, new)
    return agent, len(new), len(changes)


def main(argv=None, out=print, err=None):
    err = err or (lambda m: print(m, file=sys.stderr))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="report directory containing index.json, or the index.json file")
    ap.add_argument("expected", help="expectations file, e.g. tests/autobahn/expected-server.json")
    ap.add_argument("--agent", help="agent in index.json (default: its only agent)")
    ap.add_argument("--only-reported", action="store_true",
                    help="the run covered only some cases: do not report the others as missing "
                         "(with --update: keep their expectations)")
    ap.add_argument("--update", action="store_true",
                    help="write the expectations from the report instead of checking")
    args = ap.parse_args(argv)
    try:
        if args.update:
            agent, n, changed = update(args.report, args.expected, args.agent,
                                       args.only_reported, out)
            out("expectations: updated %s from agent %s: %d cases, %d changed"
                % (args.expected, agent, n, changed))
            return 0
        _, expected = load_expectations(args.expected)
        agent, got = load_report(args.report, args.agent)
    except InputError as e:
        err("check_expectations: %s" % e)
        out("expectations: not checked")
        return 2
    diffs = compare(expected, got, args.only_reported)
    checked = len(got) if args.only_reported else len(set(expected) | set(got))
    differing = {d[0] for d in diffs}
    lenient = sorted((c for c in got if c not in differing
                      and expected[c]["behavior"] == "NON-STRICT"), key=case_key)
    if lenient:
        out("  recorded as NON-STRICT on purpose: %s" % ", ".join(lenient))
    if diffs:
        out("cases that differ from %s (%d):" % (args.expected, len(diffs)))
        for d in diffs:
            out("  " + describe(d))
        out("  (a deliberate change? see tests/autobahn/README.md, "
            "'Expected results', to update the file)")
    out("expectations: %d as expected, %d differ (agent %s, %s)"
        % (checked - len(diffs), len(diffs), agent, args.expected))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
