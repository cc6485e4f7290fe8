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
    runs = [{"name": name, "size_mb": size, "zero_shot": {"last_word": {"acc": acc}},
             "metrics": {"method": "gptq", "bits_per_weight": bits, "perplexity": ppl, "fp_perplexity": 40.0,
                         "quantize_time_s": 10.0, "peak_rss_bytes": 1e9, **extra}}
            for name, bits, size, ppl, acc, extra in [("gptq-w4g128", 4.19, 170, 46.4, 0.7, {}),
                                                      ("mixed-2.5", 2.5, 150, 80.0, 0.6, {"budget_bits": 2.5})]]
    fp = {"model": "/models/smollm2-135m", "bits_per_weight": 32, "size_mb": 538, "perplexity": 40.0,
          "zero_shot": {"last_word": {"acc": 0.745}}}
    md, png = write_report(runs, tmp_path / "report", fp)
    rows = md.read_text().splitlines()
    assert rows[0] == ("| method | recipe | bits/weight | size (MB) | perplexity | × fp | last_word (acc, %) | "
                       "quantize time (s) | peak memory (GB) |")
    assert rows[2] == "| fp | smollm2-135m | 32 | 538 | 40.000 | 1.000 | 74.5 |  |  |"
    assert rows[3] == "| mixed gptq | mixed-2.5 | 2.500 | 150 | 80.000 | 2.000 | 60.0 | 10 | 1.00 |"
    assert rows[4].startswith("| gptq | gptq-w4g128 | 4.190 | 170 |")
    assert rows[6] == ("- mixed-2.5 (2.500 bits/weight, perplexity 80.000) is lower than 0 of the 1 uniform runs at "
                       "2.500 bits/weight or more; not lower than gptq-w4g128 (4.190 bits, 46.400)")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
