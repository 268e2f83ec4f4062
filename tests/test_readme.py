"""The README's results section is exactly what `python -m tsdb.bench.readme` renders from the
committed reports: no number in it is typed by hand or left stale."""

import json
import shutil

from tsdb.bench.readme import END, ROOT, START, render


def test_readme_results_are_rendered_from_the_reports():
    text = (ROOT / "README.md").read_text()
    section = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == render().strip(), "run `python -m tsdb.bench.readme` after changing reports/"
    assert "tsdb bench streaming --strategy horizon" in section
    # a benchmark's headline comparison (the covariates bench: with vs without) is shown too
    assert "depth-b4-temperature vs depth-b4: CRPS ratio" in section


def test_readme_names_the_arms_a_restricted_run_left_out(tmp_path):
    """A run restricted by `--arms` (the committed M4 ablation cut to two arms) is shown with the
    arms of its spec it did not run."""
    src, report = ROOT / "reports" / "ablation-m4-hourly-quick", tmp_path / "reports" / "ablation-x"
    report.mkdir(parents=True)
    shutil.copy(src / "spec.yaml", report / "spec.yaml")
    results = json.loads((src / "results.json").read_text())
    results["arms"] = {n: results["arms"][n] for n in ("seasonal-naive", "e2e")}
    results["comparisons"] = []
    (report / "results.json").write_text(json.dumps(results))
    text = render(tmp_path / "reports")
    assert "not run yet: depth-b2, depth-b3, depth-b4, depth-b4-uniform," in text
