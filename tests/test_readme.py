"""The README's results section is exactly what `python -m tsdb.bench.readme` renders from the
committed reports: no number in it is typed by hand or left stale."""

from tsdb.bench.readme import END, ROOT, START, render


def test_readme_results_are_rendered_from_the_reports():
    text = (ROOT / "README.md").read_text()
    section = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == render().strip(), "run `python -m tsdb.bench.readme` after changing reports/"
    assert "tsdb bench streaming --strategy horizon" in section
