"""docs/reliability.md's figures table is written from what the scenario tests recorded."""

import json

import figures


def test_the_table_is_written_from_the_recorded_figures_and_the_rest_of_the_doc_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "FIGURES", tmp_path / "figures.json")
    monkeypatch.setattr(figures, "DOC", tmp_path / "doc.md")
    figures.DOC.write_text(f"# Doc\nbefore\n\n{figures.BEGIN}\n| stale | row |\n{figures.END}\n\nafter\n")
    figures.record("test_an_outage", "tests/reliability/test_x.py",
                   {"outage_s": 10.1, "controls_lost": 0, "recovery_s": [1.2, 0.7], "rss_growth_mb": {"trainer": 17},
                    "same_losses": True, "metrics": 20000})
    figures.write_doc()
    doc = figures.DOC.read_text()
    assert doc.startswith("# Doc\nbefore\n\n") and doc.endswith(f"{figures.END}\n\nafter\n") and "stale" not in doc
    row = next(line for line in doc.splitlines() if "an outage" in line)
    assert "`tests/reliability/test_x.py`: an outage" in row
    assert ("controls lost 0; metrics 20 000; outage 10.1 s; recovery 1.2 / 0.7 s; rss growth trainer 17 MB; "
            "same losses yes") in row  # in the order of their names
    stored = json.loads(figures.FIGURES.read_text())["test_an_outage"]
    assert stored["commit"] in row and stored["time"] in row
