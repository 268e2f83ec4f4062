"""Every bad-input path of the `tsdb` command line (tsdb.bench.errors.make_cases): exit code 2,
one `tsdb: error:` line naming the file/series/flag, nothing written, and no torch or lightning
imported on the way (so it answers fast; `tsdb bench errors` times each path in its own process)."""

import json
import subprocess
import sys
import textwrap

from tsdb.bench.errors import make_cases, passed

# all cases in one fresh process: torch must not appear in it at any point
SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    from tsdb.bench.errors import make_cases
    from tsdb.cli.main import main
    rows = []
    for case in make_cases(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(case.argv)
            except SystemExit as e:
                rc = e.code
        rows.append({"case": case.name, "returncode": rc, "stderr": err.getvalue().strip().splitlines(),
                     "heavy_imports": sorted(m for m in ("torch", "lightning") if m in sys.modules)})
    print(json.dumps(rows))
""")


def test_every_error_path_is_one_line_exit_2_without_heavy_imports(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    (tmp_path / "again").mkdir()
    cases = make_cases(tmp_path / "again")  # the same cases (names, outputs, expected words)
    assert [r["case"] for r in rows] == [c.name for c in cases]
    failures = []
    for row, case in zip(rows, cases):
        out = tmp_path / case.out if case.out else None
        row |= {"mentions": case.mentions,
                "wrote_output": bool(out and out.exists() and (out.is_file() or any(out.iterdir())))}
        if not passed(row):
            failures.append(row)
    assert not failures, json.dumps(failures, indent=1)
    assert len(rows) >= 40
    assert not (tmp_path / "tsdb-pwned").exists()
