"""Unit tests of check_expectations.py on small fake index.json reports.

Run: python3 -m unittest discover -s tests/autobahn -p 'test_*.py'
(scripts/test runs this in its test stage).
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import check_expectations  # noqa: E402

SCRIPT = os.path.join(HERE, "check_expectations.py")


def entry(behavior="OK", close="OK"):
    # index.json carries more fields; the checker must ignore them
    return {"behavior": behavior, "behaviorClose": close, "duration": 3,
            "remoteCloseCode": 1000, "reportfile": "tidewire_case.json"}


class CheckerTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        self.expected_path = os.path.join(self.dir, "expected.json")

    def tearDown(self):
        self.tmp.cleanup()

    def report(self, cases, agent="tidewire", name="report"):
        d = os.path.join(self.dir, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "index.json"), "w") as f:
            json.dump({agent: cases}, f)
        return d

    def expect(self, cases):
        doc = {"about": "test", "cases": {c: {"behavior": b, "behaviorClose": cl}
                                          for c, (b, cl) in cases.items()}}
        with open(self.expected_path, "w") as f:
            json.dump(doc, f)

    def run_main(self, *args):
        lines, errors = [], []
        rc = check_expectations.main(list(args), out=lines.append, err=errors.append)
        return rc, lines, errors

    def test_identical_results_pass(self):
        self.expect({"1.1.1": ("OK", "OK"), "7.1.6": ("INFORMATIONAL", "INFORMATIONAL")})
        rep = self.report({"1.1.1": entry(), "7.1.6": entry("INFORMATIONAL", "INFORMATIONAL")})
        rc, lines, _ = self.run_main(rep, self.expected_path)
        self.assertEqual(rc, 0, lines)
        self.assertEqual(lines[-1].split(" (")[0], "expectations: 2 as expected, 0 differ")

    def test_ok_to_non_strict_fails_and_names_the_case(self):
        self.expect({"1.1.1": ("OK", "OK"), "6.4.1": ("OK", "OK")})
        rep = self.report({"1.1.1": entry(), "6.4.1": entry("NON-STRICT", "OK")})
        rc, lines, _ = self.run_main(rep, self.expected_path)
        self.assertEqual(rc, 1)
        self.assertIn("  6.4.1      expected OK/OK, got NON-STRICT/OK", lines)
        self.assertFalse(any(line.startswith("  1.1.1") for line in lines), lines)
        self.assertTrue(lines[-1].startswith("expectations: 1 as expected, 1 differ"))

    def test_ok_to_informational_fails(self):
        self.expect({"7.1.6": ("OK", "OK")})
        rep = self.report({"7.1.6": entry("INFORMATIONAL", "INFORMATIONAL")})
        rc, lines, _ = self.run_main(rep, self.expected_path)
        self.assertEqual(rc, 1)
        self.assertIn("  7.1.6      expected OK/OK, got INFORMATIONAL/INFORMATIONAL", lines)

    def test_close_behavior_change_fails(self):
        self.expect({"7.5.1": ("OK", "OK")})
        rep = self.report({"7.5.1": entry("OK", "WRONG CODE")})
        rc, lines, _ = self.run_main(rep, self.expected_path)
        self.assertEqual(rc, 1)
        self.assertIn("  7.5.1      expected OK/OK, got OK/WRONG CODE", lines)

    def test_improvement_fails_too_so_the_file_stays_true(self):
        self.expect({"6.4.1": ("NON-STRICT", "OK")})
        rep = self.report({"6.4.1": entry()})
        rc, lines, _ = self.run_main(rep, self.expected_path)
        self.assertEqual(rc, 1)
        self.assertIn("  6.4.1      expected NON-STRICT/OK, got OK/OK", lines)
        self.assertFalse(any("on purpose" in line for line in lines), lines)

    def test_deliberate_non_strict_passes_and_is_listed(self):
        self.expect({"6.4.1": ("NON-STRICT", "OK")})
        rep = self.report({"6.4.1": entry("NON-STRICT", "OK")})
        rc, lines, _ = self.run_main(rep, self.expected_path)
        self.assertEqual(rc, 0, lines)
        self.assertIn("  recorded as NON-STRICT on purpose: 6.4.1", lines)

    def test_missing_and_extra_cases_fail(self):
        self.expect({"1.1.1": ("OK", "OK"), "1.1.2": ("OK", "OK")})
        rep = self.report({"1.1.1": entry(), "1.1.9": entry()})
        rc, lines, _ = self.run_main(rep, self.expected_path)
        self.assertEqual(rc, 1)
        self.assertIn("  1.1.2      expected OK/OK, got nothing (missing from the report)", lines)
        self.assertIn("  1.1.9      expected nothing (not in the expectations), got OK/OK", lines)
        self.assertTrue(lines[-1].startswith("expectations: 1 as expected, 2 differ"))

    def test_only_reported_ignores_missing_but_not_extra(self):
        self.expect({"1.1.1": ("OK", "OK"), "12.1.1": ("OK", "OK")})
        rc, lines, _ = self.run_main(self.report({"1.1.1": entry()}), self.expected_path,
                                     "--only-reported")
        self.assertEqual(rc, 0, lines)
        rc, lines, _ = self.run_main(self.report({"1.1.1": entry(), "1.1.9": entry()}, name="r2"),
                                     self.expected_path, "--only-reported")
        self.assertEqual(rc, 1)
        self.assertIn("  1.1.9      expected nothing (not in the expectations), got OK/OK", lines)

    def test_differences_are_sorted_numerically(self):
        self.expect({"1.1.2": ("OK", "OK"), "1.1.10": ("OK", "OK"), "2.1": ("OK", "OK")})
        rep = self.report({c: entry("NON-STRICT", "OK") for c in ("1.1.2", "1.1.10", "2.1")})
        rc, lines, _ = self.run_main(rep, self.expected_path)
        self.assertEqual(rc, 1)
        listed = [line.split()[0] for line in lines if line.startswith("  1.") or line.startswith("  2.")]
        self.assertEqual(listed, ["1.1.2", "1.1.10", "2.1"])

    def test_expectations_cannot_record_a_failure(self):
        for behavior, close in (("FAILED", "OK"), ("UNIMPLEMENTED", "OK"), ("OK", "UNCLEAN"),
                                ("WRONG CODE", "OK"), ("OK", "FAILED")):
            self.expect({"1.1.1": (behavior, close)})
            rep = self.report({"1.1.1": entry(behavior, close)})
            rc, lines, errors = self.run_main(rep, self.expected_path)
            self.assertEqual(rc, 2, (behavior, close))
            self.assertIn("unacceptable", errors[0])
            self.assertEqual(lines, ["expectations: not checked"])

    def test_unreadable_inputs_are_usage_errors(self):
        self.expect({"1.1.1": ("OK", "OK")})
        rc, _, errors = self.run_main(os.path.join(self.dir, "nowhere"), self.expected_path)
        self.assertEqual(rc, 2)
        self.assertIn("not found", errors[0])
        with open(self.expected_path, "w") as f:
            f.write("{not json")
        rc, _, errors = self.run_main(self.report({"1.1.1": entry()}), self.expected_path)
        self.assertEqual(rc, 2)
        self.assertIn("not valid JSON", errors[0])

    def test_agent_choice(self):
        self.expect({"1.1.1": ("OK", "OK")})
        d = os.path.join(self.dir, "two")
        os.makedirs(d)
        with open(os.path.join(d, "index.json"), "w") as f:
            json.dump({"a": {"1.1.1": entry()}, "b": {"1.1.1": entry("NON-STRICT", "OK")}}, f)
        rc, _, errors = self.run_main(d, self.expected_path)
        self.assertEqual(rc, 2)
        self.assertIn("--agent", errors[0])
        self.assertEqual(self.run_main(d, self.expected_path, "--agent", "a")[0], 0)
        self.assertEqual(self.run_main(d, self.expected_path, "--agent", "b")[0], 1)
        self.assertEqual(self.run_main(d, self.expected_path, "--agent", "c")[0], 2)

    def test_update_writes_a_file_the_check_then_accepts(self):
        rep = self.report({"1.1.10": entry(), "1.1.2": entry(),
                           "7.1.6": entry("INFORMATIONAL", "INFORMATIONAL")})
        rc, lines, _ = self.run_main(rep, self.expected_path, "--update")
        self.assertEqual(rc, 0, lines)
        self.assertEqual(len(lines), 1, "a new file lists no case: %r" % lines)
        self.assertTrue(lines[0].startswith("expectations: updated "))
        self.assertTrue(lines[0].endswith(": 3 cases, 3 changed"))
        with open(self.expected_path) as f:
            text = f.read()
        self.assertEqual(list(json.loads(text)["cases"]), ["1.1.2", "1.1.10", "7.1.6"])
        self.assertIn('    "1.1.2": {"behavior": "OK", "behaviorClose": "OK"},\n', text)
        self.assertEqual(self.run_main(rep, self.expected_path)[0], 0)

    def test_update_replaces_and_reports_changes(self):
        self.expect({"1.1.1": ("OK", "OK"), "1.1.2": ("OK", "OK")})
        with open(self.expected_path) as f:
            about = json.load(f)["about"]
        rep = self.report({"1.1.1": entry("NON-STRICT", "OK"), "1.1.3": entry()})
        rc, lines, _ = self.run_main(rep, self.expected_path, "--update")
        self.assertEqual(rc, 0, lines)
        self.assertIn("  changed: 1.1.1      was OK/OK, now NON-STRICT/OK", lines)
        self.assertIn("  changed: 1.1.2      was OK/OK, now nothing (missing from the report)", lines)
        with open(self.expected_path) as f:
            doc = json.load(f)
        self.assertEqual(doc["about"], about)
        self.assertEqual(sorted(doc["cases"]), ["1.1.1", "1.1.3"])

    def test_update_only_reported_keeps_the_other_cases(self):
        self.expect({"1.1.1": ("OK", "OK"), "12.1.1": ("OK", "OK")})
        rep = self.report({"1.1.1": entry("NON-STRICT", "OK")})
        rc, lines, _ = self.run_main(rep, self.expected_path, "--update", "--only-reported")
        self.assertEqual(rc, 0, lines)
        with open(self.expected_path) as f:
            cases = json.load(f)["cases"]
        self.assertEqual(cases, {"1.1.1": {"behavior": "NON-STRICT", "behaviorClose": "OK"},
                                 "12.1.1": {"behavior": "OK", "behaviorClose": "OK"}})

    def test_update_refuses_a_failed_run_and_leaves_the_file(self):
        self.expect({"1.1.1": ("OK", "OK")})
        with open(self.expected_path) as f:
            before = f.read()
        rep = self.report({"1.1.1": entry("FAILED", "OK")})
        rc, _, errors = self.run_main(rep, self.expected_path, "--update")
        self.assertEqual(rc, 2)
        self.assertIn("refusing", errors[0])
        with open(self.expected_path) as f:
            self.assertEqual(f.read(), before)

    def test_command_line_exit_status(self):
        # the way scripts/autobahn calls it: as a program, status in $?
        self.expect({"1.1.1": ("OK", "OK")})
        rep = self.report({"1.1.1": entry("NON-STRICT", "OK")})
        p = subprocess.run([sys.executable, SCRIPT, rep, self.expected_path],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("1.1.1      expected OK/OK, got NON-STRICT/OK", p.stdout)


if __name__ == "__main__":
    unittest.main()
