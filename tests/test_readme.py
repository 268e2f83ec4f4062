"""The README's results section is exactly what `python -m tsdb.bench.readme` renders from the
committed reports: no number in it is typed by hand or left stale."""

from tsdb.bench.readme import END, ROOT, START, render


def test_readme_results_are_rendered_from_the_reports():
    text = (ROOT / "README.md").read_text()
    section = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == render().strip(), "run `python -m tsdb.bench.readme` after changing reports/"
    assert "tsdb bench streaming --strategy horizon" in section


def test_readme_names_the_arms_a_restricted_run_left_out(tmp_path):
    import json

    import yaml
    report = tmp_path / "reports" / "ablation-x"
    report.mkdir(parents=True)
    (report / "spec.yaml").write_text(yaml.safe_dump({"baselines": ["seasonal-naive"],
                                                      "arms": {"e2e": {}, "depth-b4": {}, "looped": {}}}))
    arm = {"crps": 0.5, "mase": 1.0}
    (report / "results.json").write_text(json.dumps({
        "name": "ablation-x", "task": {"num_windows": 3, "protocol": "m4-hourly"},
        "command": "tsdb ablate --config x.yaml --arms e2e seasonal-naive",
        "arms": {"seasonal-naive": arm, "e2e": arm}}))
    text = render(tmp_path / "reports")
    assert "not run yet: depth-b4, looped;" in text
