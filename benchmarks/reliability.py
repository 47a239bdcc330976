"""Reliability and security at full counts (issue 7): runs ``tests/reliability`` with
``BITFIT_RELIABILITY_FULL=1`` and writes ``benchmarks/results/reliability.md`` + ``.json``: every
count the tests measured, and the number lost / wrong / crashed.

    python -m benchmarks.reliability                      # full counts, 15-minute soak (~40 min on 2 cores)
    python -m benchmarks.reliability --soak-s 300         # a shorter soak; the report states the real one
    python -m benchmarks.reliability -k "crash or names"  # re-run some tests; others' results are kept

CI runs the same tests at small counts (``python -m pytest -q tests/reliability``, < 3 min).
Every count comes from the tests themselves (``record_property``) through a JUnit XML report, so
the report cannot disagree with what was asserted.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# property -> (issue point, what was counted, what went wrong), each a function of the property dict.
POINTS = {
    "fuzz_in_process": ("1 API fuzzing (in-process)", lambda p: f"{p['cases']} cases {p['by_status']}",
                        lambda p: f"5xx {p['server_errors']}, schema/acceptance failures {p['failures']}"),
    "fuzz_live": ("1 API fuzzing (live server)", lambda p: f"{p['cases']} cases {p['by_status']}",
                  lambda p: f"5xx {p['server_errors']}, schema/acceptance failures {p['failures']}"),
    "corpus_put": ("2 malformed files via PUT", lambda p: f"{p['cases']} files, codes {p['codes']}",
                   lambda p: f"accepted / unspecific / 5xx: {sum(v for k, v in p['codes'].items() if k not in SPECIFIC)}"),
    "traversal_http": ("3 traversal via PUT+DELETE", lambda p: f"{p['payloads']} payloads, {p['requests']} requests "
                                                               f"{p['statuses']}", None),
    "traversal_watch": ("3 traversal via watched folder", lambda p: f"{p['file_names']} hostile file names, "
                                                                    f"{p['mislabeled']} hostile metadata", None),
    "crash_http": ("4 kill -9 during PUT/replace/DELETE",
                   lambda p: f"{p['kills']} kills ({p['killed_mid_operation']} mid-operation), "
                             f"{p['operations_acked']} ops acked, {p['failed_replaces']} failed replaces",
                   lambda p: f"violations {p['violations']}; temp files left (never loaded) {p['temp_files_left_never_loaded']}"),
    "crash_watch": ("4 kill -9 during watched-folder ingest", lambda p: f"{p['kills']} kills",
                    lambda p: f"violations {p['violations']}; temp files (never loaded) {p['temp_files_never_loaded']}"),
    "attribution": ("5 version attribution under change",
                    lambda p: f"{p['tasks']} tasks, >= {p['replaces_per_task']} replaces each: {p['replaces']} replaces, "
                              f"{p['deletes']} deletes; {p['requests']} requests ({p['answers']} answers) at "
                              f"{p['requests_per_s_during_changes']} req/s over {p['seconds']} s",
                    lambda p: f"wrong task {p['wrong_task']}, not current {p['not_current']}, wrong scores "
                              f"{p['wrong_scores']}, bad status {p['bad_status']} (404 while deleted: {p['deleted_404']})"),
    "overload": ("6 overload at 4x capacity",
                 lambda p: f"capacity {p['capacity_rps']} req/s, offered {p['offered_rps']} for {p['seconds']} s: "
                           f"{p['requests']} requests, {p['accepted']} accepted, {p['refused_429_503']} refused; "
                           f"queue max {p['max_queue_seen']:.0f}/{p['max_queue']}; p99 {p['p99_before_s']} s before, "
                           f"{p['p99_accepted_s']} s accepted (bound {p['p99_bound_s']}), {p['p99_after_s']} s after",
                 lambda p: f"lost/other {p['lost_or_other']}, refused without Retry-After "
                           f"{p['refused_without_retry_after']}"),
    "engine_churn": ("7 engine churn", lambda p: f"{p['cycles']} add/replace/delete cycles, RSS drift "
                                                 f"{p['rss_drift']:.2%}, bank rows {p['bank_capacity']}", None),
    "corpus_engine": ("2 malformed files via the engine", lambda p: f"{p['cases']} files", None),
    "http_churn": ("7 HTTP churn", lambda p: f"{p['cycles']} PUT/DELETE cycles, RSS drift {p['rss_drift']:.2%}", None),
    "soak": ("7 soak at 70% capacity",
             lambda p: f"{p['seconds']} s at {p['offered_rps']} req/s (capacity {p['capacity_rps']}), "
                       f"{p['requests']} requests, {p['replaces']} replaces; RSS {p['rss_mib_second_quarter']} -> "
                       f"{p['rss_mib_last_quarter']} MiB ({p['rss_drift']:.2%})",
             lambda p: f"statuses {p['statuses']} (non-200 in {p.get('seconds_with_non_200', '?')} s of the run), "
                       f"wrong-task versions {p['wrong_task_versions']}"),
    "sigterm_drain": ("8 SIGTERM under load",
                      lambda p: f"{p['requests']} requests, {p['in_flight_at_sigterm']} in flight at SIGTERM, "
                                f"{p['after_sigterm']} attempted after: {p['after_sigterm_outcomes']}",
                      lambda p: f"in-flight dropped {p['in_flight_dropped']}; exit code {p['exit_code']}"),
    "watch_slow": ("9 slow in-place writes", lambda p: f"{p['rounds']} rounds, {p['observations']} observations, "
                                                       f"{p['partial_reads_rejected']:.0f} partial reads rejected", None),
}
FILE_POINTS = {"test_fuzz_api": "1 API fuzzing", "test_uploads": "2 uploads", "test_malformed_deltas": "2 uploads",
               "test_names": "3 names", "test_crash": "4 crash consistency", "test_attribution": "5 attribution",
               "test_overload": "6 overload", "test_churn": "7 no leaks", "test_soak": "7 no leaks",
               "test_health": "8 health", "test_watch": "9 watched folder", "test_access": "10 access control",
               "test_folder": "9 watched folder", "test_tenants": "11 tenant isolation (issue 19)",
               "test_connections": "12 connections (issue 19)"}
SPECIFIC = {"invalid_delta", "base_model_mismatch", "invalid_input", "payload_too_large"}


def environment() -> dict:
    import torch
    import transformers

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform()}


def run_pytest(args: argparse.Namespace, junit: Path) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability",
           f"--junitxml={junit}", "-o", "junit_family=xunit1", "--durations=0"]
    if args.k:
        cmd += ["-k", args.k]
    env = {**os.environ, "BITFIT_RELIABILITY_FULL": "1", "BITFIT_SOAK_S": str(args.soak_s)}
    print("running:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


def parse(junit: Path) -> dict[str, dict]:
    tests = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        message = ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:500]
        props = {}
        for prop in case.iter("property"):
            try:
                props[prop.get("name")] = ast.literal_eval(prop.get("value"))
            except (ValueError, SyntaxError):
                props[prop.get("name")] = prop.get("value")
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        tests[name] = {"outcome": outcome, "seconds": round(float(case.get("time", 0)), 1),
                       "properties": props, "message": message}
    return tests


def render(report: dict) -> str:
    runs = "\n".join(f"- {r['started']} `{r['command']}`: {r['wall_s']} s, exit {r['exit_code']}"
                     + (f"; {r['note']}" if r.get("note") else "") for r in report["runs"])
    lines = ["# Reliability and security: full counts", "",
             "Runs (a later `-k` run replaces the rows of the tests it ran):", "", runs, "",
             f"Last run: {report['finished']}; machine: {report['environment']['cpu']}, "
             f"{report['environment']['cpu_cores']} cores shared with other jobs "
             f"(1-min load {report['environment']['load_average_1m']:.1f} at the start), torch "
             f"{report['environment']['torch']}. Tiny BERT (2 layers, hidden 32) as the base: these tests measure "
             f"the server's behaviour, not the model's speed.", "",
             "Every number is recorded by the test that asserted it. A passed test means every "
             "violation count in its row is 0.", "",
             "| point | what was counted | lost / wrong / crashed | test | result | s |",
             "|---|---|---|---|---|---|"]
    for name, test in sorted(report["tests"].items(), key=_order):
        short = name.split("tests/reliability/", 1)[-1]
        props = test["properties"] or {None: None}
        for key, value in props.items():
            file_point = FILE_POINTS.get(short.split(".py")[0], "-")
            point, counted, bad = POINTS.get(key, (file_point, None, None))
            counted_s = counted(value) if counted and isinstance(value, dict) else (json.dumps(value) if value else "")
            bad_s = bad(value) if bad and isinstance(value, dict) else ("0 (asserted)" if test["outcome"] == "passed"
                                                                          else "see message")
            lines.append(f"| {point} | {counted_s} | {bad_s} | `{short}` | {test['outcome']} | {test['seconds']} |")
    failed = {n: t for n, t in report["tests"].items() if t["outcome"] not in ("passed",)}
    if failed:
        lines += ["", "## Not passed", ""] + [f"- `{n}`: {t['outcome']}: {t['message']}" for n, t in failed.items()]
    return "\n".join(lines) + "\n"


def _order(item: tuple[str, dict]) -> tuple[int, str]:
    name, test = item
    keys = list(test["properties"])
    point = POINTS[keys[0]][0] if keys and keys[0] in POINTS else FILE_POINTS.get(
        name.split("tests/reliability/", 1)[-1].split(".py")[0], "99")
    return int(point.split()[0]), name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--soak-s", type=float, default=900.0, help="soak duration in seconds (issue: >= 900)")
    p.add_argument("-k", default="", help="pytest -k expression: run only these tests, keep the others' results")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--note", default="", help="a note about this run, kept in the report")
    p.add_argument("--render-only", action="store_true", help="re-write reliability.md from reliability.json")
    args = p.parse_args()
    if args.render_only:
        report = json.loads((args.out / "reliability.json").read_text())
        (args.out / "reliability.md").write_text(render(report))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    previous, runs = {}, []
    if args.k and (args.out / "reliability.json").exists():
        old = json.loads((args.out / "reliability.json").read_text())
        previous, runs = old["tests"], old.get("runs", [])
    started = time.time()
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        code = run_pytest(args, junit)
        tests = parse(junit) if junit.exists() else {}
    run = {"command": "python -m benchmarks.reliability " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "soak_s": args.soak_s, "exit_code": code, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
           "wall_s": round(time.time() - started), "note": args.note}
    report = {"runs": [*runs, run], "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "environment": env, "tests": {**previous, **tests}}
    (args.out / "reliability.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "reliability.md").write_text(render(report))
    print(render(report))
    sys.exit(code)


if __name__ == "__main__":
    main()
