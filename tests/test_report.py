"""The sweep report: the Pareto front against a brute-force definition, the table and plot from a sweep's results."""

import random

from lqtk.report import pareto_front, write_report


def test_pareto_front_is_the_set_of_undominated_points():
    rng = random.Random(0)
    points = [(rng.choice([2.0, 2.5, 3.0, 4.0]), rng.uniform(10, 100)) for _ in range(40)]
    dominated = {i for i, (b, p) in enumerate(points)
                 if any(b2 <= b and p2 <= p and (b2, p2) != (b, p) for b2, p2 in points)}
    assert sorted(pareto_front(points)) == sorted(set(range(len(points))) - dominated)


def test_report_has_a_row_per_run_and_a_plot(tmp_path):
    runs = [{"name": name, "metrics": {"method": method, "bits_per_weight": bits, "perplexity": ppl,
                                       "fp_perplexity": 40.0, "quantize_time_s": 10.0, "peak_rss_bytes": 1e9}}
            for name, method, bits, ppl in [("gptq-w4g128", "gptq", 4.19, 46.4), ("aqlm-2x8-g8", "aqlm", 2.1, 80.0)]]
    md, png = write_report(runs, tmp_path / "report")
    rows = md.read_text().splitlines()
    assert rows[2].startswith("| aqlm | aqlm-2x8-g8 | 2.100 | 80.000 | 2.000 |") and "gptq-w4g128" in rows[3]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
